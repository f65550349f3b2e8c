"""``nclightning study wd`` (paper Fig. 3 protocol, docs/science.md §6): the runs it plans."""

from __future__ import annotations

from nclightning.cli import main
from nclightning.commands.study import variants


def test_variants_are_the_baseline_and_the_four_single_group_changes():
    runs = {v.label: (v.weight_decay, v.classifier_weight_decay) for v in variants(5e-4, 5e-4)}
    assert runs == {
        f"{loss}/{name}": decays
        for loss in ("mse", "ce")
        for name, decays in {
            "baseline": (5e-4, 5e-4),
            "classifier_x2": (5e-4, 1e-3),
            "classifier_x0": (5e-4, 0.0),
            "features_x2": (1e-3, 5e-4),
            "features_x0": (0.0, 5e-4),
        }.items()
    }
    mse = next(v for v in variants(1.0, 1.0) if v.loss == "mse")
    assert mse.overrides()[:4] == ["--model.loss", "mse", "--model.bias", "false"]  # bias-free


def test_dry_run_reads_the_config_decays_and_passes_overrides_on(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    rc = main(
        [
            "study",
            "wd",
            "--config",
            "wd_study_digits.yaml",
            "--dry-run",
            "--losses",
            "ce",
            "--trainer.max_epochs",
            "3",
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and len(out) == 5
    # the config's weight decay is 5e-3 for both groups (classifier by interpolation)
    assert "--model.weight_decay 0.01 --model.classifier_weight_decay 0.005" in out[3]
    assert all(line.endswith("--trainer.max_epochs 3") for line in out)
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_unknown_variant_is_named(capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(["study", "wd", "--config", "wd_study_digits", "--only", "ce/nope"]) == 2
    assert "ce/nope" in capsys.readouterr().err


def test_seeds_train_every_variant_with_consecutive_seeds(capsys, monkeypatch, tmp_path):
    """--seeds 3: each variant three times, seeds 0, 1, 2 (the config's seed_everything is 0)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = ["study", "wd", "--config", "wd_study_digits.yaml", "--dry-run", "--losses", "mse"]
    assert main([*args, "--only", "mse/baseline", "mse/features_x0", "--seeds", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    planned = [(line.split(": ")[1], line.rsplit(" ", 1)[1]) for line in out]
    labels = [(lab, s) for lab in ("mse/baseline", "mse/features_x0") for s in (0, 1, 2)]
    assert planned == [(f"[{i}/6] {lab} seed {s}", str(s)) for i, (lab, s) in enumerate(labels, 1)]
    assert all("--seed_everything" in line for line in out)


def test_seeds_must_be_positive(capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(["study", "wd", "--config", "wd_study_digits", "--seeds", "0"]) == 2
    assert "--seeds must be a positive integer" in capsys.readouterr().err
