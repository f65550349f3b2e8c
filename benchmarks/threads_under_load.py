"""The default job under CPU load: the thread count the CLI ships with vs one thread.

    python benchmarks/threads_under_load.py [--epochs 20] [--busy 2] [--repeats 1] [--torch-default]

Starts ``--busy`` processes that spin on the CPU (other jobs on the same cores), then runs
``nclightning fit --config digits_mlp.yaml --trainer.max_epochs EPOCHS`` (W&B disabled) as
shipped (no ``OMP_NUM_THREADS``: the CLI chooses, :mod:`nclightning.runtime`) and forced to
one thread (``OMP_NUM_THREADS=1``), alternating, and prints the wall-clock times (the whole
command, start-up included) and the ratio shipped / one thread (target <= 1.5).
``--torch-default`` also times torch's own choice (one thread per core, forced through
``OMP_NUM_THREADS``), the behaviour before the CLI chose: expect it to be many times slower.
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

REPO = Path(__file__).resolve().parents[1]
SPIN = "while True:\n    pass\n"


def _env(threads: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(PYTHONPATH=str(REPO), WANDB_MODE="disabled")
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    return env


def _run(epochs: int, threads: str | None) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "nclightning.cli", "fit", "--config", "digits_mlp.yaml"]
    cmd += ["--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar", "false"]
    with tempfile.TemporaryDirectory() as cwd:
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=cwd, env=_env(threads), capture_output=True, text=True)
        elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the job failed:\n{done.stderr[-3000:]}")
    chosen = [ln for ln in done.stderr.splitlines() if "CPU thread" in ln]
    return elapsed, (chosen[0].split("nclightning: ", 1)[-1] if chosen else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--busy", type=int, default=2, help="CPU-spinning background processes")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--torch-default", action="store_true")
    args = parser.parse_args(argv)
    variants = {"shipped": None, "one thread": "1"}
    if args.torch_default:
        variants["torch default"] = str(os.cpu_count() or 1)
    busy = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.busy)]
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for _ in range(args.repeats):
            for name, threads in variants.items():
                elapsed, chosen = _run(args.epochs, threads)
                times[name].append(elapsed)
                print(f"{name:>13}: {elapsed:7.1f} s  {chosen}", flush=True)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"default job, {args.epochs} epochs, {args.busy} busy processes on "
          f"{len(os.sched_getaffinity(0))} CPUs (median of {args.repeats}):")  # fmt: skip
    for name, t in median.items():
        print(f"  {name:>13}: {t:7.1f} s")
    ratio = median["shipped"] / median["one thread"]
    print(f"ratio shipped / one thread = {ratio:.2f} (target <= 1.5)")
    if "torch default" in median:
        slow = median["torch default"] / median["one thread"]
        print(f"ratio torch default / one thread = {slow:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
