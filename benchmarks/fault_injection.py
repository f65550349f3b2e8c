"""Fault injection: SIGKILL the default job at random moments, resume, compare with a clean run.

    python benchmarks/fault_injection.py [--kills 4] [--seed 0] [--max-epochs N] [--wandb offline]

1. The reference: ``nclightning fit --config digits_mlp.yaml`` run to the end, untouched.
2. The same job, killed with SIGKILL (no handler runs, no buffer is flushed) ``--kills`` times
   at random moments spread over the whole run: ``--kills`` distinct epochs are drawn at
   random; each life runs until that many epochs have ended (``metrics.csv`` says so), then
   for a random fraction of a second more (``--window``), and is killed; the next life resumes
   with ``--ckpt_path .../last.ckpt``. The last life runs to the end.
3. Checks: every file of the run folder loads (``metrics.csv`` as CSV with full rows, every
   checkpoint with ``torch.load``, the YAML files), the run stayed in one version folder, and
   the final ``metrics.csv`` equals the reference's: the same header, the same rows in the same
   order, key for key, value for value (the runs are deterministic on CPU).

Prints one line per kill and ``PASS`` or the first differences; exit status 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = Path("runs/digits_mlp/version_0")


def _env(wandb: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE=wandb, WANDB_SILENT="true")
    return env


def _command(max_epochs: int | None, ckpt: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "nclightning.cli", "fit", "--config", "digits_mlp.yaml"]
    cmd += ["--trainer.enable_progress_bar", "false"]
    if max_epochs is not None:
        cmd += ["--trainer.max_epochs", str(max_epochs)]
    return cmd + (["--ckpt_path", str(ckpt)] if ckpt is not None else [])


def _start(folder: Path, args, ckpt: Path | None) -> subprocess.Popen:
    log = open(folder / "lives.log", "a")  # the child keeps it open until it exits
    return subprocess.Popen(
        _command(args.max_epochs, ckpt), cwd=folder, env=_env(args.wandb),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _epochs_ended(folder: Path) -> int:
    """Epochs whose end-of-epoch training row is in ``metrics.csv`` (0 if none yet)."""
    try:
        with open(folder / RUN / "metrics.csv", newline="") as f:
            return sum(1 for row in csv.DictReader(f) if row.get("train/acc"))
    except (FileNotFoundError, csv.Error):
        return 0


def _one_life(folder: Path, args, rng: random.Random, life: int, target: int) -> bool:
    """Start (or resume) the job, SIGKILL it after ``target`` epochs; False if it finished."""
    last = folder / RUN / "checkpoints" / "last.ckpt"
    proc = _start(folder, args, last if last.is_file() else None)
    while proc.poll() is None and _epochs_ended(folder) < target:
        time.sleep(0.02)
    delay = rng.uniform(0.0, args.window)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    import torch

    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    print(f"life {life}: killed {delay:.2f} s after epoch {target} ended; last.ckpt at step {step}")
    return True


def _max_epochs(args) -> int:
    if args.max_epochs is not None:
        return args.max_epochs
    import yaml

    config = REPO / "nclightning" / "configs" / "digits_mlp.yaml"
    return int(yaml.safe_load(config.read_text())["trainer"]["max_epochs"])


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    bad = [i for i, r in enumerate(rows) if len(r) != len(header)]
    if bad:
        raise ValueError(f"{path}: rows {bad[:5]} do not have {len(header)} fields")
    return header, [dict(zip(header, r)) for r in rows]


def _check_files(folder: Path) -> list[str]:
    """Load every file of the run folder; the problems found."""
    import torch
    import yaml

    problems = []
    versions = sorted(p.name for p in (folder / RUN.parent).iterdir())
    if versions != ["version_0"]:
        problems.append(f"the run left several folders: {versions}")
    for path in sorted((folder / RUN).rglob("*")):
        if path.is_dir():
            continue
        try:
            if path.suffix == ".ckpt":
                torch.load(path, map_location="cpu", weights_only=False)
            elif path.suffix == ".yaml":
                yaml.safe_load(path.read_text())
            elif path.suffix == ".csv":
                _read_csv(path)
            else:
                problems.append(f"unexpected file {path.relative_to(folder)}")
        except Exception as err:
            problems.append(f"{path.relative_to(folder)} does not load: {err}")
    return problems


def _compare(ref: Path, got: Path) -> list[str]:
    (h0, r0), (h1, r1) = _read_csv(ref), _read_csv(got)
    out = [] if h0 == h1 else [f"headers differ: {sorted(set(h0) ^ set(h1))}"]
    if len(r0) != len(r1):
        out.append(f"{len(r1)} rows instead of {len(r0)}")
    for i, (a, b) in enumerate(zip(r0, r1)):
        if a != b:
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            out.append(f"row {i} (step {a.get('step')}) differs in {keys[:6]}")
            if len(out) > 8:
                break
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-epochs", type=int, default=None, help="default: the config's")
    parser.add_argument("--window", type=float, default=0.5, help="seconds of random delay")
    parser.add_argument("--wandb", default="disabled", choices=["disabled", "offline"])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    import tempfile

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ncl-fault-"))
    (work / "reference").mkdir(parents=True, exist_ok=True)
    (work / "killed").mkdir(exist_ok=True)
    rng = random.Random(args.seed)
    start = time.monotonic()
    ref = _start(work / "reference", args, None)
    targets = sorted(rng.sample(range(1, _max_epochs(args) - 1), args.kills))
    kills = sum(_one_life(work / "killed", args, rng, i + 1, t) for i, t in enumerate(targets))
    final = _start(work / "killed", args, work / "killed" / RUN / "checkpoints" / "last.ckpt")
    codes = ref.wait(), final.wait()
    print(f"{kills} kills; both runs ended (exit {codes}) after {time.monotonic() - start:.0f} s")
    problems = [f"exit status {codes}"] if codes != (0, 0) else []
    problems += _check_files(work / "killed")
    if not problems:
        problems += _compare(
            work / "reference" / RUN / "metrics.csv", work / "killed" / RUN / "metrics.csv"
        )
    print("PASS: every file loads; metrics.csv equals the uninterrupted run's" if not problems
          else "FAIL:\n  " + "\n  ".join(problems))  # fmt: skip
    print(f"(runs in {work})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
