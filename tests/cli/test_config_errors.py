"""Config and run errors a person reads in one glance, and a failed start leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from nclightning.cli import main

QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
         "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]  # fmt: skip


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")


def _error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err
    return [ln for ln in err.strip().splitlines() if ln.startswith(("nclightning", "  ("))]


def test_unknown_key_in_a_config_file_names_the_file_and_the_fix(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text("trainer:\n  max_epoch: 3\n")
    assert main(["fit", "--config", "digits_mlp.yaml", "--config", "mine.yaml"]) == 2
    (line, hint) = _error_lines(capsys)
    assert "unknown key 'trainer.max_epoch' in mine.yaml" in line
    assert "did you mean trainer.max_epochs?" in line and "--help" in hint


def test_unknown_nested_key_in_a_config_file(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text("data:\n  init_args:\n    batch_sizee: 3\n")
    assert main(["fit", "--config", "digits_mlp.yaml", "--config", "mine.yaml"]) == 2
    (line, _) = _error_lines(capsys)
    assert "'batch_sizee' in mine.yaml" in line and "did you mean batch_size?" in line


def test_malformed_yaml_names_the_file_line_and_column(tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("trainer:\n  max_epochs: [1\n")
    assert main(["fit", "--config", "broken.yaml"]) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith("nclightning: error: malformed YAML in broken.yaml, line 3, column 1")


def test_missing_config_file_suggests_the_bundled_name(capsys):
    assert main(["fit", "--config", "digit_mlp.yaml"]) == 2
    (line,) = _error_lines(capsys)
    assert "config file not found: digit_mlp.yaml; did you mean digits_mlp.yaml?" in line


def test_unknown_command_suggests_the_closest(capsys):
    assert main(["fitt"]) == 2
    assert "did you mean 'fit'?" in capsys.readouterr().err


def test_user_error_in_a_callback_setup_is_one_line_and_leaves_no_run_behind(tmp_path, capsys):
    """Lightning creates the CSV folder and the W&B run before callbacks' setup: both go."""
    import wandb

    wandb.teardown()
    args = [
        "fit",
        "--config",
        "digits_mlp.yaml",
        *QUICK,
        "--trainer.callbacks+=cli_support.SetupFails",
    ]
    import os

    os.environ["WANDB_MODE"] = "offline"  # a real (offline) W&B run is created, then removed
    assert main(args) == 2
    lines = _error_lines(capsys)
    assert lines[-1] == "nclightning: error: layer 'nosuch' not found; did you mean 'penultimate'?"
    assert len(lines) == 2  # what was removed, then the error
    runs = tmp_path / "runs"
    assert not list(runs.glob("digits_mlp/version_*")), "an empty version folder was left"
    assert not list(runs.glob("wandb/*run-*")), "a W&B run was left"
    assert "removed" in lines[0] and "before its first training step" in lines[0]


def test_debug_mode_keeps_the_traceback(monkeypatch):
    monkeypatch.setenv("NCL_DEBUG", "1")
    from nclightning.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="nosuch"):
        main(
            [
                "fit",
                "--config",
                "digits_mlp.yaml",
                *QUICK,
                "--trainer.callbacks+=cli_support.SetupFails",
            ]
        )


def test_print_config_and_help_still_work(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", "digits_mlp.yaml", "--print_config"])
    assert exc.value.code == 0 and "max_epochs: 150" in capsys.readouterr().out
    assert Path("runs").exists() is False


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            ["--trainer.callbacks.init_args.layers", "{penultimate: backbone.blocks.9}"],
            "unknown layer 'backbone.blocks.9' in CollapseClassifier. Did you mean",
        ),
        (  # found at the first probe, after the loggers exist: the same one line, no run left
            [
                "--trainer.callbacks.init_args.layers",
                "{h0: backbone.flatten, penultimate: backbone}",
            ],
            "perturbation pair layers differ in width (H0 has d=64, H has d=128)",
        ),
    ],
    ids=["unknown-layer", "width-mismatch"],
)
def test_the_collapse_callbacks_setting_errors_are_one_line(tmp_path, cli, override, expected):
    """In a fresh process, as a user runs it (the CLI's own stderr, nothing captured)."""
    done = cli(["fit", "--config", "digits_mlp.yaml", *QUICK, *override], tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("nclightning: error")]
    assert len(lines) == 1 and expected in lines[0]
    assert not list((tmp_path / "runs").glob("digits_mlp/version_*"))
