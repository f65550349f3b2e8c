"""The ``nclightning`` command line.

``nclightning fit|validate|test|predict --config FILE [--dotted.key VALUE ...]`` runs
:class:`~nclightning.cli.lightning_cli.NCLightningCLI`, a LightningCLI in jsonargparse's
``omegaconf+`` parser mode: YAML files may interpolate (``${model.init_args.lr}``) and the
interpolations are resolved *after* command-line overrides are merged, so an override flows
through every value that refers to it.

``nclightning theory|report|study|measure ...`` are dispatched to :mod:`nclightning.commands`
before LightningCLI sees the arguments (``theory`` and ``report`` never import Lightning).

Choices made for users:

* ``--config NAME`` that is not an existing file but names a bundled config
  (``digits_mlp.yaml`` or ``digits_mlp``) loads the bundled one, so an installed package runs
  its embedded default job from any directory.
* Every user error (a config error, missing data, a bad callback setting raised during the
  run) prints ``nclightning: error: ...`` in a line or two (the problem, the valid choices or
  a "did you mean", where ``--help`` is) and exits with status 2; ``NCL_DEBUG=1`` shows the
  traceback. A run that fails before its first training step leaves no version folder and
  no W&B run behind.
* W&B never hangs or crashes a run (:mod:`nclightning.loggers.wandb_logger`): no key means
  offline mode; an unreachable or failing service means offline mode within a bounded time;
  the end of the run says where it went and how to upload it.
* CPU threads fit the machine and the model (:mod:`nclightning.runtime`).
* ``--ckpt_path`` resumes into the same version folder and W&B run; ``metrics.csv`` ends up
  as an uninterrupted run's (:mod:`nclightning.loggers.resume`).
* The run's config is saved next to the first logger's files; a config already there is
  never overwritten (the new one gets a numbered name) and is also logged to W&B runs.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Any

from nclightning.cli.config_files import (
    CONFIG_DIR,
    bundled_configs,
    check_config_files,
    resolve_config_args,
)

__all__ = [
    "COMMANDS",
    "CONFIG_DIR",
    "TRAINER_COMMANDS",
    "bundled_configs",
    "ensure_wandb_mode",
    "finish_wandb_runs",
    "main",
    "run_trainer_cli",
    "wandb_api_key_available",
]

COMMANDS = {
    "theory": ("nclightning.commands.theory", "numerical checks of the perturbation theory"),
    "report": ("nclightning.commands.report", "PNG figures from logged runs"),
    "study": ("nclightning.commands.study", "the paper's weight-decay study, run in sequence"),
    "measure": ("nclightning.commands.measure", "measure a saved checkpoint (no training)"),
}
LIGHT_COMMANDS = ("theory", "report")  # no Lightning import, their own errors
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


def __getattr__(name: str) -> Any:
    """W&B helpers now live in :mod:`nclightning.loggers` (imported lazily: it needs Lightning)."""
    if name in ("ensure_wandb_mode", "finish_wandb_runs", "wandb_api_key_available"):
        from nclightning import loggers

        return getattr(loggers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_trainer_cli(argv: list[str], run: bool = True, *, measure: bool = False) -> Any:
    """Run a Trainer subcommand; returns the CLI object (its ``trainer`` holds the results).

    With ``run=False`` nothing is trained and ``argv`` has no subcommand: the CLI only parses
    and instantiates (``cli.model``, ``cli.datamodule``, ``cli.trainer``). Raises
    :class:`~nclightning.errors.UserError` for anything the user must fix.
    """
    argv = resolve_config_args(argv)
    check_config_files(argv)
    from lightning.pytorch import LightningDataModule

    import nclightning.callbacks
    import nclightning.data  # noqa: F401
    from nclightning.cli.lightning_cli import NCLightningCLI
    from nclightning.models import CollapseClassifier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning-internal notice
        return NCLightningCLI(
            CollapseClassifier,
            LightningDataModule,
            args=argv,
            run=run,
            ncl_argv=argv,
            measure=measure,
        )


def _print_help() -> None:
    lines = [
        "usage: nclightning {fit,validate,test,predict} --config FILE [--dotted.key VALUE ...]",
        "       nclightning measure --config FILE --ckpt_path CKPT [--dotted.key VALUE ...]",
        "       nclightning {theory,report,study} ...",
        "",
        "Trainer subcommands (LightningCLI; `nclightning fit --help` lists every option):",
        "  fit, validate, test, predict",
        "Other commands:",
        *(f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()),
        "",
        "Bundled configs (usable by name from any directory): " + ", ".join(bundled_configs()),
        "Quickstart:  nclightning fit --config digits_mlp.yaml",
    ]
    print("\n".join(lines))


def _error(message: str) -> int:
    """Print a user error (on the first process only: every DDP rank hits the same one)."""
    if os.environ.get("LOCAL_RANK", "0") in ("", "0"):
        print(f"nclightning: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _print_help()
        return 0
    if argv[0] in LIGHT_COMMANDS:
        return _run_command(argv)
    if argv[0] not in (*TRAINER_COMMANDS, *COMMANDS) and not argv[0].startswith("-"):
        import difflib

        known = [*TRAINER_COMMANDS, *COMMANDS]
        close = difflib.get_close_matches(argv[0], known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return _error(f"unknown command {argv[0]!r}; {hint}choose one of: {', '.join(known)}")
    from nclightning.errors import UserError

    try:
        if argv[0] in COMMANDS:  # `study` and `measure` run Trainers: the same user errors
            return _run_command(argv)
        run_trainer_cli(argv)
    except UserError as err:
        if os.environ.get("NCL_DEBUG"):
            raise
        return _error(str(err))
    return 0


def _run_command(argv: list[str]) -> int:
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)
