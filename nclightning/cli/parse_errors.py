"""Config errors a person reads in one glance: jsonargparse's messages, shortened.

jsonargparse prints the whole usage text (65 lines for ``nclightning fit``) and nested union
diagnostics. :func:`short_message` turns its message into one line naming the key, the
problem and the valid choices or a "did you mean"; the caller adds where ``--help`` lives.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ErrorContext", "short_message"]

_KEY = re.compile(r'Parser key "([^"]+)":')
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)")
_NOT_ACCEPT = re.compile(r"does not accept (?:nested key|option) '([^']+)'")
_OPTION_NOT_ACCEPTED = re.compile(r"(?:Option|Key) '([^']+)' is not accepted")
_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*?)\]\. Got value: (.*)")
_TYPE = re.compile(r"Expected a <class '([\w.]+)'>\. Got value: (.*)")
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)':\s*\n\s*(.*)")
_DOT_PATH = re.compile(r"Expected a dot import path string: (\S+)")
_NO_FILE = re.compile(r"File does not exist: '([^']+)'")
_SUBTYPE = re.compile(r"Subtypes: \[[^\n]*?<class '([\w.]+)'>")
_TYPE_NAMES = {"float": "a number", "int": "an integer", "bool": "true or false", "str": "text"}


@dataclass
class ErrorContext:
    """What the shortening knows: the command line, its config files, the valid option keys."""

    argv: list[str] = field(default_factory=list)
    config_files: list[Path] = field(default_factory=list)
    options: set[str] = field(default_factory=set)  # "--trainer.max_epochs", ...
    parameters: set[str] = field(default_factory=set)  # constructor args of named classes


def _close(word: str, candidates: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)
    return found[0] if found else None


def _mean(suggestion: str | None) -> str:
    return f"; did you mean {suggestion}?" if suggestion else ""


def _flag_for(ctx: ErrorContext, key: str) -> str:
    """The command-line flag that set ``key`` (a dotted key or its last part), else ``key``."""
    for arg in ctx.argv:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and (flag[2:] == key or flag.endswith(f".{key}")):
            return flag
    return f"--{key}" if f"--{key}" in ctx.options else key


def _in_file(ctx: ErrorContext, key: str) -> str:
    from nclightning.cli.config_files import file_defining

    if any(a.split("=", 1)[0].endswith(key) for a in ctx.argv if a.startswith("--")):
        return ""
    path = file_defining(ctx.config_files, key)
    return f" in {path}" if path else ""


def _unknown_option(ctx: ErrorContext, flag: str) -> str:
    flag = flag.split("=", 1)[0]
    head, _, last = flag.rpartition(".")
    suggestion = _close(flag, ctx.options)
    if suggestion is None and head:
        name = _close(last, ctx.parameters)
        suggestion = f"{head}.{name}" if name else None
    return f"unknown option {flag}{_mean(suggestion)}"


def _unknown_key(ctx: ErrorContext, key: str) -> str:
    flag = _flag_for(ctx, key)
    if flag.startswith("--"):
        return _unknown_option(ctx, flag)
    suggestion = _close(f"--{key}", ctx.options)
    if suggestion is None:
        name = _close(key.rpartition(".")[2], ctx.parameters)
        head = key.rpartition(".")[0]
        suggestion = (f"{head}.{name}" if head else name) if name else None
    else:
        suggestion = suggestion[2:]
    return f"unknown key '{key}'{_in_file(ctx, key)}{_mean(suggestion)}"


def _subclasses(base: str | None, near: str) -> list[str]:
    """Importable subclasses of ``base`` (else the classes of ``near``'s module), dotted."""
    module, _, name = (base or near).rpartition(".")
    try:
        mod = importlib.import_module(module)
    except Exception:
        return []
    if base is None:
        return [f"{module}.{n}" for n in dir(mod) if n[:1].isupper()]
    cls = getattr(mod, name, None)
    found: set[str] = set()
    todo: list[type] = [cls] if isinstance(cls, type) else []
    while todo:
        subclasses: list[type] = todo.pop().__subclasses__()
        for sub in subclasses:
            if not sub.__name__.startswith("_") and "<locals>" not in sub.__qualname__:
                found.add(f"{sub.__module__}.{sub.__qualname__}")
            todo.append(sub)
    return sorted(found, key=lambda c: (c.startswith(("lightning", "pytorch_lightning")), c))


def _public_name(dotted: str, module: str) -> str:
    """``nclightning.data.DigitsDataModule`` rather than its defining module's path."""
    name = dotted.rpartition(".")[2]
    try:
        if module and getattr(importlib.import_module(module), name, None) is not None:
            return f"{module}.{name}"
    except Exception:
        pass
    return dotted


def _class_hint(value: str, base: str | None) -> str:
    """``; did you mean X?`` or ``(choose one of: ...)`` for a class path that does not import."""
    module = value.rpartition(".")[0]
    options = [_public_name(o, module) for o in _subclasses(base, value)]
    by_name = {o.rpartition(".")[2]: o for o in options}
    name = _close(value.rpartition(".")[2], by_name)
    if name:
        return _mean(by_name[name] if "." in value else name)
    return f" (choose one of: {', '.join(options[:5])})" if options else ""


def _bad_value(ctx: ErrorContext, key: str, detail: str) -> str:
    """One line for ``Parser key "KEY": DETAIL`` (a wrong type, choice, class or file)."""
    flag = _flag_for(ctx, key)
    where = "" if flag.startswith("--") else _in_file(ctx, key)
    if m := _NO_FILE.search(detail):
        return f"{flag}: file not found: {m.group(1)}"
    base = m.group(1) if (m := _SUBTYPE.search(detail)) else None
    if m := _CLASS_PATH.search(detail):
        cls, reason = m.group(1), m.group(2).strip()
        if inner := _KEY.search(detail, m.start()):  # the class imports; one of its args is bad
            return _bad_value(ctx, inner.group(1), detail[inner.end() :])
        return f"{flag}{where}: cannot import {cls} ({reason}){_class_hint(cls, base)}"
    if m := _DOT_PATH.search(detail):
        value = m.group(1)
        return f"{flag}{where}: {value!r} is not an importable class{_class_hint(value, base)}"
    if m := _LITERAL.search(detail):
        choices, value = m.group(1), m.group(2).strip()
        options = [c.strip().strip("'\"") for c in choices.split(",")]
        return (
            f"{flag}{where}: {value!r} is not a valid choice; choose one of {choices}"
            f"{_mean(_close(value, options))}"
        )
    if m := _TYPE.search(detail):
        kind = _TYPE_NAMES.get(m.group(1), m.group(1))
        return f"{flag}{where}: expected {kind}, got {m.group(2).strip()!r}"
    lines = [ln.strip(" -") for ln in detail.splitlines() if ln.strip(" -")]
    return f"{flag}{where}: {lines[0] if lines else 'invalid value'}"


def short_message(message: str, ctx: ErrorContext) -> str:
    """One line for a jsonargparse error ``message`` (see the module docstring)."""
    if m := _UNRECOGNIZED.search(message):
        flags = [a for a in m.group(1).split() if a.startswith("-")] or m.group(1).split()[:1]
        return "; ".join(_unknown_option(ctx, f) for f in flags)
    if m := _NOT_ACCEPT.search(message) or _OPTION_NOT_ACCEPTED.search(message):
        return _unknown_key(ctx, m.group(1))
    if m := _KEY.search(message):
        return _bad_value(ctx, m.group(1), message[m.end() :])
    if "Problems parsing config" in message:
        return "malformed config: " + " ".join(message.split("\n")[0].split()[3:])
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return lines[0] if lines else "invalid command line"
