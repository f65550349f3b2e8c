"""End-to-end cost of observing: the default job with and without NeuralCollapseCallback.

Runs ``nclightning fit`` on the embedded default job (``configs/digits_mlp.yaml``: 150
epochs, a probe every 5 epochs with the fitted pair, CSV and offline W&B loggers,
checkpoints) as a user does, once as configured and once with the callback removed from the
config (everything else equal: seed, loggers, checkpoints, one CPU thread), interleaved
``--runs`` times, each in a fresh process and folder. Prints every wall time, the medians
and their ratio (target: at most 1.25), with the machine's load before and after.

    python benchmarks/observer_cost.py [--runs 2] [--epochs 150] [--config digits_mlp.yaml]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from nclightning.cli import CONFIG_DIR

TARGET = 1.25


def _load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def configs(source: Path, folder: Path, epochs: int) -> dict[str, Path]:
    """The job as configured and the same job without the collapse callback."""
    config = yaml.safe_load(source.read_text())
    config["trainer"]["max_epochs"] = epochs
    callbacks = config["trainer"].get("callbacks") or []
    bare = [c for c in callbacks if not str(c.get("class_path", "")).endswith("CollapseCallback")]
    if len(bare) == len(callbacks):
        raise SystemExit(f"{source}: no NeuralCollapseCallback in trainer.callbacks")
    out = {}
    for name, cbs in (("with callback", callbacks), ("without", bare)):
        config["trainer"]["callbacks"] = cbs
        path = folder / f"{name.replace(' ', '_')}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        out[name] = path
    return out


def run_once(config: Path, workdir: Path) -> float:
    workdir.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    entry = "import sys; from nclightning.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", entry, "fit", "--config", str(config),
           "--trainer.enable_progress_bar", "false"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"the job failed (exit {done.returncode}) in {workdir}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--config", default=str(Path(CONFIG_DIR) / "digits_mlp.yaml"))
    args = parser.parse_args(argv)
    print(f"load average before: {_load()}")
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = configs(Path(args.config), Path(tmp), args.epochs)
        for i in range(args.runs):
            for name, config in jobs.items():
                seconds = run_once(config, Path(tmp) / f"{name.replace(' ', '_')}_{i}")
                times.setdefault(name, []).append(seconds)
                print(f"run {i + 1}  {name:<14} {seconds:7.1f} s")
    med = {name: statistics.median(t) for name, t in times.items()}
    ratio = med["with callback"] / med["without"]
    print(f"median with callback {med['with callback']:.1f} s, without {med['without']:.1f} s")
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"ratio {ratio:.3f} (target <= {TARGET}): {verdict}")
    print(f"load average after: {_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
