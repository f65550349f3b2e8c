"""The ``nclightning`` command line.

``nclightning fit|validate|test|predict --config FILE [--dotted.key VALUE ...]`` runs
:class:`NCLightningCLI`, a :class:`~lightning.pytorch.cli.LightningCLI` in jsonargparse's
``omegaconf+`` parser mode: YAML files may interpolate (``${model.init_args.lr}``) and the
interpolations are resolved *after* command-line overrides are merged, so an override flows
through every value that refers to it.

``nclightning theory ...`` and ``nclightning report ...`` are dispatched to
:mod:`nclightning.commands` before LightningCLI sees the arguments.

Choices made for users:

* ``--config NAME`` that is not an existing file but names a bundled config
  (``digits_mlp.yaml`` or ``digits_mlp``) loads the bundled one, so an installed package runs
  its embedded default job from any directory.
* W&B never hangs or crashes a run: with no ``WANDB_MODE`` set and no API key found, the CLI
  switches W&B to offline mode, says so, and prints at the end where the run was written and
  the ``wandb sync`` command that uploads it.
* The run's config is saved next to the first logger's files; a config already there is
  never overwritten (the new one gets a numbered name) and is also logged to W&B runs.
* User errors (missing data, bad values) print one ``nclightning: error:`` line and exit 2;
  set ``NCL_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from nclightning.errors import ConfigurationError

COMMANDS = {
    "theory": ("nclightning.commands.theory", "numerical checks of the perturbation theory"),
    "report": ("nclightning.commands.report", "PNG figures from logged runs"),
    "study": ("nclightning.commands.study", "the paper's weight-decay study, run in sequence"),
}
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def bundled_configs() -> list[str]:
    """Names of the configs shipped inside the package."""
    return sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def _resolve_config_args(argv: list[str]) -> list[str]:
    """Replace ``--config NAME`` by the bundled file when ``NAME`` is not a path that exists."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            j, value = i + 1, out[i + 1]
        elif arg.startswith("--config="):
            j, value = i, arg.split("=", 1)[1]
        else:
            continue
        if Path(value).exists():
            continue
        name = Path(value).name
        for candidate in (name, f"{name}.yaml"):
            if (CONFIG_DIR / candidate).is_file():
                resolved = str(CONFIG_DIR / candidate)
                out[j] = resolved if j != i else f"--config={resolved}"
                break
    return out


# ---------------------------------------------------------------------------------------------
# W&B: offline fallback
# ---------------------------------------------------------------------------------------------


def wandb_api_key_available() -> bool:
    """Whether a W&B API key is configured (environment or netrc), without any network call."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:  # wandb's own lookup (environment, netrc) when this version has it
        from wandb.sdk.lib import apikey

        return bool(apikey.api_key())
    except Exception:
        pass
    import netrc

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def ensure_wandb_mode() -> str | None:
    """Choose W&B offline mode when no mode is set and no API key exists; return the mode."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if wandb_api_key_available():
        return None
    os.environ["WANDB_MODE"] = "offline"
    print(
        "nclightning: no W&B API key found (WANDB_API_KEY or `wandb login`): "
        "logging to W&B in offline mode. Set WANDB_MODE=disabled to turn W&B off.",
        file=sys.stderr,
    )
    return "offline"


def finish_wandb_runs(trainer: Any) -> None:
    """Close the trainer's W&B runs and say where each went (and, offline, how to upload it).

    Closing matters beyond the process: wandb keeps a process-wide current run that a later
    ``WandbLogger`` would otherwise silently reuse.
    """
    from lightning.pytorch.loggers import WandbLogger

    if trainer is None:
        return
    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger) or logger._experiment is None:
            continue
        run = logger.experiment
        if trainer.is_global_zero and getattr(run, "dir", None):
            run_dir = Path(run.dir).parent
            if os.environ.get("WANDB_MODE") in ("offline", "dryrun"):
                print(
                    f"nclightning: W&B run saved offline in {run_dir}\n"
                    f"nclightning: upload it with:  wandb sync {run_dir}",
                    file=sys.stderr,
                )
            elif getattr(run, "url", None):
                print(f"nclightning: W&B run at {run.url}", file=sys.stderr)
        run.finish()


# ---------------------------------------------------------------------------------------------
# LightningCLI
# ---------------------------------------------------------------------------------------------


class ConfigError(ConfigurationError):
    """A configuration that parses but describes something that cannot be built."""


def _cli_classes():
    """Import Lightning lazily: ``nclightning theory`` should not pay for it."""
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
    from lightning.pytorch.loggers import WandbLogger

    class SaveRunConfig(SaveConfigCallback):
        """Save the config beside the first logger's files, never over an existing one.

        A second run into the same directory writes ``config-2.yaml`` (then ``-3`` ...)
        instead of failing or clobbering the first run's config. The resolved config is also
        logged to every W&B run's config.
        """

        def setup(self, trainer, pl_module, stage):
            if self.already_saved:
                return
            log_dir = trainer.log_dir
            if log_dir is not None:
                stem, suffix = os.path.splitext(self.config_filename)
                name, k = self.config_filename, 1
                while trainer.is_global_zero and os.path.exists(os.path.join(log_dir, name)):
                    k += 1
                    name = f"{stem}-{k}{suffix}"
                self.config_filename = trainer.strategy.broadcast(name)
            super().setup(trainer, pl_module, stage)

        def save_config(self, trainer, pl_module, stage):
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    config = self.parser.dump(self.config, skip_none=False, format="json")
                    import json

                    logger.experiment.config.update(
                        {"nclightning_config": json.loads(config)}, allow_val_change=True
                    )

    class NCLightningCLI(LightningCLI):
        """LightningCLI with omegaconf+ interpolation, data->model links and W&B fallback."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # Config files write interpolations from their own root (``${model.init_args.lr}``)
            # whichever subcommand loads them.
            set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
            parser_kwargs = kwargs.pop("parser_kwargs", {}) or {}
            parser_kwargs.setdefault("parser_mode", "omegaconf+")
            parser_kwargs.setdefault("allow_abbrev", False)  # a typo must not match a prefix
            kwargs.setdefault("save_config_callback", SaveRunConfig)
            kwargs.setdefault("auto_configure_optimizers", False)
            kwargs.setdefault("subclass_mode_model", False)
            kwargs.setdefault("subclass_mode_data", True)
            super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)

        def add_arguments_to_parser(self, parser) -> None:
            # Shape facts come from the data module (available right after __init__).
            parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
            parser.link_arguments("data.input_shape", "model.input_shape", apply_on="instantiate")

        def before_instantiate_classes(self) -> None:
            ensure_wandb_mode()

        def instantiate_classes(self) -> None:
            # Values that parse but that a constructor rejects (an unknown backbone name, a
            # negative size) are configuration errors: report them as such.
            try:
                super().instantiate_classes()
            except (ValueError, TypeError, KeyError) as err:
                raise ConfigError(f"invalid configuration: {err}") from err

    return NCLightningCLI


def run_trainer_cli(argv: list[str], run: bool = True):
    """Run a Trainer subcommand; returns the CLI object (its ``trainer`` holds the results).

    With ``run=False`` nothing is trained and ``argv`` has no subcommand: the CLI only parses
    and instantiates (``cli.model``, ``cli.datamodule``, ``cli.trainer``).
    """
    from lightning.pytorch import LightningDataModule

    import nclightning.callbacks
    import nclightning.data  # noqa: F401
    from nclightning.models import CollapseClassifier

    argv = _resolve_config_args(argv)
    NCLightningCLI = _cli_classes()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning-internal notice
        cli = NCLightningCLI(CollapseClassifier, LightningDataModule, args=argv, run=run)
    finish_wandb_runs(getattr(cli, "trainer", None))
    return cli


def _user_error_types() -> tuple[type[BaseException], ...]:
    from nclightning.errors import UserError

    return (UserError,)


def _print_help() -> None:
    lines = [
        "usage: nclightning {fit,validate,test,predict} --config FILE [--dotted.key VALUE ...]",
        "       nclightning {theory,report} ...",
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


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _print_help()
        return 0
    if argv[0] in ("theory", "report"):  # light commands: no Lightning import, own errors
        return _run_command(argv)
    if argv[0] not in (*TRAINER_COMMANDS, *COMMANDS) and not argv[0].startswith("-"):
        known = ", ".join([*TRAINER_COMMANDS, *COMMANDS])
        print(
            f"nclightning: error: unknown command {argv[0]!r}; choose one of: {known}",
            file=sys.stderr,
        )
        return 2
    user_errors = _user_error_types()
    try:
        if argv[0] in COMMANDS:  # `study` trains: the same user errors as `fit`
            return _run_command(argv)
        run_trainer_cli(argv)
    except user_errors as err:
        if os.environ.get("NCL_DEBUG"):
            raise
        print(f"nclightning: error: {err}", file=sys.stderr)
        return 2
    return 0


def _run_command(argv: list[str]) -> int:
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
