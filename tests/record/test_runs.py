"""``record.runs``: versions found, resume chains, snapshots, grouping seeds of one setting."""

from __future__ import annotations

import math

import pytest
import runbuild as rb
from runbuild import crashed_part, floats, same_rows

from nclightning.errors import DataError
from nclightning.record import groups, keys, runs


def uninterrupted(tmp_path, epochs=6):
    folder = rb.write_csv(tmp_path / "ref", rb.training_rows(epochs))
    return runs.load_run(runs.find_versions(folder))


def resumed_in_new_version(root, *, link: str, checkpoint=3, crash=4, total=6):
    """version_0 crashed after ``crash`` epochs, version_1 resumed from ``checkpoint``."""
    v0 = rb.write_csv(root, crashed_part(crash, checkpoint, mid_epoch=True), name="digits")
    v1 = rb.write_csv(root, rb.training_rows(total, start=checkpoint), name="digits")
    rb.write_config(v0, seed=1)
    ckpt = f"runs/digits/version_0/checkpoints/epoch={checkpoint - 1}.ckpt"
    rb.write_config(v1, seed=1, ckpt_path=ckpt if link == "config" else None)
    if link == "snapshots":
        rb.write_snapshots(v0, "train", range(crash + 1), token="tok-1")
        rb.write_snapshots(v1, "train", range(checkpoint, total + 1), token="tok-1")
    return v0, v1


def test_versions_and_their_contents_are_found(tmp_path):
    v0 = rb.write_csv(tmp_path / "runs", rb.training_rows(2), name="a")
    rb.write_config(v0, seed=0)
    rb.write_snapshots(v0, "train", [0, 2])
    custom = tmp_path / "runs" / "my_snaps"  # snapshot_dir=path: the files name the probe
    rb.write_snapshots(None, "val", [1], folder=custom)
    only_snaps = tmp_path / "runs" / "b" / "version_3"
    rb.write_snapshots(only_snaps, "test", [0])
    found = runs.find_versions(tmp_path / "runs")
    assert [v.path for v in found] == [v0, only_snaps, custom]
    assert found[0].metrics_csv == v0 / "metrics.csv" and found[0].config_file == v0 / "config.yaml"
    assert found[0].snapshot_dirs == {"train": v0 / "snapshots" / "train"} and found[0].number == 0
    assert found[1].metrics_csv is None and found[1].number == 3
    assert found[1].snapshot_dirs == {"test": only_snaps / "snapshots" / "test"}
    assert found[2].snapshot_dirs == {"val": custom} and found[2].number is None
    assert runs.find_versions(v0 / "metrics.csv")[0].path == v0


@pytest.mark.parametrize("link", ["config", "snapshots"])
def test_a_run_resumed_in_a_new_version_is_one_stitched_run(tmp_path, link):
    resumed_in_new_version(tmp_path / "runs", link=link)
    (run,) = runs.find_runs(tmp_path / "runs")
    assert [v.path.name for v in run.versions] == ["version_0", "version_1"]
    ref = uninterrupted(tmp_path)
    assert same_rows(run.rows, ref.rows) and run.x == ref.x
    assert run.series("nc-train/penultimate/nc1") == ref.series("nc-train/penultimate/nc1")
    assert run.config["seed_everything"] == 1


def test_the_later_version_alone_brings_the_one_it_continues(tmp_path):
    _, v1 = resumed_in_new_version(tmp_path / "runs", link="config")
    (run,) = runs.find_runs(v1)
    assert [v.path.name for v in run.versions] == ["version_0", "version_1"]
    assert same_rows(run.rows, uninterrupted(tmp_path).rows)


def test_a_measurement_folder_is_read_only_when_given(tmp_path):
    """``nclightning measure`` writes ``measure_N`` beside the training run, with a config that
    names the checkpoint: it is a run of its own, not part of the training run's history."""
    v0 = rb.write_csv(tmp_path / "runs", rb.training_rows(4), name="digits")
    measured = rb.write_csv(
        tmp_path / "runs", [rb.probe_row(4)], name="digits", version="measure_0"
    )
    rb.write_config(measured, seed=0, ckpt_path=str(v0 / "checkpoints" / "last.ckpt"))
    (run,) = runs.find_runs(tmp_path / "runs")
    assert [v.path for v in run.versions] == [v0]
    (alone,) = runs.find_runs(measured)
    assert [v.path for v in alone.versions] == [measured]
    assert alone.series("nc-train/penultimate/nc1") == [
        (4.0, rb.value("train", "penultimate", "nc1", 4))
    ]


def test_unlinked_versions_are_separate_runs(tmp_path):
    rb.write_csv(tmp_path / "runs", rb.training_rows(2), name="digits")
    rb.write_csv(tmp_path / "runs", rb.training_rows(3), name="digits")
    found = runs.find_runs(tmp_path / "runs")
    assert [r.label for r in found] == ["version_0", "version_1"]
    assert [max(r.x) for r in found] == [2.0, 3.0]


def test_snapshots_of_a_resumed_run_follow_the_stitched_rows(tmp_path):
    v0, v1 = resumed_in_new_version(tmp_path / "runs", link="snapshots", checkpoint=3, crash=5)
    (run,) = runs.find_runs(tmp_path / "runs")
    files = run.snapshots["train"]
    assert [f.name for f in files] == [f"probe-{e:04d}.pt" for e in range(7)]
    # the abandoned timeline's files (epochs 4, 5 of version_0) are replaced by version_1's
    assert [f.parent.parent.parent for f in files] == [v0] * 3 + [v1] * 4
    snap = run.snapshot("train")
    assert snap["epochs_trained"] == 6 and run.snapshot("train", 2)["epochs_trained"] == 2
    with pytest.raises(DataError, match="no snapshot of probe 'train' at 9"):
        run.snapshot("train", 9)


def test_a_version_with_snapshots_only_reads_their_rows(tmp_path):
    folder = tmp_path / "snaps_only"
    rb.write_snapshots(folder, "train", [0, 1, 2])
    (run,) = runs.find_runs(folder)
    assert run.x == [0.0, 1.0, 2.0]
    want = [(float(e), rb.value("train", "h0", "nc1", e)) for e in range(3)]
    assert run.series(keys.layer_key("train", "h0", "nc1")) == want


def test_missing_or_empty_folders_are_user_errors(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        runs.find_runs(tmp_path / "nope")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(DataError, match=r"metrics\.csv"):
        runs.find_runs(tmp_path / "empty")


def seed_runs(root, seeds=(1, 2, 3), wd=5e-4, name="digits"):
    for s in seeds:
        folder = rb.write_csv(root, rb.training_rows(3, scale=1 + 0.1 * s), name=name)
        rb.write_config(folder, seed=s, wd=wd)


def test_seeds_of_one_setting_are_grouped_by_their_config(tmp_path):
    seed_runs(tmp_path / "runs")
    seed_runs(tmp_path / "runs", seeds=(1,), wd=1e-3)  # another setting: its own group
    rb.write_csv(tmp_path / "runs", rb.training_rows(2), name="digits")  # no config
    found = runs.find_runs(tmp_path / "runs")
    by_config = groups.group_runs(found)
    assert [len(g) for g in by_config.values()] == [3, 1, 1]
    assert next(iter(by_config)) == "digits"
    assert [r.label for r in by_config["digits"]] == ["version_0", "version_1", "version_2"]
    assert [len(g) for g in groups.group_runs(found, "parent").values()] == [5]
    assert [len(g) for g in groups.group_runs(found, "none").values()] == [1] * 5
    with pytest.raises(ValueError, match="by must be"):
        groups.group_runs(found, "seed")


def test_labels_grow_until_unique(tmp_path):
    paths = [tmp_path / "mse" / "version_0", tmp_path / "ce" / "version_0", tmp_path / "x"]
    assert runs.run_labels(paths) == ["mse/version_0", "ce/version_0", "x"]
    assert runs.run_labels([paths[2], paths[2]]) == ["x", "x-2"]


def test_series_leaves_out_rows_off_the_axis(tmp_path):
    run = uninterrupted(tmp_path, epochs=2)
    lr = run.series("lr-SGD")
    assert lr == [(0.0, 0.05), (1.0, 0.05)]
    assert all(math.isfinite(x) for x, _ in run.series("train/loss_step"))
    assert same_rows(run.rows, floats(rb.training_rows(2)))
