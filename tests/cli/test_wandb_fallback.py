"""W&B never hangs a run: unreachable, silent or rejecting services fall back to offline mode.

The services are real sockets on the loopback interface (a closed port, a port that accepts
connections and never answers, an HTTP server that answers 401 to everything); wandb itself is
not replaced. Each start is bounded by ``connect_timeout + init_timeout`` plus the offline
start; the bound asserted here is loose (it is a property, not a speed measurement: the hang
this replaces lasted 111 s and then crashed the run).
"""

from __future__ import annotations

import time

import pytest
from conftest import FAKE_KEY

from nclightning.loggers import WandbLogger, ensure_wandb_mode, is_offline, wandb_service_problem

CONNECT, INIT = 2.0, 6.0
BOUND = CONNECT + INIT + 30.0  # offline start included, on a loaded 2-core machine


@pytest.fixture
def online_with_key(monkeypatch, tmp_path):
    import wandb

    wandb.teardown()
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    yield
    wandb.teardown()


def _start(tmp_path, port: int):
    logger = WandbLogger(
        project="t", save_dir=str(tmp_path), connect_timeout=CONNECT, init_timeout=INIT
    )
    start = time.monotonic()
    run = logger.experiment
    elapsed = time.monotonic() - start
    run.log({"x": 1.0})
    offline = is_offline(run)
    run.finish()
    return logger, offline, elapsed


def test_closed_port_falls_back_offline(
    online_with_key, monkeypatch, tmp_path, closed_port, capsys
):
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port}")
    logger, offline, elapsed = _start(tmp_path, closed_port)
    assert offline and elapsed < BOUND
    assert "unreachable" in logger.fallback_reason
    assert "logging to W&B in offline mode instead" in capsys.readouterr().err
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert not list((tmp_path / "wandb").glob("run-*"))  # no half-made online run left


def test_silent_service_falls_back_offline(online_with_key, monkeypatch, tmp_path, silent_server):
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{silent_server}")
    logger, offline, elapsed = _start(tmp_path, silent_server)
    assert offline and elapsed < BOUND
    assert f"did not answer within {CONNECT:g} s" in logger.fallback_reason


def test_rejecting_service_falls_back_offline(
    online_with_key, monkeypatch, tmp_path, rejecting_server
):
    """The service answers (so the probe passes) but refuses the key: wandb.init fails."""
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{rejecting_server}")
    logger, offline, elapsed = _start(tmp_path, rejecting_server)
    assert offline and elapsed < BOUND
    assert logger.fallback_reason and "unreachable" not in logger.fallback_reason
    assert not list((tmp_path / "wandb").glob("run-*"))


def test_api_that_never_answers_falls_back_after_init_timeout(
    online_with_key, monkeypatch, tmp_path, hanging_api_server
):
    """The service answers the probe, then never answers wandb.init: W&B's init_timeout."""
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{hanging_api_server}")
    logger, offline, elapsed = _start(tmp_path, hanging_api_server)
    assert offline and INIT <= elapsed < BOUND
    assert f"wandb.init took more than {INIT:g} s" in logger.fallback_reason


def test_probe_says_why(closed_port, silent_server, rejecting_server):
    assert "unreachable" in wandb_service_problem(f"http://127.0.0.1:{closed_port}", 1.0)
    assert "did not answer" in wandb_service_problem(f"http://127.0.0.1:{silent_server}", 0.5)
    assert wandb_service_problem(f"http://127.0.0.1:{rejecting_server}", 2.0) is None


def test_no_key_and_no_mode_is_offline_without_a_prompt(monkeypatch, tmp_path, capsys):
    import wandb

    wandb.teardown()
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "cfg"))
    logger = WandbLogger(project="t", save_dir=str(tmp_path))
    run = logger.experiment  # wandb would prompt for a key here in a terminal
    assert is_offline(run) and "no W&B API key" in logger.fallback_reason
    run.finish()
    wandb.teardown()
    assert ensure_wandb_mode() == "offline"  # the CLI's choice: the whole process offline


def test_cli_run_with_a_key_and_no_network_finishes_offline(tmp_path, closed_port, cli):
    """The default job's W&B logger with a key and a closed port: the run completes."""
    args = ["fit", "--config", "digits_mlp.yaml", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    done = cli(
        args,
        tmp_path,
        timeout=300,
        WANDB_MODE=None,
        WANDB_API_KEY=FAKE_KEY,
        WANDB_BASE_URL=f"http://127.0.0.1:{closed_port}",
        WANDB_DIR=str(tmp_path / "wd"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "W&B unavailable" in done.stderr and "wandb sync" in done.stderr
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("asked", ["offline=True", "WANDB_MODE"])
def test_the_mode_asked_for_now_wins_over_the_mode_wandb_was_set_up_with(
    asked, monkeypatch, tmp_path
):
    """wandb keeps the WANDB_MODE it saw at its first setup for the whole process (a notebook,
    a study, a test session): a logger asked for offline later still writes an offline run."""
    import wandb

    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    wandb.setup()  # the process-wide settings now say: disabled
    try:
        if asked == "WANDB_MODE":
            monkeypatch.setenv("WANDB_MODE", "offline")
            logger = WandbLogger(project="t", save_dir=str(tmp_path))
        else:
            logger = WandbLogger(project="t", save_dir=str(tmp_path), offline=True)
        run = logger.experiment
        run.log({"x": 1.0})
        assert is_offline(run)
        run.finish()
    finally:
        wandb.teardown()
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
