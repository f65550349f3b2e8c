"""``nclightning report RUN_DIR [RUN_DIR ...]``: PNG figures of logged runs.

A thin command: runs are found and read by :mod:`nclightning.record.runs` (versions, resumed
runs stitched, one x-axis of completed epochs), the figures and their names come from
:mod:`nclightning.record.figures`. Each ``RUN_DIR`` may hold one run or many (every run under
it is reported). For every run and probe (``--probe``, default all) the report writes
``metrics_{probe}``, ``depth_profile_{probe}``, ``pm_{h0}_to_{h}_{probe}``, the class figures
of the last snapshot (``--epoch`` for another), and for a held-out probe of a run that also
probed ``train`` the ``splits_train_vs_{probe}_{layer}`` figures. With several runs it also
writes ``overlay_{metric}_{probe}[_since_zero_error]`` at one layer: runs of one setting
(``--group``: identical saved config apart from the seeds, by default) are drawn as their mean
and band.

Output goes to ``RUN_DIR/report`` for one run, ``./report/{label}/`` (and overlays in
``./report``) for several, or ``--out DIR``. Written paths go to stdout, one per line; notes on
what was not drawn go to stderr. A user error prints one ``nclightning report: error: ...``
line, returns 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nclightning.errors import ConfigurationError, DataError, UserError

__all__ = ["build_parser", "main"]

PROG = "nclightning report"


_OPTIONS = (
    (
        "--out",
        dict(
            type=Path,
            default=None,
            help="output folder (default: RUN_DIR/report for one run, ./report for several)",
        ),
    ),
    (
        "--probe",
        dict(
            default=None,
            help="probe to draw: train, val, test or a named one "
            "(default: every probe; --split is the same option)",
        ),
    ),
    (
        "--metrics",
        dict(
            nargs="+",
            default=None,
            metavar="METRIC",
            help="metrics to draw (default: nc1 nc1_tilde cdnv nc2_etf nc3 nc4, those logged)",
        ),
    ),
    (
        "--layers",
        dict(
            nargs="+",
            default=None,
            metavar="LAYER",
            help="layers to draw, in this order (default: all, shallow to deep)",
        ),
    ),
    (
        "--overlay-layer",
        dict(
            default=None,
            help="layer of the multi-run overlays (default: the "
            "last of --layers, else penultimate, else the deepest shared layer)",
        ),
    ),
    (
        "--group",
        dict(
            choices=("config", "parent", "none"),
            default="config",
            help="which runs are seeds of one setting, drawn as mean and band: 'config' "
            "(saved configs equal apart from seeds and ckpt_path; the default), 'parent' "
            "(the same logger folder), 'none'",
        ),
    ),
    (
        "--epoch",
        dict(
            type=int,
            default=None,
            help="epochs_trained of the snapshot for the class figures (default: last)",
        ),
    ),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Write PNG figures of runs logged by the CSV logger and the "
        "NeuralCollapseCallback (metrics.csv, snapshots/): collapse metrics over epochs, depth "
        "profile, pair fits, class matrices, train against held-out probes; with several "
        "runs, overlays (seeds of one setting as mean and band).",
    )
    p.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="folder searched for runs (version folders), or a metrics.csv file",
    )
    for name, kwargs in _OPTIONS:
        names = (name, "--split") if name == "--probe" else (name,)
        p.add_argument(*names, **kwargs)
    return p


def main(argv: list[str]) -> int:
    """Entry point of ``nclightning report``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        written, notes = _report(args)
    except UserError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"{PROG}: {note}", file=sys.stderr)
    for path in written:
        print(path)
    return 0


def _check(run: Any, args: Any) -> list[str]:
    """The probes to draw for ``run``; :class:`UserError` for anything asked but not logged."""
    from nclightning.record import views

    found = views.probes(run.rows)
    if not found:
        old = any(k.startswith("nc/") for r in run.rows for k in r)
        hint = (
            " (its keys nc/{split}/... come from an earlier nclightning; this report reads "
            "nc-{probe}/{layer}/{metric})"
            if old
            else " (expected NeuralCollapseCallback keys such as nc-train/penultimate/nc1)"
        )
        raise DataError(f"{run.label}: no collapse metrics in {run.path}{hint}")
    if args.probe is not None and args.probe not in found:
        raise ConfigurationError(
            f"{run.label}: probe {args.probe!r} not logged (probes: {', '.join(found)})"
        )
    probes = [args.probe] if args.probe else found
    for probe in probes:
        hist = views.layer_history(run.rows, probe, run.x)
        _missing("layer(s)", args.layers, list(hist), run, probe)
        _missing("metric(s)", args.metrics, views.metric_names(hist), run, probe)
    return probes


def _missing(kind: str, wanted: Any, available: Sequence[str], run: Any, probe: str) -> None:
    missing = [w for w in wanted or () if w not in available]
    if missing:
        raise ConfigurationError(
            f"{run.label} ({probe} probe): {kind} {', '.join(missing)} not logged "
            f"(available: {', '.join(available)})"
        )


def _report(args: Any) -> tuple[list[Path], list[str]]:
    """Read and check every run first, so that a user error writes no figure at all."""
    from nclightning.record import runs as records

    runs = records.find_runs(args.run_dirs)
    probes = {run.label: _check(run, args) for run in runs}
    several = len(runs) > 1
    notes: list[str] = [note for run in runs for note in run.notes]
    plan = _overlay_plan(runs, probes, args, notes) if several else {}
    first = args.run_dirs[0]
    here = first.parent if first.is_file() else first
    root = args.out or (Path("report") if several else here / "report")
    written = []
    for run in runs:
        out = root / _safe(run.label) if several else root
        for probe in probes[run.label]:
            written += _write_run(run, probe, out, args, notes)
    if plan:
        written += _write_overlays(runs, plan, root, args, notes)
    return written, notes


def _safe(name: str) -> str:
    from nclightning.record.figures import safe

    return safe(name)


def _save(figures: dict, out: Path) -> list[Path]:
    from nclightning import plotting

    return [plotting.save_figure(fig, out / f"{name}.png") for name, fig in figures.items()]


def _write_run(run: Any, probe: str, out: Path, args: Any, notes: list[str]) -> list[Path]:
    from nclightning.record import figures, views

    snapshot = None
    if run.snapshots.get(probe):
        snapshot = run.snapshot(probe, args.epoch)
    elif args.epoch is not None:
        notes.append(f"{run.label}: no snapshots of probe {probe}, no class figures")
    drawn = figures.probe_figures(
        run.rows, probe, run.x, snapshot=snapshot, lr=views.lr_series(run.rows, run.x),
        metrics=args.metrics, layers=args.layers, label=run.label, notes=notes,
    )  # fmt: skip
    return _save(drawn, out)


def _overlay_layer(runs: Any, probe: str, args: Any, notes: list[str]) -> str | None:
    from nclightning.record import views

    orders = [views.layer_order(r.rows, probe) for r in runs]
    common = [lay for lay in orders[0] if all(lay in o for o in orders[1:])]
    wanted = args.overlay_layer or (args.layers[-1] if args.layers else None)
    if wanted is not None:
        if wanted not in common:
            raise ConfigurationError(
                f"overlay layer {wanted!r} is not logged by every run "
                f"(common layers: {', '.join(common) or 'none'})"
            )
        return wanted
    if not common:
        notes.append(f"the runs share no layer of the {probe} probe: no overlay figures")
        return None
    return "penultimate" if "penultimate" in common else common[-1]


def _overlay_plan(runs: Any, probes: Any, args: Any, notes: list[str]) -> dict[str, str]:
    """``{probe: layer}`` of the overlays: probes every run logged, at a layer they share."""
    shared = [p for p in probes[runs[0].label] if all(p in probes[r.label] for r in runs)]
    plan = {}
    for probe in shared:
        layer = _overlay_layer(runs, probe, args, notes)
        if layer is not None:
            plan[probe] = layer
    return plan


def _write_overlays(
    runs: Any, plan: dict[str, str], root: Path, args: Any, notes: list[str]
) -> list[Path]:
    from nclightning.record import figures, views
    from nclightning.record.groups import group_runs

    groups = group_runs(runs, args.group)
    members = {label: [(r.rows, r.x) for r in group] for label, group in groups.items()}
    written = []
    for probe, layer in plan.items():
        logged = set()
        for r in runs:
            logged |= set(views.metric_names(views.layer_history(r.rows, probe, r.x)))
        metrics = args.metrics or [m for m in views.DEFAULT_METRICS if m in logged]
        drawn = figures.overlay_figures(members, probe, layer, metrics, notes=notes)
        written += _save(drawn, root)
    return written
