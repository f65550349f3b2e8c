"""2-process DDP on CPU (gloo): torchmetrics' sync of ClassStatistics (every scatter mode,
fixed shifts, the span mode) and NCCMismatch equals one process on the union of the shards,
for every state and every measure of docs/science.md §1 and §8 (exact merge of the per-rank
shifts, docs/science.md §10)."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nclightning.metrics import ClassStatistics

WORKER = Path(__file__).with_name("ddp_metrics_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("ddp_metrics_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), "2", port, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=240)[0].decode() for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _single_process(w, config):
    """The same configuration on one process over the union of both shards."""
    x, y, wt, _, _, _, ood = (torch.from_numpy(a) for a in w.generic_data())
    stats = ClassStatistics(w.K, w.D, allow_missing_classes=True, **w.configs()[config])
    stats.set_classifier(wt)
    for r in range(2):
        for s in w.shard_batches(r, w.SHARDS):
            stats.update(x[s], y[s])
    return w.results(stats, wt, ood)


def _close(a, b, rtol=1e-10):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape and np.array_equal(np.isnan(a), np.isnan(b))
    ok = ~np.isnan(a)
    assert np.linalg.norm(a[ok] - b[ok]) <= rtol * max(np.linalg.norm(b[ok]), 1e-300)


CONFIGS = ("full", "per_class", "none", "fixed_shift", "span")


@pytest.mark.parametrize("config", CONFIGS)
def test_every_state_and_measure_synced_equals_one_process(ranks, config):
    w = _worker_module()
    expected = _single_process(w, config)
    for res in (r["configs"][config] for r in ranks):
        for field, value in expected["moments"].items():
            got = res["moments"][field]
            assert (got is None) == (value is None), field
            if value is not None:
                _close(got, value)
        assert list(res["metrics"]) == list(expected["metrics"])
        for key, value in expected["metrics"].items():
            _close(res["metrics"][key], value)
            _close(res["compute"].get(key, value), value)  # compute(): the same synced values
        for key, value in expected["per_class"].items():
            _close(res["per_class"][key], value)
    present = {name: set(ranks[0]["configs"][name]["metrics"]) for name in CONFIGS}
    assert "nc1" not in present["none"] and "nc1" in present["span"]
    assert {"gnc2_log", "unc3", "nc5", "feature_norm", "class_mean_norm"} <= present[config]


def test_synced_values_match_the_independent_reference(ranks, ref):
    w = _worker_module()
    x, y, wt, b, ref_means, preds, ood = w.generic_data()
    exp = ref.metrics(x, y, w.K, wt, ood)
    quantities = ref.class_quantities(x, y, w.K)
    for config in CONFIGS:
        res = ranks[1]["configs"][config]
        for key in exp:
            if key in res["metrics"]:
                assert ref.rel_err(res["metrics"][key], exp[key]) <= 1e-10, (config, key)
        for key, value in quantities.items():
            _close(res["per_class"][key], value, 1e-10)
    nearest = ((x[:, None] - ref_means[None]) ** 2).sum(2).argmin(1)
    votes = np.argmax(x @ wt.T + b, axis=1)
    for r in ranks:  # NCCMismatch: "sum" states reduced over both shards
        assert r["nc4"] == pytest.approx(np.mean(preds != nearest), abs=0.5 / len(y))
        assert r["nc4_classifier"] == pytest.approx(np.mean(votes != nearest), abs=0.5 / len(y))


def test_shards_were_uneven_and_local_state_restored(ranks):
    w = _worker_module()
    n0, n1 = sum(w.SHARDS[0]), sum(w.SHARDS[1])
    assert n0 != n1 and len(w.SHARDS[0]) != len(w.SHARDS[1])
    for rank, n in enumerate((n0, n1)):
        for res in ranks[rank]["configs"].values():
            assert float(res["local_counts"].sum()) == n  # sync did not overwrite local sums
            assert float(res["moments"]["counts"].sum()) == n0 + n1
    _, y, *_ = w.generic_data()
    assert 2 not in set(y[n0:].tolist())  # rank 1 never saw class 2


def test_float32_path_synced_is_accurate_when_collapsed(ranks, ref):
    w = _worker_module()
    x, y = w.collapsed_data()
    expected = ref.metrics(x, y, w.K)
    for res in ranks:
        for key in expected:
            assert ref.rel_err(res["metrics32"][key], expected[key]) <= 1e-6, key


def test_metrics_package_imports_no_lightning(ranks):
    """The workers imported ``nclightning.metrics`` in a fresh interpreter."""
    assert not any(r["lightning_loaded"] for r in ranks)
