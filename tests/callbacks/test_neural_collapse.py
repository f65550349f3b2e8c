"""NeuralCollapseCallback in real Trainers: values, layers, data, robustness, snapshots, W&B."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from support import RecordingLogger, nearest_mean, reference_metrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nclightning import NeuralCollapseCallback
from nclightning.data import SyntheticDataModule
from nclightning.errors import ConfigurationError
from nclightning.metrics import ClassMoments, metrics_from_moments
from nclightning.models import CollapseClassifier
from nclightning.record.keys import accuracy_key, layer_key, pair_key
from nclightning.record.snapshots import list_snapshots, read_snapshot

K = 4


def _trainer(callbacks, epochs=2, logger=None, **kwargs) -> Trainer:
    return Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger if logger else False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _data(**kwargs) -> SyntheticDataModule:
    opts = dict(
        num_classes=K,
        samples_per_class=40,
        test_samples_per_class=10,
        shape=(16,),
        batch_size=32,
        seed=0,
        noise=1.0,
        separation=3.0,
    )
    opts.update(kwargs)
    return SyntheticDataModule(**opts)


def _model(depth=3, width=24, **kwargs) -> CollapseClassifier:
    torch.manual_seed(0)
    opts = dict(
        num_classes=K,
        input_shape=(16,),
        backbone="mlp",
        backbone_kwargs={"depth": depth, "width": width, "batch_norm": False},
        lr=0.05,
        weight_decay=5e-4,
        scheduler="none",
    )
    opts.update(kwargs)
    return CollapseClassifier(**opts)


class FeatureRecorder(Callback):
    """Independent extraction after each epoch: ``model.features`` and a manual hook on h0."""

    def __init__(self, dm, h0_module: str) -> None:
        self.dm, self.h0_module, self.epochs = dm, h0_module, {}

    def _record(self, trainer, model, epoch):
        x, y = (torch.stack(t) for t in zip(*self.dm.probe_dataset("train")))
        store = {}
        module = dict(model.named_modules())[self.h0_module]
        handle = module.register_forward_hook(lambda m, a, o: store.__setitem__("h0", o))
        was = model.training
        model.eval()
        with torch.no_grad():
            logits = model(x)
            penultimate = model.features(x)
        model.train(was)
        handle.remove()
        self.epochs[epoch] = {
            "y": y.numpy(),
            "penultimate": penultimate.double().numpy(),
            "h0": store["h0"].double().numpy(),
            "pred": logits.argmax(1).numpy(),
            "W": model.classifier.weight.detach().double().numpy(),
        }

    def on_train_start(self, trainer, model):
        self._record(trainer, model, 0)

    def on_train_epoch_end(self, trainer, model):
        self._record(trainer, model, trainer.current_epoch + 1)


def test_logged_metrics_equal_a_float64_reference_on_independently_extracted_features():
    dm, model, logger = _data(), _model(), RecordingLogger()
    recorder = FeatureRecorder(dm, "backbone.blocks.1")
    cb = NeuralCollapseCallback(pairs=[], log_figures=False)
    _trainer([cb, recorder], epochs=2, logger=logger).fit(model, dm)
    probes = logger.probes()
    assert sorted(probes) == [0, 1, 2]  # baseline + every epoch
    for epoch, row in probes.items():
        rec = recorder.epochs[epoch]
        for layer in ("penultimate", "h0"):
            weight = rec["W"] if layer == "penultimate" else None
            expected = reference_metrics(rec[layer], rec["y"], K, weight)
            for key, value in expected.items():
                got = row[layer_key("train", layer, key)]
                assert got == pytest.approx(value, rel=1e-5), (epoch, layer, key)
        assert layer_key("train", "h0", "nc3") not in row  # h0 does not feed the classifier
        assert row[accuracy_key("train")] == pytest.approx(np.mean(rec["pred"] == rec["y"]))
        # nc4 (Papyan): the network's prediction vs the nearest class mean of THIS probe
        for layer in ("penultimate", "h0"):
            means = np.stack([rec[layer][rec["y"] == k].mean(0) for k in range(K)])
            expected = np.mean(rec["pred"] != nearest_mean(rec[layer], means))
            assert row[layer_key("train", layer, "nc4")] == pytest.approx(expected, abs=1e-12)


class NamedNet(LightningModule):
    """A user's own module: no CollapseClassifier, no feature_layers."""

    def __init__(self, dim=16, width=20, classes=K):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(dim, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
        )
        self.head = nn.Linear(width, classes)
        self.poison = False

    def forward(self, x):
        h = self.body(x)
        if self.poison:
            h = h * float("nan")
        return self.head(h)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader(n_per_class=30, classes=range(K), dim=16, seed=0, batch_size=25):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(K, dim, generator=g)
    y = torch.tensor(list(classes)).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def test_user_module_with_named_layers_and_a_named_probe_loader():
    logger, loader = RecordingLogger(), _loader()
    cb = NeuralCollapseCallback(
        layers={"h0": "body.3", "h": "body.5"},
        pairs=[],
        probe=loader,
        name="extra",
        log_figures=False,
    )
    _trainer([cb], epochs=1, logger=logger).fit(NamedNet(), _loader(seed=1))
    row = logger.probes()[1]
    keys = {layer_key("extra", "h", "nc1"), layer_key("extra", "h0", "nc1"), accuracy_key("extra")}
    assert keys <= set(row)
    assert layer_key("extra", "h", "nc3") in row  # body.5 feeds head
    assert layer_key("extra", "h0", "nc3") not in row
    assert all(math.isfinite(row[layer_key("extra", a, "nc1")]) for a in ("h", "h0"))
    assert "epoch" not in row and row["epochs_trained"] == 1.0  # one meaning per name


def test_a_probe_loader_needs_a_name():
    with pytest.raises(ConfigurationError, match="one name per DataLoader probe"):
        NeuralCollapseCallback(probe=_loader())


def test_unknown_layer_lists_the_models_modules():
    cb = NeuralCollapseCallback(layers=["body.7"], pairs=[])
    with pytest.raises(ConfigurationError) as err:
        _trainer([cb], epochs=1).fit(NamedNet(), _loader())
    msg = str(err.value)
    assert "unknown layer 'body.7'" in msg and "body.5" in msg and "head" in msg


def test_module_without_feature_layers_needs_layers():
    with pytest.raises(ConfigurationError, match="layers="):
        _trainer([NeuralCollapseCallback()], epochs=1).fit(NamedNet(), _loader())


def test_pair_must_name_probed_layers():
    cb = NeuralCollapseCallback(layers={"a": "body.1"}, pairs=[("a", "b")])
    with pytest.raises(ConfigurationError, match="probed layers are a"):
        _trainer([cb], epochs=1).fit(NamedNet(), _loader())


def test_nan_features_give_nan_metrics_and_one_warning_not_a_crash():
    model, logger = NamedNet(), RecordingLogger()

    class Poison(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            pl_module.poison = trainer.current_epoch >= 1  # diverges in the second epoch

    cb = NeuralCollapseCallback(
        layers={"h": "body.5"}, pairs=[], probe=_loader(), name="p", log_figures=False
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer([Poison(), cb], epochs=3, logger=logger).fit(model, _loader(seed=1))
    probes = logger.probes()
    key = layer_key("p", "h", "nc1")
    assert math.isfinite(probes[1][key])
    assert math.isnan(probes[2][key]) and math.isnan(probes[3][key])
    # undefined features: an undefined accuracy too (not the share of argmax ties)
    assert math.isnan(probes[2][accuracy_key("p")]) and math.isnan(probes[3][accuracy_key("p")])
    messages = [str(w.message) for w in caught if "NaN/Inf" in str(w.message)]
    assert len(messages) == 1 and "'h'" in messages[0]


class _OneBadFeature(nn.Module):
    """Identity that, in eval mode, puts ``value`` in one element of one sample."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, h):
        if self.training:
            return h
        h = h.clone()
        h[-1, 1] = self.value
        return h


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("cache_budget", ["auto", 0])  # cached, streamed
def test_one_non_finite_feature_makes_the_accuracy_nan(value, cache_budget):
    model, logger = NamedNet(), RecordingLogger()
    model.body.append(_OneBadFeature(value))  # body.6, after the ReLU
    cb = NeuralCollapseCallback(
        layers={"h": "body.6", "g": "body.3"},
        pairs=[],
        probe=_loader(),
        name="p",
        log_figures=False,
        cache_budget=cache_budget,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer([cb], epochs=1, logger=logger).fit(model, _loader(seed=1))
    probes = logger.probes()
    assert probes, "no probe was logged"
    probe = probes[max(probes)]
    assert math.isnan(probe[accuracy_key("p")])  # one bad element: undefined features
    assert math.isfinite(probe[layer_key("p", "g", "nc1")])  # the other layer is measured


def test_class_missing_from_the_probe_is_named_and_the_rest_is_measured():
    logger = RecordingLogger()
    probe = _loader(classes=[0, 1, 3])  # class 2 absent
    cb = NeuralCollapseCallback(
        layers={"h": "body.5"}, pairs=[], probe=probe, name="p", log_figures=False
    )
    with pytest.warns(UserWarning, match=r"class\(es\) 2 have no sample"):
        _trainer([cb], epochs=1, logger=logger).fit(NamedNet(), _loader(seed=1))
    assert math.isfinite(logger.probes()[1][layer_key("p", "h", "nc1")])
    # an absent class is not an undefined feature: the accuracy stays defined
    assert 0.0 <= logger.probes()[1][accuracy_key("p")] <= 1.0


def test_probe_restores_modes_hooks_and_grad_even_on_error():
    model = NamedNet()
    cb = NeuralCollapseCallback(
        layers={"h": "body.5"}, pairs=[], probe=_loader(), name="p", log_figures=False
    )
    seen = {}

    class Check(Callback):  # runs after the callback's hooks
        def on_train_epoch_start(self, trainer, pl_module):
            pl_module.body[1].eval()  # a deliberately frozen submodule must stay in eval mode

        def on_train_epoch_end(self, trainer, pl_module):
            seen["modes"] = [m.training for m in pl_module.modules()]
            seen["hooks"] = sum(len(m._forward_hooks) for m in pl_module.modules())
            seen["grad"] = torch.is_grad_enabled()

    _trainer([cb, Check()], epochs=1).fit(model, _loader(seed=1))
    assert len(cb.history) == 2  # the epoch-end probe ran before Check looked
    assert seen["modes"] == [True, True, True, False, True, True, True, True, True]
    assert seen["hooks"] == 0 and seen["grad"]

    class Boom(Exception):
        pass

    def explode(*_):
        raise Boom

    model = NamedNet()
    model.head.register_forward_hook(explode)
    cb = NeuralCollapseCallback(layers={"h": "body.5"}, pairs=[], probe=_loader(), name="p")
    with pytest.raises(Boom):
        _trainer([cb], epochs=1).fit(model, _loader(seed=1))
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.body.modules())
    assert torch.is_grad_enabled()


def _snapshot_files(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_snapshots_are_atomic_loadable_and_match_the_logged_values(tmp_path):
    dm, model, logger = _data(), _model(), RecordingLogger()
    cb = NeuralCollapseCallback(
        pairs=[],
        snapshot_dir=str(tmp_path / "snap"),
        snapshot_features=50,
        log_figures=False,
    )
    _trainer([cb], epochs=2, logger=logger).fit(model, dm)
    assert _snapshot_files(tmp_path / "snap") == ["probe-0000.pt", "probe-0001.pt", "probe-0002.pt"]
    snap = read_snapshot(tmp_path / "snap" / "probe-0002.pt")
    assert snap["epochs_trained"] == 2 and snap["probe"] == "train"
    row = logger.probes()[2]
    assert snap["row"] == {k: v for k, v in row.items() if k != "epochs_trained"}
    layer = snap["layers"]["h0"]  # its scatter projected on the span of the class means
    m = ClassMoments(
        counts=layer["counts"],
        means=layer["means"],
        scatter=layer.get("scatter"),
        class_ss=layer["class_ss"],
        span_basis=layer.get("span_basis"),
        span_scatter=layer.get("span_scatter"),
        norm_sums=layer["norm_sums"],
    )
    for key, value in metrics_from_moments(m).items():
        assert value == pytest.approx(row[layer_key("train", "h0", key)], rel=1e-10), key
    assert snap["features"]["penultimate"].shape == (50, 24)
    assert snap["features"]["penultimate"].dtype == torch.float16
    assert torch.equal(snap["labels"], dm.probe_targets("train")[:50])
    mode = (tmp_path / "snap" / "probe-0002.pt").stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()  # the permissions of any other file written


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_snapshots_default_to_the_runs_version_folder_and_refuse_another_runs(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    dm = _data()
    cb = NeuralCollapseCallback(coupling=1.0, log_figures=False)
    _trainer([cb], epochs=1, logger=CSVLogger(tmp_path, name="run", version=0)).fit(_model(), dm)
    folder = tmp_path / "run" / "version_0" / "snapshots" / "train"
    assert [p.name for p in list_snapshots(folder)] == ["probe-0000.pt", "probe-0001.pt"]
    other = NeuralCollapseCallback(snapshot_dir=str(folder), log_figures=False)
    with pytest.raises(ConfigurationError, match="belongs to another run"):
        _trainer([other], epochs=1).fit(_model(), _data())
    assert [p.name for p in list_snapshots(folder)] == ["probe-0000.pt", "probe-0001.pt"]


def test_max_samples_draws_one_balanced_subset_for_the_whole_run(tmp_path):
    dm = _data(samples_per_class=50)
    cb = NeuralCollapseCallback(
        pairs=[], max_samples=60, seed=3, snapshot_dir=str(tmp_path), log_figures=False
    )
    _trainer([cb], epochs=2).fit(_model(), dm)
    counts = [read_snapshot(p)["layers"]["penultimate"]["counts"] for p in list_snapshots(tmp_path)]
    assert len(counts) == 3
    assert all(torch.equal(c, torch.full((K,), 15.0, dtype=torch.float64)) for c in counts)
    subset = cb.state_dict()["probes"]["train"]["subset"]
    targets = dm.probe_targets("train")
    assert len(subset) == 60 and torch.equal(targets[subset].bincount(), torch.full((K,), 15))
    again = NeuralCollapseCallback(pairs=[], max_samples=60, seed=3, log_figures=False)
    _trainer([again], epochs=1).fit(_model(), _data(samples_per_class=50))
    again_subset = again.state_dict()["probes"]["train"]["subset"]
    assert torch.equal(again_subset, subset)  # same seed, same subset


def test_every_n_epochs_and_last_epoch(tmp_path):
    logger = RecordingLogger()
    cb = NeuralCollapseCallback(pairs=[], every_n_epochs=2, log_figures=False)
    _trainer([cb], epochs=5, logger=logger).fit(_model(), _data())
    assert sorted(logger.probes()) == [0, 2, 4, 5]


def test_fitted_coupling_searched_near_the_previous_one_is_the_full_range_fit(tmp_path):
    """The callback searches near its previous coupling first: it must still find the root that
    a fresh full-range fit of the same moments finds."""
    from nclightning.perturbation import fit_pair

    logger = RecordingLogger()
    cb = NeuralCollapseCallback(snapshot_dir=str(tmp_path), log_figures=False)
    _trainer([cb], epochs=3, logger=logger).fit(_model(), _data())
    for epoch in (2, 3):
        result_row = logger.probes()[epoch]
        snap = read_snapshot(tmp_path / f"probe-{epoch:04d}.pt")
        m0, m = (
            ClassMoments(
                counts=snap["layers"][a]["counts"],
                means=snap["layers"][a]["means"],
                scatter=snap["layers"][a].get("scatter"),
                class_ss=snap["layers"][a]["class_ss"],
                span_basis=snap["layers"][a].get("span_basis"),
                span_scatter=snap["layers"][a].get("span_scatter"),
            )
            for a in ("h0", "penultimate")
        )
        ref = fit_pair(m0, m, lambda_W=5e-4, lambda_H=5e-4)
        got = result_row[pair_key("train", "h0->penultimate", "coupling")]
        assert ref.status == "fitted" and got == pytest.approx(ref.coupling, rel=1e-4)
        assert result_row[pair_key("train", "h0->penultimate", "predicted/nc1_tilde")] == (
            pytest.approx(result_row[layer_key("train", "penultimate", "nc1_tilde")], rel=1e-4)
        )
        assert snap["pairs"]["h0->penultimate"]["coupling"] == got


def test_missing_class_is_reported_with_the_datamodules_class_name():
    dm = _data()
    dm.class_names = ["ant", "bee", "cat", "dog"]
    targets = dm.probe_targets("train")
    keep = torch.nonzero(targets != 1).flatten()
    probe = DataLoader(
        torch.utils.data.Subset(dm.probe_dataset("train"), keep.tolist()), batch_size=32
    )
    cb = NeuralCollapseCallback(pairs=[], probe=probe, name="p", log_figures=False)
    with pytest.warns(UserWarning, match=r"1 \(bee\) have no sample"):
        _trainer([cb], epochs=1).fit(_model(), dm)


def test_width_mismatch_is_refused_by_default_and_zero_padded_on_request():
    layers = {"narrow": "head", "wide": "body.5"}  # 4 logits vs 20 features
    cb = NeuralCollapseCallback(
        layers=layers, pairs=[("wide", "narrow")], probe=_loader(), name="p"
    )
    with pytest.raises(ConfigurationError, match=r"differ in width \(H0 has d=20, H has d=4\)"):
        _trainer([cb], epochs=1).fit(NamedNet(), _loader(seed=1))
    logger = RecordingLogger()
    cb = NeuralCollapseCallback(
        layers=layers,
        pairs=[("narrow", "wide")],
        probe=_loader(),
        name="p",
        width_mismatch="pad",
        coupling=1.0,
        log_figures=False,
    )
    _trainer([cb], epochs=1, logger=logger).fit(NamedNet(), _loader(seed=1))
    row = logger.probes()[1]
    assert row[pair_key("p", "narrow->wide", "converged")] == 1.0
    assert math.isfinite(row[pair_key("p", "narrow->wide", "predicted/nc1")])
    # a zero-padded H0 keeps its per-class scatter (its rows are narrower than H*): cdnv of H*
    assert math.isfinite(row[pair_key("p", "narrow->wide", "predicted/cdnv")])
    # a wider H0 cannot be padded into a narrower H
    cb = NeuralCollapseCallback(
        layers=layers, pairs=[("wide", "narrow")], probe=_loader(), name="p", width_mismatch="pad"
    )
    with pytest.raises(ConfigurationError, match="differ in width"):
        _trainer([cb], epochs=1).fit(NamedNet(), _loader(seed=1))


def test_without_a_probe_dataset_the_train_loader_is_probed_in_index_order():
    """No DataModule: the Trainer's own train loader's dataset, in order, with a warning."""
    train = _loader(seed=1)
    logger = RecordingLogger()
    cb = NeuralCollapseCallback(layers={"h": "body.5"}, pairs=[], log_figures=False)
    model = NamedNet()
    with pytest.warns(UserWarning, match="no probe_dataset"):
        _trainer([cb], epochs=1, logger=logger).fit(model, train)
    x, y = train.dataset.tensors
    subset = cb.state_dict()["probes"]["train"]["subset"]
    assert torch.equal(subset, torch.arange(len(y)))  # every sample, in order
    model.eval()
    with torch.no_grad():  # the last probe ran on the final weights
        expected = float((model(x).argmax(1) == y).double().mean())
    assert logger.probes()[1][accuracy_key("train")] == pytest.approx(expected)


def test_predicted_cdnv_from_h0_rows_equals_a_per_class_scatter_fit_of_extracted_features():
    """One process, cached features: the pair's H0 keeps no per-class scatter (``K d^2``); the
    cdnv of H* comes from H0's cached rows. Logged predictions equal a fit of independently
    extracted features whose H0 moments carry the per-class scatter."""
    from nclightning.perturbation import fit_pair

    dm, model, logger = _data(), _model(), RecordingLogger()
    recorder = FeatureRecorder(dm, "backbone.blocks.1")
    cb = NeuralCollapseCallback(log_figures=False)
    _trainer([cb, recorder], epochs=2, logger=logger).fit(model, dm)
    plan = next(iter(cb._states.values())).probe.pass_plan
    assert {lp.alias: (lp.scatter, lp.keep_rows) for lp in plan.layers} == {
        "penultimate": ("span", False),
        "h0": ("full", True),
    }
    for epoch, row in logger.probes().items():
        rec = recorder.epochs[epoch]
        y = torch.as_tensor(rec["y"])
        h0 = ClassMoments.from_features(torch.as_tensor(rec["h0"]), y, K, per_class_scatter=True)
        h = ClassMoments.from_features(torch.as_tensor(rec["penultimate"]), y, K)
        ref = fit_pair(h0, h, lambda_W=5e-4, lambda_H=5e-4, weight=torch.as_tensor(rec["W"]))
        assert math.isfinite(ref.predicted["cdnv"])
        for key in ("cdnv", "nc1_tilde", "nc2_etf"):
            got = row[pair_key("train", "h0->penultimate", f"predicted/{key}")]
            assert got == pytest.approx(ref.predicted[key], rel=1e-6), (epoch, key)
