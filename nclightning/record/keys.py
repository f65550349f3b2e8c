"""The names of everything a probe records: one key, one meaning, everywhere.

The same keys are CSV columns, W&B metrics, ``trainer.callback_metrics`` entries and the
``row`` of a snapshot file:

* ``nc-{probe}/{layer}/{metric}``: a collapse metric of one layer's features on one probe
  (``metric`` in :data:`nclightning.metrics.METRIC_KEYS`, docs/science.md §1, §8);
* ``nc-{probe}/accuracy``: the classifier's accuracy on the probe's samples;
* ``pm-{probe}-{h0}->{h}/{quantity}``: the perturbation-model fit of the pair ``(h0, h)`` on
  that probe (docs/science.md §7): :data:`PAIR_QUANTITIES`, ``predicted/{metric}`` (the
  metrics of the model's ``H*``), ``residual/{metric}`` (``log10(predicted / measured)``),
  ``baseline/{name}/{metric}`` (``log10(baseline / measured)`` of a model-free baseline,
  :data:`PAIR_BASELINES`), ``skill/{metric}`` (``|residual|`` minus the smallest
  ``|baseline|``, decades) and ``measured/norm_ratio`` (RMS ``||H|| / ||H0||``). Every pair
  key is free of the scale of either layer except :data:`PAIR_SCALE_KEYS`;
* ``epochs_trained``: completed training epochs when the probe ran (0: before training).
  Lightning's own ``epoch`` column keeps its meaning (the 0-based index of the running epoch)
  and probe rows never write it.

W&B groups a workspace's panels by the part of a key before its first ``/``, so the default
workspace has one section per probe (``nc-train``, ``nc-val``) and one per pair and probe
(``pm-train-h0->penultimate``).

Probe names are letters, digits and ``_`` (:func:`check_probe_name`); layer aliases may hold
anything but ``/`` and ``->`` (:func:`check_layer_alias`). That keeps every key parseable by
:func:`parse_key`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from nclightning.errors import ConfigurationError

__all__ = [
    "ACCURACY",
    "DEPTH",
    "EPOCHS_TRAINED",
    "PAIR_BASELINES",
    "PAIR_QUANTITIES",
    "PAIR_SCALE_KEYS",
    "PAIR_STATUS",
    "STEP",
    "Key",
    "accuracy_key",
    "check_layer_alias",
    "check_probe_name",
    "layer_key",
    "pair_baseline",
    "pair_key",
    "pair_name",
    "parse_key",
    "split_pair",
    "status_name",
]

EPOCHS_TRAINED = "epochs_trained"
"""Completed training epochs at the time of a probe (0 = the baseline before training)."""

STEP = "step"
"""Lightning's global step (optimizer steps taken), written by every logger row."""

DEPTH = "depth"
"""Layer-wise training: the number of hidden layers of the probed network."""

ACCURACY = "accuracy"

PAIR_STATUS = {"fitted": 0, "not_more_collapsed": 1, "identical": 2, "fixed": 3}
"""Numeric codes of a pair fit's ``status`` (loggers take numbers):

* ``fitted``: a finite coupling whose ``H*`` has the measured ``nc1_tilde`` of ``H``;
* ``not_more_collapsed``: ``H`` is no more collapsed than ``H0``; no finite coupling reaches
  it, the closest the model comes is ``H* = H0`` (coupling infinite);
* ``identical``: ``H`` equals ``H0``; the coupling is infinite and every residual zero;
* ``fixed``: no fit: ``H*`` at the coupling the callback was given (``coupling=<number>``).

The names are :data:`nclightning.perturbation.STATUSES`, in this order."""

PAIR_QUANTITIES = (
    "coupling",
    "beta",
    "scale",
    "status",
    "perturbative",
    "linearisation_error",
    "objective",
    "grad_norm",
    "converged",
)
"""Scalars of a pair fit besides ``predicted/{metric}`` and ``residual/{metric}``:
``coupling`` (beta / lambda_H after the scale normalisation, the scale-free number),
``beta`` (of the normalised problem), ``scale`` (the factor applied to H0),
``status`` (:data:`PAIR_STATUS`), ``perturbative`` (1 when Eq. 5 errs by at most 10 % and
``beta >= 10 max(1, lambda_H)``, docs/science.md §5.6), ``linearisation_error`` (that relative
error), the solver's ``objective``, ``grad_norm``, ``converged``."""

PAIR_BASELINES = ("h0", "ratio", "etf")
"""Model-free predictions a pair fit is judged against (docs/science.md §7.6): ``h0`` (``H0``'s
metric), ``ratio`` (``H0``'s metric scaled by ``nc1_tilde(H) / nc1_tilde(H0)``, its square
root for distances), ``etf`` (``cdnv`` only: ``(K-1)/(2K) nc1_tilde(H)``). The names are
:data:`nclightning.perturbation.BASELINES`."""

PAIR_SCALE_KEYS = ("scale", "measured/norm_ratio")
"""The pair quantities that move when a layer is rescaled without changing the network's
function: ``scale`` (in ``H0``'s units) and the measured norm ratio. Every other pair key is
scale free (with the ``"total"`` and ``"between"`` normalisations, docs/science.md §7.4)."""

_PROBE_NAME = re.compile(r"[A-Za-z0-9_]+")


def check_probe_name(name: str) -> str:
    """``name`` if it can be part of a key (letters, digits, ``_``), else ConfigurationError."""
    if not isinstance(name, str) or not _PROBE_NAME.fullmatch(name):
        raise ConfigurationError(
            f"probe name {name!r} must be letters, digits and '_' only (it becomes part of "
            "every logged key, e.g. nc-train/penultimate/nc1)"
        )
    return name


def check_layer_alias(alias: str) -> str:
    """``alias`` if it can be part of a key (no ``/``, no ``->``), else ConfigurationError."""
    if not isinstance(alias, str) or not alias or "/" in alias or "->" in alias:
        raise ConfigurationError(
            f"layer alias {alias!r} must be a non-empty string without '/' or '->' "
            "(it becomes part of logged keys, e.g. nc-train/{alias}/nc1)"
        )
    return alias


def layer_key(probe: str, layer: str, metric: str) -> str:
    """``nc-{probe}/{layer}/{metric}``."""
    return f"nc-{probe}/{layer}/{metric}"


def accuracy_key(probe: str) -> str:
    """``nc-{probe}/accuracy``."""
    return f"nc-{probe}/{ACCURACY}"


def pair_name(h0: str, h: str) -> str:
    """``{h0}->{h}``: the name of a layer pair in keys, figures and snapshot files."""
    return f"{h0}->{h}"


def split_pair(pair: str) -> tuple[str, str]:
    """``(h0, h)`` of a pair name ``{h0}->{h}``."""
    h0, sep, h = pair.partition("->")
    if not sep or not h0 or not h:
        raise ValueError(f"not a pair name (h0->h): {pair!r}")
    return h0, h


def pair_key(probe: str, pair: str, quantity: str) -> str:
    """``pm-{probe}-{pair}/{quantity}`` (``quantity`` may be ``predicted/nc1`` etc.)."""
    return f"pm-{probe}-{pair}/{quantity}"


def pair_baseline(name: str, metric: str) -> str:
    """``baseline/{name}/{metric}``: the quantity of a baseline's residual (:func:`pair_key`)."""
    return f"baseline/{name}/{metric}"


def status_name(code: float) -> str:
    """The :data:`PAIR_STATUS` name of a logged numeric ``status``."""
    for name, value in PAIR_STATUS.items():
        if value == code:
            return name
    raise ValueError(f"unknown pair status code {code!r}; known: {PAIR_STATUS}")


@dataclass(frozen=True)
class Key:
    """A parsed probe key. ``layer`` is set for ``kind="layer"``, ``pair`` for ``"pair"``."""

    kind: Literal["layer", "accuracy", "pair"]
    probe: str
    quantity: str
    layer: str | None = None
    pair: str | None = None


def parse_key(key: str) -> Key | None:
    """The :class:`Key` of a probe key, ``None`` for any other key (``train/loss``, ``epoch``)."""
    head, sep, rest = key.partition("/")
    if not sep or not rest:
        return None
    if head.startswith("nc-"):
        probe = head[3:]
        if not _PROBE_NAME.fullmatch(probe):
            return None
        if rest == ACCURACY:
            return Key("accuracy", probe, ACCURACY)
        layer, sep, metric = rest.rpartition("/")
        if not sep or not layer or not metric:
            return None
        return Key("layer", probe, metric, layer=layer)
    if head.startswith("pm-"):
        probe, sep, pair = head[3:].partition("-")
        if not sep or not _PROBE_NAME.fullmatch(probe) or "->" not in pair:
            return None
        return Key("pair", probe, rest, pair=pair)
    return None
