"""``record.history``: CSV rows as logged, resumed parts stitched, one epoch axis for every row."""

from __future__ import annotations

import itertools
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
        {"train/acc": 0.5, "epoch": 0.0, "step": 7.0},  # Lightning: one below the global step
        {"lr-Adam": 1e-3, "step": 8.0},
        {"train/acc": 0.7, "epoch": 1.0, "step": 15.0},
        {"lr-Adam": 1e-4, "step": 20.0},  # after the last epoch end: last steps-per-epoch
        {"other": 1.0},  # no step at all: unknown
    ]
    x = history.completed_epochs(rows)
    assert x[:5] == [0.0, 1.0, 1.0, 2.0, 2.5] and math.isnan(x[5])


# ---------------------------------------------------------------------------------------------
# stitching
# ---------------------------------------------------------------------------------------------


def test_a_single_uninterrupted_part_is_left_as_it_is():
    """Lightning's order: a probe row at the global step, then the epoch-end rows one step
    lower. A lower step inside one file is no resume: nothing is dropped (the report once
    kept only the probe before training because of it)."""
    rows = floats(rb.training_rows(4, probes=("train", "val")))
    assert any(b["step"] < a["step"] for a, b in itertools.pairwise(rows))
    dropped = []
    assert same_rows(history.stitch([rows], dropped=dropped), rows) and dropped == []


def canonical(rows):
    """Rows as a sorted list of sorted items (NaN made comparable): order-free comparison."""
    return sorted(sorted((k, "nan" if math.isnan(v) else v) for k, v in r.items()) for r in rows)


@settings(max_examples=40, deadline=None, database=None)
@given(
    checkpoint=st.integers(1, 5),
    lost=st.integers(0, 3),
    mid_epoch=st.booleans(),
    same_file=st.booleans(),
    relog_probe=st.booleans(),
    record_step=st.booleans(),
)
def test_a_resumed_run_reads_as_the_uninterrupted_one(
    checkpoint, lost, mid_epoch, same_file, relog_probe, record_step
):
    """Checkpoint after epoch c, crash up to ``lost`` epochs later (the values logged after
    the checkpoint differ: that timeline is abandoned), resume from c to the end: in the same
    file (the CSV logger cut it back to the checkpoint first) or in a new version whose
    resume step the run record gives (``record_step``) or not (its first logged step)."""
    from nclightning.loggers.csv_logger import ResumePoint, rows_to_keep

    total = 7
    crash = min(checkpoint + lost, total - 1)
    first = crashed_part(crash, checkpoint, mid_epoch)
    resumed = rb.training_rows(total, start=checkpoint)
    at_checkpoint = next(i for i, r in enumerate(first) if r.get(keys.EPOCHS_TRAINED) == checkpoint)
    if relog_probe:  # the checkpoint was saved before that epoch's probe: probed again
        first = [
            perturbed([r], -1)[0] if r.get(keys.EPOCHS_TRAINED) == checkpoint else r for r in first
        ]
        resumed = [rb.probe_row(checkpoint), *resumed]
    else:  # the probe row was on disk when the checkpoint was saved
        at_checkpoint += 1
    step = rb.STEPS * checkpoint
    dropped = []
    if same_file:
        on_disk = [{k: str(v) for k, v in r.items()} for r in first]
        kept = [r for r in rows_to_keep(on_disk, ResumePoint(at_checkpoint, step))]
        stitched = history.stitch([floats(kept) + floats(resumed)], dropped=dropped)
        assert dropped == []
    else:
        starts = [None, step if record_step else None]
        stitched = history.stitch([floats(first), floats(resumed)], starts, dropped)
        abandoned = [r for r in first if r[keys.STEP] > step]
        assert [d.rows for d in dropped] == ([len(abandoned)] if abandoned else [])
    assert canonical(stitched) == canonical(floats(rb.training_rows(total)))


def test_a_value_logged_again_at_the_same_moment_replaces_the_earlier_one():
    rows = [
        {"epochs_trained": 2.0, "step": 20.0, "nc-train/h/nc1": 1.0},
        {"epochs_trained": 2.0, "step": 20.0, "nc-train/h/nc1": 0.5},  # same probe epoch
        {"epoch": 1.0, "step": 20.0, "val/acc": 0.3},
        {"epoch": 1.0, "step": 20.0, "val/acc": 0.4},  # trainer.validate after fit
        {"epoch": 1.0, "step": 21.0, "val/acc": 0.6},  # another step: kept
    ]
    assert history.stitch([rows]) == [rows[1], rows[3], rows[4]]
