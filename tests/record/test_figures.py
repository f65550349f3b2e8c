"""``record.figures``: the named figures the callback logs (from its own rows and moments)."""

from __future__ import annotations

import io

import numpy as np
import runbuild as rb
import torch
from figtools import caption, panels
from runbuild import floats

from nclightning import plotting
from nclightning.metrics import ClassMoments
from nclightning.record import figures


def callback_rows(epochs=3, probes=("train", "val")):
    """What the callback holds in memory: its probe rows only (no Lightning rows, no CSV)."""
    rows = floats(rb.training_rows(epochs, probes=probes))
    return [r for r in rows if "epochs_trained" in r]


def moments(epoch: int) -> dict[str, ClassMoments]:
    out = {}
    for i, layer in enumerate(rb.LAYERS):
        f = rb.features(epoch, i)
        out[layer] = ClassMoments.from_features(torch.from_numpy(f.h), torch.from_numpy(f.y))
    return out


def test_the_callbacks_call_names_every_figure():
    snapshot = {"layers": moments(3), "class_names": ["a", "b", "c", "d"], "epochs_trained": 3}
    notes: list[str] = []
    drawn = figures.probe_figures(callback_rows(), "val", snapshot=snapshot, notes=notes)
    assert set(drawn) == {
        "metrics_val",
        "depth_profile_val",
        *(f"splits_train_vs_val_{lay}" for lay in rb.LAYERS),
        *(f"class_cosine_val_{lay}" for lay in rb.LAYERS),
        *(f"class_cdnv_val_{lay}" for lay in rb.LAYERS),
        "class_variance_val",
    }
    assert notes == []
    (bars, *_) = panels(drawn["class_variance_val"])
    f = rb.features(3, 0)
    want = [np.mean(np.sum((f.h[f.y == k] - f.h[f.y == k].mean(0)) ** 2, 1)) for k in range(4)]
    np.testing.assert_allclose([p.get_height() for p in bars.containers[0]], want, rtol=1e-10)
    train = figures.probe_figures(callback_rows(), "train")
    assert set(train) == {"metrics_train", "depth_profile_train", "pm_h0_to_penultimate_train"}


def test_figures_become_wandb_images():
    import wandb
    from PIL import Image

    fig = figures.probe_figures(callback_rows(), "train")["metrics_train"]
    image = wandb.Image(Image.open(io.BytesIO(plotting.figure_png(fig))))
    assert image.image.size[0] > 200 and image.image.size[1] > 200


def test_what_cannot_be_drawn_is_noted_not_raised():
    rows = [{"epochs_trained": 0.0, "step": 0.0, "nc-train/h/nc3": float("nan")}]
    notes: list[str] = []
    assert figures.probe_figures(rows, "train", notes=notes) == {}
    assert any("no metrics figure" in n for n in notes)
    assert any("no depth profile" in n for n in notes)
    one_class = {"layers": {"h": {k: v[:1] for k, v in rb.features(0, 0).moments().items()}}}
    assert figures.class_figures(one_class, "train", notes=notes) == {}
    assert "fewer than two classes" in notes[-1]


def test_a_figure_with_a_left_out_metric_says_so():
    rows = callback_rows(2, probes=("train",))
    fig = figures.curve_figures(rows, "train", metrics=["nc1", "nc4"])["metrics_train"]
    assert caption(fig) == ""
    for r in rows:
        r["nc-train/penultimate/nc4"] = float("nan")
    fig = figures.curve_figures(rows, "train", metrics=["nc1", "nc4"])["metrics_train"]
    assert "nc4 (no finite value)" in caption(fig)


def test_class_figures_from_arrays_the_callback_already_computed():
    from nclightning.metrics import class_quantities

    m = moments(2)["penultimate"]
    arrays = class_quantities(m)
    from_arrays = figures.class_figures({"layers": {"penultimate": arrays}}, "train")
    from_moments = figures.class_figures({"layers": {"penultimate": m}}, "train")
    assert (
        set(from_arrays)
        == set(from_moments)
        == {
            "class_cosine_train_penultimate",
            "class_cdnv_train_penultimate",
            "class_variance_train",
        }
    )
    a = panels(from_arrays["class_cosine_train_penultimate"])[0].images[0].get_array()
    b = panels(from_moments["class_cosine_train_penultimate"])[0].images[0].get_array()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, arrays["cosine_matrix"].numpy(), rtol=0, atol=0)
