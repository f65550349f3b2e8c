"""``nclightning measure --config FILE --ckpt_path CKPT``: measure a saved checkpoint.

Runs ``trainer.validate(model, datamodule, ckpt_path=CKPT)`` through the same LightningCLI as
``nclightning fit``, with the config's loggers and callbacks: the config's
``NeuralCollapseCallback`` probes the checkpoint's network (every metric and pair fit of the
config) and the loggers write the result, so runs trained elsewhere can be analysed. The
model's hyper-parameters come from the checkpoint (LightningCLI reads them from it).

The CSV log goes to ``{save_dir}/{name}/measure_N/metrics.csv`` (next to the training run's
``version_N`` folders, never among them) and W&B runs get ``job_type="measure"``. Any
override of ``nclightning fit`` works here (``--data.init_args.root /data``, ...).
"""

from __future__ import annotations

from pathlib import Path

from nclightning.errors import ConfigurationError

__all__ = ["main"]

USAGE = "usage: nclightning measure --config FILE --ckpt_path CKPT [--dotted.key VALUE ...]"


def _ckpt_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--ckpt_path" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--ckpt_path="):
            return arg.split("=", 1)[1]
    return None


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + __doc__.split("\n\n", 1)[1].strip())
        return 0
    ckpt = _ckpt_path(argv)
    if ckpt is None or not any(a == "--config" or a.startswith("--config=") for a in argv):
        raise ConfigurationError(f"measure needs --config and --ckpt_path ({USAGE})")
    if not Path(ckpt).is_file():
        raise ConfigurationError(f"no checkpoint file at {ckpt} (--ckpt_path)")
    from nclightning.cli import run_trainer_cli

    run_trainer_cli(["validate", *argv], measure=True)
    return 0
