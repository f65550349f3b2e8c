"""``NCLightningCLI``: LightningCLI with short errors, fitted threads, resume and cleanup.

Module-level classes (picklable: ``ddp_spawn`` sends the Trainer, its callbacks included, to
new processes). What each step adds to LightningCLI:

* parsing (:class:`NCArgumentParser`): a config error is one ``nclightning: error:`` line
  and a pointer to ``--help`` (:mod:`nclightning.cli.parse_errors`), not the usage text;
* instantiation: ``num_classes``/``input_shape`` linked from the data into the model; values
  a constructor rejects become :class:`~nclightning.errors.ConfigurationError`; W&B offline
  without a key; CPU threads from :mod:`nclightning.runtime`; :class:`RunRecord` and atomic
  checkpoint writes added to the Trainer;
* running (:mod:`nclightning.cli.lifecycle`): ``--ckpt_path`` resumes into the same folder
  and W&B run; a run that fails before its first step leaves nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from nclightning.cli import lifecycle
from nclightning.cli.config_files import class_parameters, config_files
from nclightning.cli.parse_errors import ErrorContext, short_message
from nclightning.errors import ConfigurationError

__all__ = ["ConfigError", "NCArgumentParser", "NCLightningCLI", "SaveRunConfig"]


class ConfigError(ConfigurationError):
    """A command line or config that cannot be parsed or built; printed as one line."""


class NCArgumentParser(LightningArgumentParser):
    """A parser whose errors are one line (:func:`short_message`) plus where ``--help`` is.

    ``ncl_argv`` (the command line) and ``ncl_prog`` (``"nclightning fit"``) are set by the
    CLI. Parsers made with ``exit_on_error=False`` and ``JSONARGPARSE_DEBUG`` keep
    jsonargparse's behaviour.
    """

    ncl_argv: tuple[str, ...] | list[str] = ()
    ncl_prog: str = "nclightning"

    def error(self, message: str, ex: Exception | None = None) -> Any:
        from jsonargparse._common import debug_mode_active

        if not self.exit_on_error or debug_mode_active():
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self._subcommand_parser()
        files = config_files(list(self.ncl_argv))
        ctx = ErrorContext(
            argv=list(self.ncl_argv),
            config_files=files,
            options=set(parser._option_string_actions),
            parameters=class_parameters(files, list(self.ncl_argv)),
        )
        raise ConfigError(
            f"{short_message(message, ctx)}\n  (every option: {self.ncl_prog} --help)"
        ) from None

    def _subcommand_parser(self) -> Any:
        action = getattr(self, "_subcommands_action", None)
        for arg in self.ncl_argv:
            if action is not None and arg in action._name_parser_map:
                return action._name_parser_map[arg]
        return self


class SaveRunConfig(SaveConfigCallback):
    """Save the config beside the first logger's files, never over another run's.

    A second run into the same folder writes ``config-2.yaml`` (then ``-3`` ...) instead of
    failing or clobbering the first run's config; a resumed run whose config differs only in
    ``ckpt_path`` writes nothing new. The resolved config is also logged to every W&B run's
    config.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir
        if log_dir is not None and self.save_to_log_dir:
            path = self._target(log_dir) if trainer.is_global_zero else None
            path = trainer.strategy.broadcast(path)
            if trainer.is_global_zero and path is not None:
                os.makedirs(log_dir, exist_ok=True)
                self.parser.save(self.config, path, skip_none=False, overwrite=True)
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def _target(self, log_dir: str) -> str | None:
        """A free ``config[-k].yaml`` path, or None when this run's config is already there."""
        import yaml

        def essentials(text: str) -> Any:
            config = yaml.safe_load(text) or {}
            config.pop("ckpt_path", None)
            return config

        mine = essentials(self.parser.dump(self.config, skip_none=False))
        stem, suffix = os.path.splitext(self.config_filename)
        name, k = self.config_filename, 1
        while os.path.exists(os.path.join(log_dir, name)):
            with open(os.path.join(log_dir, name)) as f:
                if essentials(f.read()) == mine:
                    return None
            k += 1
            name = f"{stem}-{k}{suffix}"
        return os.path.join(log_dir, name)

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        import json

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                config = json.loads(self.parser.dump(self.config, skip_none=False, format="json"))
                logger.experiment.config.update(
                    {"nclightning_config": config}, allow_val_change=True
                )


class NCLightningCLI(LightningCLI):
    """LightningCLI with omegaconf+ interpolation, data->model links and the steps above.

    ``ncl_argv``: the command line (for error messages); ``measure``: the run is
    ``nclightning measure`` (its CSV folders are ``measure_N``, its W&B runs ``job_type``
    ``measure``).
    """

    def __init__(
        self,
        *args: Any,
        ncl_argv: Sequence[str] | None = None,
        measure: bool = False,
        **kwargs: Any,
    ) -> None:
        self.ncl_argv = list(ncl_argv or kwargs.get("args") or [])
        self.measure = measure
        self.resumed = False
        # Config files write interpolations from their own root (``${model.init_args.lr}``)
        # whichever subcommand loads them.
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        parser_kwargs = kwargs.pop("parser_kwargs", {}) or {}
        parser_kwargs.setdefault("parser_mode", "omegaconf+")
        parser_kwargs.setdefault("allow_abbrev", False)  # a typo must not match a prefix
        kwargs.setdefault("parser_class", NCArgumentParser)
        kwargs.setdefault("save_config_callback", SaveRunConfig)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("subclass_mode_model", False)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)  # type: ignore[misc]

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.ncl_argv = self.ncl_argv  # type: ignore[attr-defined]
        command = "measure" if self.measure else next(iter(self.ncl_argv), "fit")
        prog = f"nclightning {command}" if not command.startswith("-") else "nclightning"
        parser.ncl_prog = prog  # type: ignore[attr-defined]
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Shape facts come from the data module (available right after __init__).
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.input_shape", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        from nclightning.loggers import ensure_wandb_mode

        ensure_wandb_mode()

    def instantiate_classes(self) -> None:
        # Values that parse but that a constructor rejects (an unknown backbone name, a
        # negative size) are configuration errors: report them as such.
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, KeyError, MisconfigurationException) as err:
            if isinstance(err, ConfigurationError):
                raise
            raise ConfigError(f"invalid configuration: {err}") from err
        lifecycle.configure_threads(self.trainer, self.model, self.datamodule)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        return lifecycle.prepare_trainer(super().instantiate_trainer(**kwargs))

    def before_fit(self) -> None:
        ckpt_path = self._get(self.config_init, "ckpt_path")
        self.resumed = lifecycle.resume(self.trainer, ckpt_path)
        lifecycle.reserve_folders(self.trainer)

    def before_validate(self) -> None:
        if self.measure:
            lifecycle.mark_measurement(self.trainer)
        lifecycle.reserve_folders(self.trainer)

    def before_test(self) -> None:
        lifecycle.reserve_folders(self.trainer)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException as err:
            lifecycle.after_failure(self.trainer, keep=self.resumed)
            user_error = lifecycle.user_error_of_worker(err)
            if user_error is not None:  # a ddp_spawn worker's UserError, as a UserError
                raise ConfigError(user_error) from err
            raise
        lifecycle.after_success(self.trainer, measure=self.measure)
