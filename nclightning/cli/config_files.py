"""The ``--config`` files of a command line: bundled names, existence, YAML syntax, lookups.

Checked before jsonargparse sees them, so that a missing or malformed file is one line that
names the file (jsonargparse reports a YAML error as ``in "<unicode string>"``).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nclightning.errors import ConfigurationError

__all__ = [
    "CONFIG_DIR",
    "bundled_configs",
    "check_config_files",
    "class_parameters",
    "config_files",
    "file_defining",
    "resolve_config_args",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def bundled_configs() -> list[str]:
    """Names of the configs shipped inside the package."""
    return sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def _config_values(argv: list[str]) -> Iterator[tuple[int, bool, str]]:
    """``(index, inline, value)`` of every ``--config`` value (``inline``: ``--config=V``)."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            yield i + 1, False, argv[i + 1]
        elif arg.startswith("--config="):
            yield i, True, arg.split("=", 1)[1]


def _is_inline_yaml(value: str) -> bool:
    """``--config '{trainer: {max_epochs: 3}}'``: jsonargparse accepts config text too."""
    return "\n" in value or value.lstrip().startswith("{") or ": " in value


def resolve_config_args(argv: list[str]) -> list[str]:
    """Replace ``--config NAME`` by the bundled file when ``NAME`` is not a path that exists."""
    out = list(argv)
    for j, inline, value in _config_values(out):
        if Path(value).exists() or _is_inline_yaml(value):
            continue
        name = Path(value).name
        for candidate in (name, f"{name}.yaml"):
            if (CONFIG_DIR / candidate).is_file():
                resolved = str(CONFIG_DIR / candidate)
                out[j] = f"--config={resolved}" if inline else resolved
                break
    return out


def config_files(argv: list[str]) -> list[Path]:
    """The config files named on a (resolved) command line, in order."""
    return [Path(v) for _, _, v in _config_values(argv) if not _is_inline_yaml(v)]


def check_config_files(argv: list[str]) -> None:
    """Raise :class:`ConfigurationError` for a config that is missing or not valid YAML."""
    import yaml

    for path in config_files(argv):
        if not path.is_file():
            local = [p.name for p in Path.cwd().glob("*.y*ml")]
            close = difflib.get_close_matches(path.name, [*bundled_configs(), *local], n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigurationError(
                f"config file not found: {path}{hint} (bundled configs: "
                f"{', '.join(bundled_configs())})"
            )
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigurationError(f"malformed YAML in {path}{where}: {problem}") from None


def _flatten(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            yield dotted
            yield from _flatten(value, dotted)
    elif isinstance(node, list):
        for item in node:
            yield from _flatten(item, prefix)


def _load(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def file_defining(files: list[Path], key: str) -> Path | None:
    """The last config file defining ``key`` (dotted, or the last part of a dotted key)."""
    found = None
    for path in files:
        keys = set(_flatten(_load(path)))
        if key in keys or any(k.endswith(f".{key}") for k in keys):
            found = path
    return found


def _class_paths(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "class_path" and isinstance(value, str):
                yield value
            else:
                yield from _class_paths(value)
    elif isinstance(node, list):
        for item in node:
            yield from _class_paths(item)


def class_parameters(files: list[Path], argv: list[str]) -> set[str]:
    """Constructor parameter names of every class named in the configs and on the command line."""
    paths = {p for f in files for p in _class_paths(_load(f))}
    paths |= {a.split("=")[-1] for a in argv if "." in a and not a.startswith("-")}
    names: set[str] = set()
    for dotted in paths:
        module, _, attr = dotted.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
            names |= set(inspect.signature(cls).parameters)
        except Exception:
            continue
    return names - {"args", "kwargs", "self"}
