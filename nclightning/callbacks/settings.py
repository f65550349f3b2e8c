"""The settings of :class:`~nclightning.callbacks.NeuralCollapseCallback`, typed and validated.

Four small frozen groups, one owner each, built from the callback's flat keyword arguments
(the form configs use) by :meth:`CallbackSettings.build`:

* :class:`ProbeSettings`: what is probed (the probes and their names, the samples, when);
* :class:`FeatureSettings`: how features are read (layers, classifier, pooling, layouts);
* :class:`PairFitSettings`: the pair fit (pairs, regularisation, coupling, normalisation);
* :class:`OutputSettings`: what is written (figures, snapshots, progress bar).

Every invalid value is refused here, when the callback is built, with one line naming the
argument, the value and the valid choices (:class:`~nclightning.errors.ConfigurationError`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch.utils.data import DataLoader

from nclightning.errors import ConfigurationError
from nclightning.record import keys

__all__ = [
    "OUTPUT_FORMATS",
    "POOLS",
    "SPLITS",
    "CallbackSettings",
    "FeatureSettings",
    "OutputSettings",
    "PairFitSettings",
    "ProbeSettings",
]

SPLITS = ("train", "val", "test")
POOLS = ("avg", "flatten", "mean", "cls", "last")
"""``avg``: mean over every position; ``flatten``: keep them; ``mean``: mean over the tokens
the batch's ``attention_mask`` keeps; ``cls``: token 0; ``last``: the last unpadded token."""
OUTPUT_FORMATS = ("auto", "NCHW", "NCL", "NLC")
WIDTH_MISMATCH = ("error", "pad", "skip")


def refuse(argument: str, value: Any, valid: str) -> ConfigurationError:
    """The one-line error of an invalid setting: argument, value, valid choices."""
    return ConfigurationError(
        f"NeuralCollapseCallback: invalid {argument}={value!r}; valid: {valid}"
    )


def _int(argument: str, value: Any, low: int, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = f"an integer >= {low}" + (" or None" if optional else "")
        raise refuse(argument, value, what)
    return int(value)


def _required(argument: str, value: Any, low: int) -> int:
    checked = _int(argument, value, low)
    assert checked is not None
    return checked


def _names(argument: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise refuse(argument, value, "a list of fnmatch patterns of module names")
    return tuple(value)


def _choice_map(argument: str, value: Any, choices: Sequence[str]) -> str | dict[str, str]:
    """One of ``choices``, or ``layer alias -> choice``."""
    valid = f"one of {', '.join(choices)}, or a mapping layer -> one of them"
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) and v in choices for k, v in value.items()):
            raise refuse(argument, dict(value), valid)
        return dict(value)
    if value not in choices:
        raise refuse(argument, value, valid)
    return value


@dataclass(frozen=True)
class ProbeSettings:
    """What is probed: ``probes`` (split names or ``DataLoader``\\ s) named ``names`` in keys,
    a fixed subset of ``max_samples``, every ``every_n_epochs`` epochs, ``num_classes``
    (``None``: from the model)."""

    probes: tuple[Any, ...]
    names: tuple[str, ...]
    ood_probe: DataLoader | None = None
    max_samples: int | None = None
    every_n_epochs: int = 1
    batch_size: int | None = None
    seed: int = 0
    num_classes: int | None = None

    @classmethod
    def build(
        cls,
        *,
        probe: Any,
        probes: Any,
        name: Any,
        ood_probe: Any,
        max_samples: Any,
        every_n_epochs: Any,
        batch_size: Any,
        seed: Any,
        num_classes: Any,
    ) -> ProbeSettings:
        chosen = _probe_list(probe, probes)
        names = _probe_names(chosen, name)
        if ood_probe is not None and not isinstance(ood_probe, DataLoader):
            raise refuse("ood_probe", ood_probe, "a DataLoader or None")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise refuse("seed", seed, "an integer")
        return cls(
            probes=chosen,
            names=names,
            ood_probe=ood_probe,
            max_samples=_int("max_samples", max_samples, 1, optional=True),
            every_n_epochs=_required("every_n_epochs", every_n_epochs, 1),
            batch_size=_int("batch_size", batch_size, 1, optional=True),
            seed=int(seed),
            num_classes=_int("num_classes", num_classes, 2, optional=True),
        )


def _probe_list(probe: Any, probes: Any) -> tuple[Any, ...]:
    valid = "'train', 'val', 'test' or a DataLoader"
    if probes is None:
        chosen: tuple[Any, ...] = (probe,)
    else:
        if isinstance(probes, (str, DataLoader)) or not isinstance(probes, Sequence) or not probes:
            raise refuse("probes", probes, f"a non-empty list of {valid}")
        if probe != "train":
            raise refuse("probe", probe, "left out when probes=[...] is given")
        chosen = tuple(probes)
    for p in chosen:
        if not isinstance(p, DataLoader) and p not in SPLITS:
            raise refuse("probe" if probes is None else "probes", p, valid)
    return chosen


def _probe_names(chosen: tuple[Any, ...], name: Any) -> tuple[str, ...]:
    loaders = [p for p in chosen if isinstance(p, DataLoader)]
    if loaders:
        given = [name] if isinstance(name, str) or name is None else list(name)
        if len(loaders) != len([n for n in given if n is not None]):
            raise refuse(
                "name",
                name,
                "one name per DataLoader probe (letters, digits, _), e.g. "
                "NeuralCollapseCallback(probe=loader, name='cifar10_c')",
            )
        it = iter(given)
        names: list[str] = [str(next(it)) if isinstance(p, DataLoader) else p for p in chosen]
    elif name is not None:
        if len(chosen) != 1 or not isinstance(name, str):
            raise refuse("name", name, "a name for a single probe, or None")
        names = [name]
    else:
        names = [str(p) for p in chosen]
    for n in names:
        try:
            keys.check_probe_name(n)
        except ConfigurationError as err:
            raise refuse("name", n, "letters, digits and _") from err
    if len(set(names)) != len(names):
        raise refuse("probes", names, "distinct probes (give DataLoaders distinct names)")
    return tuple(names)


@dataclass(frozen=True)
class FeatureSettings:
    """How features are read: ``layers`` (names, ``alias -> name``, ``"all"`` or ``None`` for
    the model's ``feature_layers``), filters, the classifier, ``pool`` and ``output_fmt``
    (each a choice or ``alias -> choice``), ``max_dim`` and the feature-cache budget."""

    layers: Any = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    classifier: str | None = "auto"
    pool: str | dict[str, str] = "avg"
    output_fmt: str | dict[str, str] = "auto"
    max_dim: int | None = None
    cache_budget: int | str = "auto"

    def pool_of(self, alias: str) -> str:
        return self.pool.get(alias, "avg") if isinstance(self.pool, Mapping) else self.pool

    def fmt_of(self, alias: str) -> str:
        fmt = self.output_fmt
        return fmt.get(alias, "auto") if isinstance(fmt, Mapping) else fmt

    @classmethod
    def build(
        cls,
        *,
        layers: Any,
        include: Any,
        exclude: Any,
        classifier: Any,
        pool: Any,
        output_fmt: Any,
        max_dim: Any,
        cache_budget: Any,
    ) -> FeatureSettings:
        valid_layers = "None (the model's feature_layers), 'all', a list of module names or a "
        valid_layers += "mapping alias -> module name"
        if isinstance(layers, str) and layers != "all":
            raise refuse("layers", layers, valid_layers)
        if isinstance(layers, Mapping):
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in layers.items()):
                raise refuse("layers", layers, valid_layers)
            layers = dict(layers)
        elif layers is not None and layers != "all":
            if not isinstance(layers, Sequence) or not all(isinstance(v, str) for v in layers):
                raise refuse("layers", layers, valid_layers)
            layers = tuple(layers)
        if classifier is not None and not isinstance(classifier, str):
            raise refuse("classifier", classifier, "'auto', a module name or None")
        if cache_budget != "auto" and (
            isinstance(cache_budget, bool) or not isinstance(cache_budget, int) or cache_budget < 0
        ):
            raise refuse("cache_budget", cache_budget, "'auto' or a number of bytes >= 0")
        return cls(
            layers=layers,
            include=_names("include", include),
            exclude=_names("exclude", exclude),
            classifier=classifier,
            pool=_choice_map("pool", pool, POOLS),
            output_fmt=_choice_map("output_fmt", output_fmt, OUTPUT_FORMATS),
            max_dim=_int("max_dim", max_dim, 1, optional=True),
            cache_budget=cache_budget,
        )


@dataclass(frozen=True)
class PairFitSettings:
    """The pair fit (docs/science.md §7): ``(h0, h)`` pairs, the model's regularisation, the
    coupling (``"fit"`` or a fixed positive number), normalisation, searched range, and what
    a pair of unequal widths does."""

    pairs: tuple[tuple[str, str], ...] | None = None
    lambda_W: float = 5e-4
    lambda_H: float = 5e-4
    coupling: float | str = "fit"
    normalization: str | None = None
    coupling_range: tuple[float, float] | None = None
    width_mismatch: str = "error"

    @classmethod
    def build(
        cls,
        *,
        pairs: Any,
        lambda_W: Any,
        lambda_H: Any,
        coupling: Any,
        normalization: Any,
        coupling_range: Any,
        width_mismatch: Any,
    ) -> PairFitSettings:
        from nclightning.perturbation import NORMALIZATIONS

        if pairs is not None:
            ok = isinstance(pairs, Sequence) and not isinstance(pairs, str)
            ok = ok and all(
                isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2
                and all(isinstance(a, str) for a in p)
                for p in pairs
            )  # fmt: skip
            if not ok:
                raise refuse("pairs", pairs, "a list of (h0, h) pairs of layer aliases")
            pairs = tuple((str(a), str(b)) for a, b in pairs)
        lam = {"lambda_W": lambda_W, "lambda_H": lambda_H}
        for arg, v in lam.items():  # 0 builds (a config without weight decay); Eq. 2's bound
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not (math.isfinite(v) and v >= 0)
            ):
                raise refuse(arg, v, "a finite number >= 0")
        if math.sqrt(float(lambda_W) * float(lambda_H)) >= 1:
            raise refuse(
                "lambda_W * lambda_H", float(lambda_W) * float(lambda_H),
                "below 1 (Eq. 2, docs/science.md §2)",
            )  # fmt: skip
        if coupling != "fit" and (
            isinstance(coupling, bool)
            or not isinstance(coupling, (int, float))
            or not (math.isfinite(coupling) and coupling > 0)
        ):
            raise refuse("coupling", coupling, "'fit' or a finite number > 0")
        if normalization is not None and normalization not in NORMALIZATIONS:
            raise refuse("normalization", normalization, f"one of {', '.join(NORMALIZATIONS)}")
        if coupling_range is not None:
            coupling_range = _range(coupling_range)
        if width_mismatch not in WIDTH_MISMATCH:
            raise refuse("width_mismatch", width_mismatch, f"one of {', '.join(WIDTH_MISMATCH)}")
        return cls(
            pairs=pairs,
            lambda_W=float(lambda_W),
            lambda_H=float(lambda_H),
            coupling=coupling if coupling == "fit" else float(coupling),
            normalization=normalization,
            coupling_range=coupling_range,
            width_mismatch=width_mismatch,
        )


def _range(value: Any) -> tuple[float, float]:
    valid = "(low, high) with 0 < low < high, both finite"
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise refuse("coupling_range", value, valid) from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise refuse("coupling_range", value, valid)
    return lo, hi


@dataclass(frozen=True)
class OutputSettings:
    """What a probe writes besides the logged row: the report's figures in W&B at the end of
    a fit (``log_figures``), the snapshot folder (``None``: the default, ``False``: none), the
    first raw features kept in snapshots, the progress bar (``None``: when the Trainer shows
    one)."""

    log_figures: bool = False
    snapshot_dir: str | Literal[False] | None = None
    snapshot_features: int = 0
    progress: bool | None = None

    @classmethod
    def build(
        cls, *, log_figures: Any, snapshot_dir: Any, snapshot_features: Any, progress: Any
    ) -> OutputSettings:
        if snapshot_dir is not None and snapshot_dir is not False:
            if not isinstance(snapshot_dir, (str, bytes)) and not hasattr(
                snapshot_dir, "__fspath__"
            ):
                raise refuse("snapshot_dir", snapshot_dir, "a folder, None or False")
            snapshot_dir = str(snapshot_dir)
        if progress is not None and not isinstance(progress, bool):
            raise refuse("progress", progress, "True, False or None")
        if not isinstance(log_figures, bool):
            raise refuse("log_figures", log_figures, "True or False")
        return cls(
            log_figures=log_figures,
            snapshot_dir=snapshot_dir,
            snapshot_features=_required("snapshot_features", snapshot_features, 0),
            progress=progress,
        )


@dataclass(frozen=True)
class CallbackSettings:
    """All settings of one callback, in their four groups."""

    probe: ProbeSettings
    features: FeatureSettings
    fit: PairFitSettings
    outputs: OutputSettings

    @classmethod
    def build(cls, **flat: Any) -> CallbackSettings:
        """From the callback's flat keyword arguments (each goes to its one group)."""
        groups: dict[str, tuple[Any, tuple[str, ...]]] = {
            "probe": (ProbeSettings, _fields(ProbeSettings.build)),
            "features": (FeatureSettings, _fields(FeatureSettings.build)),
            "fit": (PairFitSettings, _fields(PairFitSettings.build)),
            "outputs": (OutputSettings, _fields(OutputSettings.build)),
        }
        return cls(
            **{
                group: kind.build(**{k: flat[k] for k in fields})
                for group, (kind, fields) in groups.items()
            }
        )

    def record(self, name: str) -> SimpleRecord:
        """The view :func:`~nclightning.callbacks.outputs.settings_record` reads."""
        f = self.features
        return SimpleRecord(
            f.layers, f.include, f.exclude, self.fit.pairs, self.probe.max_samples,
            self.probe.seed, f.pool,
        )  # fmt: skip


@dataclass(frozen=True)
class SimpleRecord:
    """The settings that make a probe's state meaningful (checked on resume)."""

    layers: Any
    include: tuple[str, ...] | None
    exclude: tuple[str, ...] | None
    pairs: tuple[tuple[str, str], ...] | None
    max_samples: int | None
    seed: int
    pool: Any


def _fields(build: Any) -> tuple[str, ...]:
    import inspect

    return tuple(inspect.signature(build).parameters)
