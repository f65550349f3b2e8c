"""Several processes: the DDP strategies the README names, and two runs started together.

Each case runs the CLI as a subprocess (``ddp`` re-launches the command line, and concurrent
runs are separate processes anyway) with 2 CPU processes and one intra-op thread each.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import cli_env

QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
         "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.callbacks.init_args.every_n_epochs", "1"]  # fmt: skip


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_strategies_from_the_cli_with_two_cpu_processes(tmp_path, cli, strategy):
    done = cli(
        ["fit", "--config", "digits_mlp.yaml", *QUICK, "--trainer.accelerator", "cpu",
         "--trainer.devices", "2", "--trainer.strategy", strategy],
        tmp_path,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    runs = tmp_path / "runs" / "digits_mlp"
    assert sorted(p.name for p in runs.iterdir()) == ["version_0"]  # rank 1 reserved nothing
    ckpt = torch.load(runs / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and (runs / "version_0" / "metrics.csv").is_file()


def test_two_runs_started_together_finish_in_distinct_folders(tmp_path):
    args = [sys.executable, "-m", "nclightning.cli", "fit", "--config", "digits_mlp.yaml", *QUICK]
    procs = [
        subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    runs = tmp_path / "runs" / "digits_mlp"
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]
    for version in runs.iterdir():
        assert {"metrics.csv", "config.yaml", "hparams.yaml"} <= {p.name for p in version.iterdir()}
        assert (version / "checkpoints" / "last.ckpt").is_file()
        assert not (version / "config-2.yaml").exists()


def test_a_user_error_in_ddp_spawn_workers_is_one_line_and_leaves_no_folder(tmp_path, cli):
    done = cli(
        ["fit", "--config", "digits_mlp.yaml", *QUICK, "--trainer.accelerator", "cpu",
         "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn",
         "--trainer.callbacks+=cli_support.SetupFails"],
        tmp_path,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("nclightning: error:")]
    assert errors == ["nclightning: error: layer 'nosuch' not found; did you mean 'penultimate'?"]
    assert not list((tmp_path / "runs").glob("digits_mlp/version_*"))
