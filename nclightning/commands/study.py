"""``nclightning study wd``: the weight-decay study of the paper's Fig. 3, run in sequence.

docs/science.md §6: starting from a config's weight decays (feature layers ``w``, classifier
``c``), train the baseline and four variants — classifier decay x2 and x0, feature-layer
decay x2 and x0 — for each loss (MSE with a bias-free classifier, CE with a bias). Each run is
an ordinary ``nclightning fit`` of the config with overrides, so its logs land where the
config's loggers put them (the bundled study configs name each run after its loss and decays
by interpolation). ``--seeds N`` trains every variant with the seeds ``S, S+1, ..., S+N-1``
(``S``: the config's ``seed_everything``, 0 when unset): a direction claimed from the study
needs them (docs/science.md §6.3). Seeds of one variant share its log folder
(``version_0..N-1``) and differ only in ``seed_everything``, so ``nclightning report`` groups
them into one band (mean and range, ``record.groups``). Afterwards
``nclightning report RUN_DIR ...`` overlays the runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Variant", "main", "variants"]

PROG = "nclightning study"


@dataclass(frozen=True)
class Variant:
    """One run of the study: its label and the overrides it adds to the config."""

    label: str
    loss: str
    weight_decay: float
    classifier_weight_decay: float

    def overrides(self) -> list[str]:
        return [
            "--model.loss",
            self.loss,
            "--model.bias",
            "true" if self.loss == "ce" else "false",
            "--model.weight_decay",
            repr(self.weight_decay),
            "--model.classifier_weight_decay",
            repr(self.classifier_weight_decay),
        ]


def variants(
    weight_decay: float,
    classifier_weight_decay: float,
    losses: Sequence[str] = ("mse", "ce"),
    factors: Sequence[float] = (2.0, 0.0),
) -> list[Variant]:
    """The baseline and, per factor, the classifier-only and feature-only variants, per loss."""
    w, c = weight_decay, classifier_weight_decay
    out = []
    for loss in losses:
        out.append(Variant(f"{loss}/baseline", loss, w, c))
        for f in factors:
            out.append(Variant(f"{loss}/classifier_x{f:g}", loss, w, f * c))
        for f in factors:
            out.append(Variant(f"{loss}/features_x{f:g}", loss, f * w, c))
    return out


def _base_settings(config: str) -> tuple[float, float, int]:
    """The config's (weight_decay, classifier_weight_decay, seed), interpolations resolved."""
    from nclightning.cli import run_trainer_cli

    cli = run_trainer_cli(["--config", config, "--trainer.logger", "false"], run=False)
    hp = cli.model.hparams
    c = hp.weight_decay if hp.classifier_weight_decay is None else hp.classifier_weight_decay
    seed = cli.config.get("seed_everything")
    return float(hp.weight_decay), float(c), int(seed) if isinstance(seed, int) else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="study", required=True)
    wd = sub.add_parser("wd", help="weight-decay study (paper Fig. 3)")
    wd.add_argument("--config", required=True, help="base config (e.g. wd_study_digits.yaml)")
    wd.add_argument("--losses", nargs="+", default=["mse", "ce"], choices=["mse", "ce"])
    wd.add_argument(
        "--factors",
        nargs="+",
        type=float,
        default=[2.0, 0.0],
        help="multipliers of the classifier's / the feature layers' decay",
    )
    wd.add_argument("--only", nargs="+", metavar="LABEL", help="run only these variant labels")
    wd.add_argument(
        "--seeds", type=int, default=1, metavar="N",
        help="train every variant with N seeds (the config's seed_everything and the next N-1)",
    )  # fmt: skip
    wd.add_argument("--dry-run", action="store_true", help="print the runs, train nothing")
    args, extra = parser.parse_known_args(argv)  # extra: overrides passed on to every run
    from nclightning.cli import resolve_config_args, run_trainer_cli

    if args.seeds < 1:
        message = f"--seeds must be a positive integer, got {args.seeds}"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    config = resolve_config_args(["--config", args.config])[1]
    w, c, seed0 = _base_settings(config)
    runs = variants(w, c, tuple(args.losses), tuple(args.factors))
    if args.only:
        unknown = sorted(set(args.only) - {v.label for v in runs})
        if unknown:
            print(
                f"{PROG}: error: unknown variant(s) {', '.join(unknown)}; choose from "
                f"{', '.join(v.label for v in runs)}",
                file=sys.stderr,
            )
            return 2
        runs = [v for v in runs if v.label in args.only]
    folders = []
    plan = [(v, seed0 + k) for v in runs for k in range(args.seeds)]
    for i, (v, seed) in enumerate(plan, 1):
        cmd = ["fit", "--config", config, *v.overrides(), *extra]
        if args.seeds > 1:
            cmd += ["--seed_everything", str(seed)]
        label = f"{v.label} seed {seed}" if args.seeds > 1 else v.label
        print(f"{PROG}: [{i}/{len(plan)}] {label}: nclightning {' '.join(cmd)}", flush=True)
        if not args.dry_run:
            log_dir = run_trainer_cli(cmd).trainer.log_dir
            if log_dir is not None:
                folders.append(log_dir)
    if folders:
        print(f"{PROG}: {len(folders)} runs; overlay them: nclightning report {' '.join(folders)}")
    return 0
