"""``record.history``: CSV rows as logged, resumed parts stitched, one epoch axis for every row."""

from __future__ import annotations

import math

import runbuild as rb
from hypothesis import given, settings
from hypothesis import strategies as st
from runbuild import crashed_part, floats, perturbed, same_rows

from nclightning.record import history, keys

# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def test_csv_written_by_lightning_reads_back_exactly(tmp_path):
    rows = rb.training_rows(3, probes=("train", "val"))
    folder = rb.write_csv(tmp_path, rows)
    header = (folder / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header == sorted(header) and "nc-val/h0/nc1" in header  # CSVLogger's format
    parsed = history.read_metrics_csv(folder / "metrics.csv")
    assert same_rows(parsed, floats(rows))  # empty cells left out, NaN and inf kept
    assert math.isnan(parsed[0]["nc-train/penultimate/nc3"])
    assert parsed[0]["pm-train-h0->penultimate/coupling"] == math.inf


# ---------------------------------------------------------------------------------------------
# the x-axis
# ---------------------------------------------------------------------------------------------


def test_every_row_on_completed_epochs_with_its_own_columns_untouched():
    rows = floats(rb.training_rows(3))
    x = history.completed_epochs(rows)
    for row, xv in zip(rows, x):
        if keys.EPOCHS_TRAINED in row:  # probe rows: epochs_trained, no epoch column
            assert "epoch" not in row and xv == row[keys.EPOCHS_TRAINED]
        elif "train/acc" in row or "val/acc" in row:  # epoch-level: epoch + 1
            assert xv == row["epoch"] + 1
        elif "train/loss_step" in row:  # logged at step 5 of 10 of its epoch
            assert xv == row["epoch"] + 0.5
        else:  # lr-SGD, logged with a step only at the start of its epoch
            assert set(row) == {"lr-SGD", keys.STEP} and xv == row[keys.STEP] / rb.STEPS
    assert rows == floats(rb.training_rows(3))  # the reader adds no column to the rows


def test_step_rows_without_probes_use_the_epoch_ends_and_extrapolate():
    rows = [
        {"lr-Adam": 1e-3, "step": 0.0},
        {"train/acc": 0.5, "epoch": 0.0, "step": 8.0},
        {"lr-Adam": 1e-3, "step": 8.0},
        {"train/acc": 0.7, "epoch": 1.0, "step": 16.0},
        {"lr-Adam": 1e-4, "step": 20.0},  # after the last epoch end: last steps-per-epoch
        {"other": 1.0},  # no step at all: unknown
    ]
    x = history.completed_epochs(rows)
    assert x[:5] == [0.0, 1.0, 1.0, 2.0, 2.5] and math.isnan(x[5])


# ---------------------------------------------------------------------------------------------
# stitching
# ---------------------------------------------------------------------------------------------


def test_a_single_uninterrupted_part_is_left_as_it_is():
    rows = floats(rb.training_rows(4, probes=("train", "val")))
    assert same_rows(history.stitch([rows]), rows)


@settings(max_examples=40, deadline=None)
@given(
    checkpoint=st.integers(1, 5),
    lost=st.integers(0, 3),
    mid_epoch=st.booleans(),
    same_file=st.booleans(),
    relog_probe=st.booleans(),
)
def test_a_resumed_run_reads_as_the_uninterrupted_one(
    checkpoint, lost, mid_epoch, same_file, relog_probe
):
    """Checkpoint after epoch c, crash up to ``lost`` epochs later (the values logged after
    the checkpoint differ: that timeline is abandoned), resume from c to the end."""
    total = 7
    crash = min(checkpoint + lost, total - 1)
    first = crashed_part(crash, checkpoint, mid_epoch)
    resumed = rb.training_rows(total, start=checkpoint)
    if relog_probe:  # the probe of the checkpoint's epoch logged again (later value wins)
        first = [
            perturbed([r], -1)[0] if r.get(keys.EPOCHS_TRAINED) == checkpoint else r for r in first
        ]
        resumed = [rb.probe_row(checkpoint), *resumed]
    parts = [first + resumed] if same_file else [first, resumed]
    stitched = history.stitch([floats(p) for p in parts])
    assert same_rows(stitched, floats(rb.training_rows(total)))


def test_a_value_logged_again_at_the_same_moment_replaces_the_earlier_one():
    rows = [
        {"epochs_trained": 2.0, "step": 20.0, "nc-train/h/nc1": 1.0},
        {"epochs_trained": 2.0, "step": 20.0, "nc-train/h/nc1": 0.5},  # same probe epoch
        {"epoch": 1.0, "step": 20.0, "val/acc": 0.3},
        {"epoch": 1.0, "step": 20.0, "val/acc": 0.4},  # trainer.validate after fit
        {"epoch": 1.0, "step": 21.0, "val/acc": 0.6},  # another step: kept
    ]
    assert history.stitch([rows]) == [rows[1], rows[3], rows[4]]
