"""Runs of one setting: which runs are seeds of the same experiment (mean-and-band figures).

Owns the grouping rule of ``nclightning report --group`` (docs/science.md §9): by default,
runs whose saved LightningCLI configs are identical once every ``seed`` /
``seed_everything`` entry and ``ckpt_path`` are removed; or the runs of one logger folder;
or none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nclightning.record.runs import Run

__all__ = ["group_runs"]


_SEED_KEYS = frozenset({"seed", "seed_everything"})
_RUN_KEYS = frozenset({"ckpt_path"})


def _setting(config: Any) -> Any:
    """A config without its seeds (any ``seed``/``seed_everything`` entry) and ``ckpt_path``."""
    if isinstance(config, dict):
        return {
            k: _setting(v)
            for k, v in sorted(config.items(), key=lambda kv: str(kv[0]))
            if k not in _SEED_KEYS and k not in _RUN_KEYS
        }
    if isinstance(config, list):
        return [_setting(v) for v in config]
    return config


def group_runs(runs: Sequence[Run], by: str = "config") -> dict[str, list[Run]]:
    """Runs of one setting together: ``{group label: [runs]}`` in first-seen order.

    ``by="config"``: runs whose saved configs are identical apart from every ``seed`` /
    ``seed_everything`` entry and ``ckpt_path`` (a run without a saved config is its own
    group); ``by="parent"``: runs in the same logger folder (``runs/NAME/version_*``);
    ``by="none"``: every run alone. A group of several runs is labelled by their common
    logger folder when they share one, else by its first run's label and ``+N``.
    """
    if by not in ("config", "parent", "none"):
        raise ValueError(f"group_runs: by must be 'config', 'parent' or 'none', got {by!r}")
    groups: dict[Any, list[Run]] = {}
    for i, run in enumerate(runs):
        if by == "config" and run.config is not None:
            key: Any = ("config", repr(_setting(run.config)))
        elif by == "parent":
            key = ("parent", str(run.path.parent))
        else:
            key = ("alone", i)
        groups.setdefault(key, []).append(run)
    out = {}
    for members in groups.values():
        out[_group_label(members)] = members
    return out


def _group_label(members: Sequence[Run]) -> str:
    if len(members) == 1:
        return members[0].label
    parents = {m.path.parent for m in members}
    if len(parents) == 1 and all(m.versions[0].number is not None for m in members):
        return members[0].path.parent.name
    return f"{members[0].label} +{len(members) - 1}"
