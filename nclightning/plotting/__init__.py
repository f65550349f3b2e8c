"""Figures of neural-collapse runs: plain Python data in, :class:`matplotlib.figure.Figure` out.

No torch or Lightning import, never pyplot: figures are built on an Agg canvas, nothing is
registered globally, an unreferenced figure is garbage-collected; :func:`save_figure` writes
a PNG, :func:`figure_png` gives PNG bytes (W&B images), both release the figure. Used by
``nclightning report`` and the callback through :mod:`nclightning.record.figures`.

Data shapes shared by every function here:

* ``Series``: ``[(x, value), ...]`` in logging order; ``x`` is completed training epochs (or
  epochs since zero training error, or a depth). Values may be NaN, 0 or infinite: on a log
  axis NaN breaks a line, a value ``<= 0`` breaks it and is marked on a grey band at the
  bottom of the panel, ``+inf`` on one at the top.
* ``History``: ``{line: {metric: Series}}``, a line being a layer (shallow to deep, in the
  dict's order) or a probe; metrics are those of docs/science.md §1 and §8.
* Matrices: array-likes ``[K, K]``; per-class values: ``[K]``.

Modules: :mod:`.curves` (metrics over epochs, overlays and seed bands, the learning-rate
strip), :mod:`.profiles` (depth profile, per-class variance bars), :mod:`.matrices`
(cosine matrix beside the simplex ETF's, CDNV heatmap), :mod:`.pairs` (perturbation-model
fit of a layer pair), :mod:`._layout` (shared grid, bands, captions). Panels with nothing to
show are never drawn: the caption under the figure names what was left out.
"""

from nclightning.plotting._layout import figure_png, save_figure
from nclightning.plotting._titles import METRIC_TITLES
from nclightning.plotting.curves import band_stats, metric_curves, overlay
from nclightning.plotting.matrices import cdnv_heatmap, cosine_vs_etf, etf_cosines
from nclightning.plotting.pairs import measured_vs_predicted
from nclightning.plotting.profiles import class_variance_bars, depth_profile

__all__ = [
    "METRIC_TITLES",
    "band_stats",
    "cdnv_heatmap",
    "class_variance_bars",
    "cosine_vs_etf",
    "depth_profile",
    "etf_cosines",
    "figure_png",
    "measured_vs_predicted",
    "metric_curves",
    "overlay",
    "save_figure",
]
