"""The ``nclightning`` command line: configs, interpolation, overrides, W&B fallback, errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from ondisk import write_tiny_cifar10

from nclightning import cli
from nclightning.cli import CONFIG_DIR, bundled_configs, main, run_trainer_cli

QUICK = [
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.enable_progress_bar",
    "false",
]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")


def test_bundled_configs_are_the_documented_ones():
    assert {
        "digits_mlp.yaml",
        "resnet18_cifar10.yaml",
        "resnet18_cifar10_mse.yaml",
        "mlp_cifar10.yaml",
    } <= set(bundled_configs())
    # the repository's top-level configs/ is the same folder
    assert (Path(__file__).parents[2] / "configs" / "digits_mlp.yaml").resolve() == (
        CONFIG_DIR / "digits_mlp.yaml"
    )


def test_fit_digits_writes_checkpoint_logs_and_config(tmp_path):
    assert main(["fit", "--config", "digits_mlp.yaml", *QUICK]) == 0
    run = tmp_path / "runs" / "digits_mlp" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").is_file()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert any(r.get("train/acc") for r in rows) and any(r.get("val/acc") for r in rows)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["backbone"] == "mlp"


def test_two_runs_into_one_log_dir_keep_both_configs(tmp_path):
    args = [
        "fit",
        "--config",
        "digits_mlp.yaml",
        *QUICK,
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        "same",
        "--trainer.callbacks",
        "[]",
        "--trainer.enable_checkpointing",
        "false",
    ]
    assert main([*args, "--model.lr", "0.01"]) == 0
    first = (tmp_path / "same" / "config.yaml").read_text()
    assert main([*args, "--model.lr", "0.02"]) == 0
    assert (tmp_path / "same" / "config.yaml").read_text() == first  # untouched
    second = (tmp_path / "same" / "config-2.yaml").read_text()
    assert "lr: 0.01" in first and "lr: 0.02" in second


def test_overrides_flow_through_interpolations():
    """``classifier_weight_decay: ${model.weight_decay}`` follows a command-line override."""
    c = run_trainer_cli(
        [
            "fit",
            "--config",
            "digits_mlp.yaml",
            *QUICK,
            "--model.weight_decay",
            "0.0123",
            "--trainer.max_epochs",
            "0",
        ]
    )
    assert c.model.hparams.weight_decay == pytest.approx(0.0123)
    assert c.model.hparams.classifier_weight_decay == pytest.approx(0.0123)
    groups = {g["name"]: g["weight_decay"] for g in c.model.parameter_groups()}
    assert groups == {"features": pytest.approx(0.0123), "classifier": pytest.approx(0.0123)}
    # an explicit value wins over the interpolation
    c = run_trainer_cli(
        [
            "fit",
            "--config",
            "digits_mlp.yaml",
            *QUICK,
            "--trainer.max_epochs",
            "0",
            "--model.weight_decay",
            "0.0123",
            "--model.classifier_weight_decay",
            "0",
        ]
    )
    assert c.model.hparams.classifier_weight_decay == 0


def test_data_shapes_are_linked_into_the_model():
    c = run_trainer_cli(["fit", "--config", "digits_mlp.yaml", *QUICK, "--trainer.max_epochs", "0"])
    assert c.model.hparams.num_classes == 10 and tuple(c.model.hparams.input_shape) == (1, 8, 8)


def _fixed_coupling(value: float) -> list[str]:
    """Override the last callback's coupling (the NeuralCollapseCallback in these configs).

    A fast_dev_run smoke test checks that the config builds and runs; fitting the coupling of a
    d=1024 pair (the bulk of the mlp_cifar10 test's time) checks nothing more.
    """
    import inspect

    from nclightning.callbacks import NeuralCollapseCallback

    params = inspect.signature(NeuralCollapseCallback).parameters
    name = "coupling" if "coupling" in params else "beta"
    return [f"--trainer.callbacks.init_args.{name}", str(value)]


@pytest.mark.parametrize(
    ("config", "model_args"),
    [
        ("resnet18_cifar10.yaml", ["--model.backbone_kwargs", "{width: 8}"]),
        ("resnet18_cifar10_mse.yaml", ["--model.backbone_kwargs", "{width: 8}"]),
        ("mlp_cifar10.yaml", _fixed_coupling(1.0)),
        ("layerwise_mlp_cifar10.yaml", []),
    ],
)
def test_cifar_configs_fast_dev_run_on_files_in_torchvision_format(tmp_path, config, model_args):
    root = write_tiny_cifar10(tmp_path / "cifar")
    rc = main(
        ["fit", "--config", config, "--trainer.fast_dev_run", "true",
         "--trainer.accelerator", "cpu", "--data.init_args.root", str(root),
         "--data.init_args.download", "false", "--data.init_args.batch_size", "8",
         "--data.init_args.num_workers", "0", *model_args]
    )  # fmt: skip
    assert rc == 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.lossy", "3"], "unknown option --model.lossy; did you mean --model.loss?"),
        (["--trainer.max_epoch", "3"], "did you mean --trainer.max_epochs?"),
        (["--model.lr", "abc"], "--model.lr: expected a number, got 'abc'"),
        (["--model.loss", "hinge"], "'hinge' is not a valid choice; choose one of 'ce', 'mse'"),
        (["--model.optimizer", "adam"], "choose one of 'sgd', 'adamw'; did you mean adamw?"),
        (["--data.init_args.batch_size", "abc"], "--data.init_args.batch_size: expected an int"),
        (["--data.init_args.batch_sizee", "3"], "did you mean --data.init_args.batch_size?"),
        (["--data.class_path", "nclightning.data.DigitDataModule"], "DigitsDataModule?"),
        (["--data", "DigitsDataModul"], "did you mean DigitsDataModule?"),
    ],
)
def test_parse_errors_are_one_line_naming_the_key_and_the_fix(args, expected, capsys):
    assert main(["fit", "--config", "digits_mlp.yaml", *QUICK, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("nclightning: error: ") and expected in err[0]
    assert len(err) == 2 and "nclightning fit --help" in err[1]  # not the 65-line usage


def test_unknown_backbone_is_one_clear_line(capsys):
    assert main(["fit", "--config", "digits_mlp.yaml", *QUICK, "--model.backbone", "foo"]) == 2
    err = capsys.readouterr().err
    assert "unknown backbone 'foo'" in err and "resnet18" in err and "mlp" in err
    assert "Traceback" not in err


def test_missing_data_directory_is_one_clear_line(tmp_path, capsys):
    rc = main(
        [
            "fit",
            "--config",
            "resnet18_cifar10.yaml",
            "--trainer.fast_dev_run",
            "true",
            "--data.init_args.root",
            str(tmp_path / "nowhere"),
            "--data.init_args.download",
            "false",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "nowhere" in err and "download" in err


def test_unknown_command_lists_commands(capsys):
    assert main(["fitt"]) == 2
    assert "fit, validate, test" in capsys.readouterr().err


def test_help_lists_bundled_configs(capsys):
    assert main([]) == 0
    assert "digits_mlp.yaml" in capsys.readouterr().out


def test_config_names_resolve_to_bundled_files_only_when_no_such_path(tmp_path):
    assert cli.resolve_config_args(["fit", "--config", "digits_mlp"]) == [
        "fit",
        "--config",
        str(CONFIG_DIR / "digits_mlp.yaml"),
    ]
    local = tmp_path / "digits_mlp.yaml"
    local.write_text("seed_everything: 1\n")
    assert cli.resolve_config_args(["fit", "--config=digits_mlp.yaml"]) == [
        "fit",
        "--config=digits_mlp.yaml",
    ]


def test_wandb_falls_back_to_offline_without_a_key(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert cli.ensure_wandb_mode() == "offline"
    import os

    assert os.environ["WANDB_MODE"] == "offline"
    assert "offline" in capsys.readouterr().err


def test_wandb_mode_set_by_the_user_is_kept(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert cli.ensure_wandb_mode() == "disabled"


def test_offline_wandb_run_says_where_it_went_and_how_to_sync(tmp_path, monkeypatch, capsys):
    import wandb

    wandb.teardown()  # wandb keeps process-wide settings from earlier (disabled-mode) tests
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    assert main(["fit", "--config", "digits_mlp.yaml", *QUICK]) == 0
    err = capsys.readouterr().err
    assert "wandb sync" in err
    run_dir = Path(err.split("wandb sync", 1)[1].split()[0])
    assert run_dir.is_dir() and any(run_dir.glob("*.wandb"))
