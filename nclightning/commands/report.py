"""``nclightning report RUN_DIR [RUN_DIR ...]``: PNG figures from logged runs.

Sources, searched recursively under each ``RUN_DIR``:

* a CSV logger file ``metrics.csv`` (Lightning's ``CSVLogger``: header = union of keys, cells
  of keys a row did not log are empty), holding the NeuralCollapseCallback's keys
  ``nc/{split}/{layer}/{metric}``, ``nc/{split}/accuracy`` and ``pm/{h0}->{h}/{quantity}``
  with ``epoch`` = completed training epochs (0 = baseline probe before training);
* a snapshot directory of ``epoch_*.pt`` files (the callback's class moments); metrics are
  recomputed with :func:`nclightning.metrics.metrics_from_moments`.

When several ``metrics.csv`` files (versions) or snapshot directories are found, the most
recently modified one is used and the others are named on stderr; pass a ``version_N``
directory to choose another. A CSV is preferred over snapshots unless it has no ``nc/`` key
(or ``--source snapshots``).

Figures per run (``--split`` defaults to ``train`` when logged, else the first split found):

* ``metrics_{split}.png``: collapse metrics over epochs, one line per layer (log scale);
  for a layer-wise run, one line per stage (depth) of the deepest layer;
* ``depth_profile_{split}.png``: each metric against depth: for a layer-wise run (rows with a
  ``depth`` column) the deepest layer's last value per depth, otherwise the last logged
  value of each layer, in ``--layers`` order or the order described in :func:`layer_order`;
* ``pm_{h0}_to_{h}_{split}.png``: measured H0 and H metrics vs the perturbation model's H* at
  the last epoch the pair was logged;
* with several runs, ``overlay_{metric}_{split}.png`` in the output root: every run's curve
  of the metric at one layer (paper Fig. 3), each run labelled by its directory name.

Output goes to ``RUN_DIR/report`` for one run, ``./report/{label}/`` (plus overlays in
``./report``) for several, or ``--out DIR``. Written paths are printed, one per line.
User errors print one ``nclightning report: error: ...`` line and return 2.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PairSummary",
    "ReportError",
    "RunData",
    "depth_values",
    "find_source",
    "history",
    "last_values",
    "layer_order",
    "load_run",
    "main",
    "pm_pairs",
    "pm_summary",
    "read_metrics_csv",
    "read_snapshots",
    "scalars",
    "splits",
    "stage_history",
    "write_run_report",
]

PROG = "nclightning report"
SNAPSHOT_GLOB = "epoch_*.pt"
PM_EXTRA = ("beta", "objective", "grad_norm")
"""``pm/{pair}/...`` quantities that are not predicted collapse metrics."""

Row = dict[str, float]


class ReportError(Exception):
    """A user error: printed as one ``nclightning report: error:`` line, exit status 2."""


@dataclass
class RunData:
    """The rows of one run: ``rows[i]`` maps logged keys to floats (empty cells absent)."""

    label: str
    run_dir: Path
    source: Path  # the metrics.csv file or the snapshot directory
    rows: list[Row]


# ---------------------------------------------------------------------------------------------
# finding and reading sources
# ---------------------------------------------------------------------------------------------


def _natural_key(text: str) -> list:
    """Sort key treating digit runs as numbers (``blocks.2`` before ``blocks.10``)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t]


def _newest(paths: Sequence[Path]) -> Path:
    return max(paths, key=lambda p: (p.stat().st_mtime, _natural_key(str(p))))


def find_source(run_dir: Path, source: str = "auto") -> tuple[Path, list[Path]]:
    """The file or directory to read for ``run_dir`` and the other candidates ignored.

    ``source``: ``auto`` (CSV when it has ``nc/`` keys, else snapshots), ``csv`` or
    ``snapshots``. A ``.csv`` file given as ``run_dir`` is used as is. Raises
    :class:`ReportError` when ``run_dir`` is missing or holds neither.
    """
    if not run_dir.exists():
        raise ReportError(f"no such directory: {run_dir}")
    if run_dir.is_file() and run_dir.suffix == ".csv" and source != "snapshots":
        return run_dir, []
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory (expected a run directory or a .csv)")
    csvs = sorted(run_dir.rglob("metrics.csv")) if source in ("auto", "csv") else []
    snaps = []
    if source in ("auto", "snapshots"):
        snaps = sorted({p.parent for p in run_dir.rglob(SNAPSHOT_GLOB) if p.is_file()})
    if not csvs and not snaps:
        wanted = {
            "auto": "a metrics.csv (CSV logger output) or a snapshot directory of epoch_*.pt",
            "csv": "a metrics.csv (CSV logger output)",
            "snapshots": "a snapshot directory of epoch_*.pt files",
        }[source]
        raise ReportError(f"no metrics found under {run_dir}: expected {wanted}")
    if csvs:
        chosen = _newest(csvs)
        if source == "auto" and snaps and not _csv_has_nc_keys(chosen):
            chosen = _newest(snaps)
            return chosen, [p for p in snaps if p != chosen]
        return chosen, [p for p in csvs if p != chosen]
    chosen = _newest(snaps)
    return chosen, [p for p in snaps if p != chosen]


def _csv_has_nc_keys(path: Path) -> bool:
    with path.open(newline="") as f:
        header = next(csv.reader(f), [])
    return any(k.startswith("nc/") for k in header)


def read_metrics_csv(path: str | Path) -> list[Row]:
    """Rows of a CSV logger file as ``{key: float}``; empty and non-numeric cells are left out.

    Values are parsed with ``float`` (``nan``, ``inf`` included), so they are exactly the
    floats the logger wrote.
    """
    rows: list[Row] = []
    with Path(path).open(newline="") as f:
        for raw in csv.DictReader(f):
            row: Row = {}
            for key, cell in raw.items():
                if key is None or cell is None or cell == "":
                    continue
                try:
                    row[key] = float(cell)
                except ValueError:
                    continue
            rows.append(row)
    return rows


def read_snapshots(directory: str | Path) -> list[Row]:
    """One row per ``epoch_*.pt`` snapshot, in the logger's key format.

    Each layer's metrics are recomputed from its class moments
    (:func:`~nclightning.metrics.metrics_from_moments`); a pair's predicted metrics and beta
    become ``pm/{pair}/{name}`` keys. Rows are sorted by epoch.
    """
    import torch

    from nclightning.metrics import ClassMoments, metrics_from_moments

    directory = Path(directory)
    rows: list[Row] = []
    for path in sorted(directory.glob(SNAPSHOT_GLOB), key=lambda p: _natural_key(p.name)):
        try:
            snap = torch.load(path, map_location="cpu", weights_only=True)
            epoch, split, layers = int(snap["epoch"]), str(snap["split"]), snap["layers"]
        except Exception as err:
            raise ReportError(
                f"cannot read snapshot {path}: {err} (expected a dict with epoch, split, layers)"
            ) from err
        row: Row = {"epoch": float(epoch)}
        for alias, mom in layers.items():
            try:
                m = ClassMoments(
                    counts=mom["counts"].to(torch.float64),
                    means=mom["means"].to(torch.float64),
                    scatter=mom["scatter"].to(torch.float64),
                    class_ss=mom["class_ss"].to(torch.float64),
                )
            except (KeyError, ValueError, AttributeError) as err:
                raise ReportError(
                    f"snapshot {path}, layer {alias!r}: {err} "
                    "(expected counts, means, scatter, class_ss tensors)"
                ) from err
            for name, value in metrics_from_moments(m).items():
                row[f"nc/{split}/{alias}/{name}"] = float(value)
        for pair, pm in (snap.get("pairs") or {}).items():
            if pm.get("beta") is not None:
                row[f"pm/{pair}/beta"] = float(pm["beta"])
            for name, value in (pm.get("metrics") or {}).items():
                row[f"pm/{pair}/{name}"] = float(value)
        rows.append(row)
    rows.sort(key=lambda r: r["epoch"])
    return rows


# ---------------------------------------------------------------------------------------------
# from rows to plotting data
# ---------------------------------------------------------------------------------------------


def _x(row: Row) -> float | None:
    """A row's epoch (the ``step`` when a row has no ``epoch``)."""
    return row.get("epoch", row.get("step"))


def scalars(rows: Sequence[Row], prefix: str = "") -> dict[str, list[tuple[float, float]]]:
    """``{key: [(epoch, value), ...]}`` for keys starting with ``prefix``, in row order."""
    out: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        x = _x(row)
        if x is None:
            continue
        for key, value in row.items():
            if key.startswith(prefix) and key not in ("epoch", "step"):
                out.setdefault(key, []).append((x, value))
    return out


def _split_key(key: str) -> tuple[str, str, str] | None:
    """``nc/{split}/{layer}/{metric}`` -> ``(split, layer, metric)``; None for other keys."""
    parts = key.split("/")
    if len(parts) < 4 or parts[0] != "nc":
        return None
    return parts[1], "/".join(parts[2:-1]), parts[-1]


def splits(rows: Sequence[Row]) -> list[str]:
    """Splits with per-layer ``nc/`` keys: ``train``, ``val``, ``test`` first, then others."""
    found = {p[0] for row in rows for k in row if (p := _split_key(k))}
    rank = {"train": 0, "val": 1, "test": 2}
    return sorted(found, key=lambda s: (rank.get(s, 3), s))


_FIRST = ("input", "x", "h0")
_LAST = ("penultimate", "features", "deepest")


def layer_order(rows: Sequence[Row], split: str) -> list[str]:
    """Layers of ``split`` in order of first appearance in ``rows``.

    A CSV logger sorts its columns alphabetically, so layers first logged in the same row are
    ordered by a heuristic: ``input``/``x``/``h0`` first, ``penultimate``/``features``/
    ``deepest`` last, the rest in natural order (``blocks.2`` before ``blocks.10``). Pass
    ``--layers`` for any other order.
    """
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        for key in row:
            p = _split_key(key)
            if p and p[0] == split:
                first.setdefault(p[1], i)

    def rank(layer: str):
        group = 0 if layer in _FIRST else 2 if layer in _LAST else 1
        return (first[layer], group, _natural_key(layer))

    return sorted(first, key=rank)


def history(rows: Sequence[Row], split: str, layers: Sequence[str] | None = None):
    """``History`` (see :mod:`nclightning.plotting`) of ``split``: ``{layer: {metric: series}}``."""
    from nclightning.plotting import history_from_scalars

    flat = history_from_scalars(scalars(rows, f"nc/{split}/"), split)
    order = list(layers) if layers is not None else layer_order(rows, split)
    return {layer: flat[layer] for layer in order if layer in flat}


def last_values(hist) -> dict[str, dict[str, float]]:
    """``{layer: {metric: last logged value}}`` of a ``History``."""
    return {
        layer: {m: float(series[-1][1]) for m, series in metrics.items() if series}
        for layer, metrics in hist.items()
    }


def depth_values(rows: Sequence[Row], split: str) -> dict[str, dict[str, float]]:
    """Layer-wise run: ``{depth: {metric: value}}``, the last value logged at each depth.

    Uses rows with a ``depth`` cell and the layer ``deepest`` (or, without it, the last layer
    such rows have). Depths are sorted numerically; empty when no row has a ``depth``.
    """
    staged = [r for r in rows if "depth" in r and math.isfinite(r["depth"])]
    if not staged:
        return {}
    layers = layer_order(staged, split)
    if not layers:
        return {}
    layer = "deepest" if "deepest" in layers else layers[-1]
    head = f"nc/{split}/{layer}/"
    by_depth: dict[float, dict[str, float]] = {}
    for row in staged:
        for key, value in row.items():
            if key.startswith(head) and "/" not in key[len(head) :]:
                by_depth.setdefault(float(row["depth"]), {})[key[len(head) :]] = value
    return {(str(int(d)) if d.is_integer() else str(d)): by_depth[d] for d in sorted(by_depth)}


def stage_history(rows: Sequence[Row], split: str):
    """Layer-wise run: ``History`` with one pseudo-layer ``"depth D"`` per stage.

    Each holds the deepest layer's series of the rows logged at that depth (see
    :func:`depth_values` for the layer choice); empty when no row has a ``depth``.
    """
    staged = [r for r in rows if "depth" in r and math.isfinite(r["depth"])]
    layers = layer_order(staged, split)
    if not layers:
        return {}
    layer = "deepest" if "deepest" in layers else layers[-1]
    out = {}
    for d in sorted({r["depth"] for r in staged}):
        series = history([r for r in staged if r["depth"] == d], split, [layer]).get(layer)
        if series:
            out[f"depth {int(d) if float(d).is_integer() else d}"] = series
    return out


def pm_pairs(rows: Sequence[Row]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``{"h0->h": {quantity: [(epoch, value), ...]}}`` from ``pm/{pair}/{quantity}`` keys."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for key, series in scalars(rows, "pm/").items():
        pair, sep, quantity = key[3:].rpartition("/")
        if sep and pair:
            out.setdefault(pair, {})[quantity] = series
    return out


def _value_at(series, epoch: float) -> float:
    """The last value logged at ``epoch``, else the last one before it; NaN when none."""
    at = [v for x, v in series if x == epoch]
    if at:
        return at[-1]
    before = [v for x, v in series if x < epoch]
    return before[-1] if before else math.nan


@dataclass
class PairSummary:
    """A perturbation-model pair at one epoch: measured H0, H metrics and predicted H*."""

    epoch: float
    beta: float
    h0: dict[str, float]
    h: dict[str, float]
    h_star: dict[str, float]


def pm_summary(rows: Sequence[Row], split: str) -> dict[str, PairSummary]:
    """Each ``pm/{h0}->{h}`` pair at the last epoch it predicted a metric.

    Measured values are the ``nc/{split}/{h0}/...`` and ``nc/{split}/{h}/...`` logged at that
    epoch (else the last ones before it; NaN when none).
    """
    out: dict[str, PairSummary] = {}
    for pair, quantities in pm_pairs(rows).items():
        predicted = {q: s for q, s in quantities.items() if q not in PM_EXTRA and s}
        if not predicted:
            continue
        epoch = max(x for s in predicted.values() for x, _ in s)
        h0_layer, _, h_layer = pair.partition("->")
        h0, h = (
            {m: _value_at(s, epoch) for m, s in history(rows, split, [lay]).get(lay, {}).items()}
            for lay in (h0_layer, h_layer)
        )
        out[pair] = PairSummary(
            epoch=epoch,
            beta=_value_at(quantities.get("beta", ()), epoch),
            h0=h0,
            h=h,
            h_star={q: _value_at(s, epoch) for q, s in predicted.items()},
        )
    return out


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("->", "_to_")).strip("_") or "run"


def load_run(run_dir: Path, label: str, source: str = "auto") -> RunData:
    """Find and parse a run's metrics; notes about ignored candidates go to stderr."""
    chosen, ignored = find_source(run_dir, source)
    if ignored:
        print(
            f"{PROG}: {run_dir}: using {chosen} (newest); ignoring "
            + ", ".join(str(p) for p in ignored),
            file=sys.stderr,
        )
    rows = read_snapshots(chosen) if chosen.is_dir() else read_metrics_csv(chosen)
    if not splits(rows):
        what = "snapshots" if chosen.is_dir() else "CSV"
        raise ReportError(
            f"{chosen}: no collapse metrics in this {what} (expected NeuralCollapseCallback "
            "keys nc/{split}/{layer}/{metric}, e.g. nc/train/penultimate/nc1)"
        )
    return RunData(label=label, run_dir=run_dir, source=chosen, rows=rows)


def _choose_split(run: RunData, split: str | None) -> str:
    found = splits(run.rows)
    if split is None:
        return "train" if "train" in found else found[0]
    if split not in found:
        raise ReportError(
            f"{run.source}: no nc/{split}/... keys (splits logged: {', '.join(found)})"
        )
    return split


def _check_names(kind: str, wanted: Sequence[str] | None, available: Sequence[str], src) -> None:
    missing = [w for w in wanted or () if w not in available]
    if missing:
        raise ReportError(
            f"{src}: {kind} {', '.join(missing)} not logged (available: {', '.join(available)})"
        )


def _prepare(run: RunData, split: str | None, metrics, layers):
    """Validated ``(split, history, metrics to draw)`` of a run; :class:`ReportError` if not."""
    from nclightning.plotting import DEFAULT_METRICS

    split = _choose_split(run, split)
    _check_names("layer(s)", layers, layer_order(run.rows, split), run.source)
    hist = history(run.rows, split, layers)
    logged = _metric_names(hist)
    _check_names("metric(s)", metrics, logged, run.source)
    chosen = list(metrics) if metrics else [m for m in DEFAULT_METRICS if m in logged]
    return split, hist, chosen or logged


def write_run_report(
    run: RunData,
    out: Path,
    split: str | None = None,
    metrics: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
) -> list[Path]:
    """Write one run's figures into ``out``; return the paths written."""
    from nclightning import plotting

    split, hist, chosen = _prepare(run, split, metrics, layers)
    written: list[Path] = []
    name = f"{run.label} ({split})"

    by_depth = depth_values(run.rows, split)
    stages = stage_history(run.rows, split) if len(by_depth) >= 2 else {}
    if stages:  # layer-wise training: one line per stage of the deepest layer
        fig = plotting.metric_curves(stages, chosen, title=f"{name}: deepest layer per stage")
    else:
        fig = plotting.metric_curves(hist, chosen, title=f"{name}: collapse metrics per layer")
    written.append(plotting.save_figure(fig, out / f"metrics_{_safe(split)}.png"))

    if len(by_depth) >= 2:
        xlabel, title = "depth (hidden layers)", f"{name}: deepest features after each stage"
    else:
        last = max(x for series in _all_series(hist) for x, _ in series)
        by_depth = last_values(hist)
        xlabel, title = "layer", f"{name}: last logged values (epoch {last:g})"
    # a profile needs a metric at two depths at least (nc3/nc4 exist for the last layer only)
    profile = [m for m in chosen if sum(m in v for v in by_depth.values()) >= 2]
    if profile:
        fig = plotting.depth_profile(by_depth, profile, xlabel=xlabel, title=title)
        written.append(plotting.save_figure(fig, out / f"depth_profile_{_safe(split)}.png"))
    else:
        print(
            f"{PROG}: {run.label}: no metric logged for two layers, no depth profile",
            file=sys.stderr,
        )

    for pair, pm in pm_summary(run.rows, split).items():
        pm_metrics = [m for m in (metrics or plotting.METRIC_ORDER) if m in pm.h_star]
        if not pm_metrics:
            continue
        h0_layer, _, h_layer = pair.partition("->")
        fig = plotting.measured_vs_predicted(
            pm.h0,
            pm.h,
            pm.h_star,
            pm_metrics,
            beta=pm.beta,
            labels=(
                f"H0 = {h0_layer} (measured)",
                f"H = {h_layer} (measured)",
                "H* (perturbation model)",
            ),
            title=f"{run.label}: {pair}, epoch {pm.epoch:g}, {split} split",
        )
        written.append(plotting.save_figure(fig, out / f"pm_{_safe(pair)}_{_safe(split)}.png"))
    return written


def _all_series(hist):
    return [s for metrics in hist.values() for s in metrics.values() if s]


def _metric_names(hist) -> list[str]:
    from nclightning.plotting import METRIC_ORDER

    names = {m for metrics in hist.values() for m in metrics}
    return [m for m in METRIC_ORDER if m in names] + sorted(names - set(METRIC_ORDER))


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    """Directory names, extended with parent names until they are unique."""
    parts = [(p.parent if p.is_file() else p).resolve().parts for p in run_dirs]
    depth = [1] * len(parts)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        dupes = {lab for lab in labels if labels.count(lab) > 1}
        grow = [i for i, lab in enumerate(labels) if lab in dupes and depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: dict[str, int] = {}
    out = []
    for lab in labels:  # identical paths given twice
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab}-{seen[lab]}")
    return out


def _overlay_layer(histories: Sequence[dict], wanted: str | None) -> str | None:
    """The layer the overlays show (None, with a note, when the runs share none)."""
    common = [lay for lay in histories[0] if all(lay in h for h in histories[1:])]
    if wanted is not None:
        if wanted not in common:
            raise ReportError(
                f"overlay layer {wanted!r} is not logged by every run "
                f"(common layers: {', '.join(common) or 'none'})"
            )
        return wanted
    if not common:
        print(f"{PROG}: the runs share no layer: no overlay figures", file=sys.stderr)
        return None
    return "penultimate" if "penultimate" in common else common[-1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Write PNG figures (collapse metrics over epochs, depth profile, measured "
        "vs perturbation-model metrics; with several runs, overlays) from runs logged by "
        "the CSV logger or the callback's snapshot directory.",
    )
    p.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="directory searched recursively for metrics.csv or epoch_*.pt (or a metrics.csv file)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: RUN_DIR/report for one run, ./report for several)",
    )
    p.add_argument(
        "--split",
        default=None,
        help="probe split to plot: train, val, test (default: train when logged)",
    )
    p.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        metavar="METRIC",
        help="metrics to plot (default: nc1 nc1_tilde cdnv nc2_etf nc3 nc4, those logged)",
    )
    p.add_argument(
        "--layers",
        nargs="+",
        default=None,
        metavar="LAYER",
        help="layers to plot, in this order (default: all, shallow to deep)",
    )
    p.add_argument(
        "--overlay-layer",
        default=None,
        help="layer of the multi-run overlays (default: the last of --layers, "
        "else penultimate, else the deepest layer all runs share)",
    )
    p.add_argument(
        "--source",
        choices=("auto", "csv", "snapshots"),
        default="auto",
        help="what to read (default: metrics.csv with nc/ keys, else snapshots)",
    )
    return p


def main(argv: list[str]) -> int:
    """Entry point of ``nclightning report``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        written = _run(args)
    except ReportError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def _run(args: argparse.Namespace) -> list[Path]:
    """Load and validate every run first, so a user error writes no figure at all."""
    from nclightning import plotting

    labels = _labels(args.run_dirs)
    runs = [load_run(d, lab, args.source) for d, lab in zip(args.run_dirs, labels)]
    prepared = [_prepare(r, args.split, args.metrics, args.layers) for r in runs]
    several = len(runs) > 1
    layer = split = None
    if several:
        split = prepared[0][0]
        histories = [history(r.rows, _choose_split(r, split)) for r in runs]
        wanted = args.overlay_layer or (args.layers[-1] if args.layers else None)
        layer = _overlay_layer(histories, wanted)
    first = args.run_dirs[0]
    root = (
        args.out
        if args.out is not None
        else (
            Path("report") if several else (first.parent if first.is_file() else first) / "report"
        )
    )
    written: list[Path] = []
    for run in runs:
        out = root / _safe(run.label) if several else root
        written += write_run_report(run, out, args.split, args.metrics, args.layers)
    if layer is not None:
        names = {m for h in histories for m in _metric_names(h)}
        chosen = args.metrics or [m for m in plotting.DEFAULT_METRICS if m in names]
        runs_by_label = {r.label: h for r, h in zip(runs, histories)}
        for metric in chosen:
            fig = plotting.run_overlay(
                runs_by_label, metric, layer, title=f"{metric} across runs ({split} split)"
            )
            written.append(
                plotting.save_figure(fig, root / f"overlay_{_safe(metric)}_{_safe(split)}.png")
            )
    return written
