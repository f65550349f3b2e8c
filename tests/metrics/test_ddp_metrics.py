"""2-process DDP on CPU (gloo): torchmetrics' sync of ClassStatistics equals one process on
the union of the shards (exact merge of the per-rank shifts, docs/science.md §1)."""

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


def test_two_ranks_equal_single_process_on_union(ranks, ref):
    w = _worker_module()
    x, y, wt, b, ref_means = (torch.from_numpy(a) for a in w.generic_data())
    single = ClassStatistics(w.K, w.D, compute_dtype=torch.float64)
    single.set_reference(ref_means, wt, b)
    for r in range(2):
        for s in w.shard_batches(r, w.SHARDS):
            single.update(x[s], y[s])
    expected = single.compute()
    m = single.moments()
    assert set(expected) == {*ranks[0]["metrics"]} and "nc4" in expected and "nc3" in expected
    for res in ranks:
        for key, val in expected.items():
            assert ref.rel_err(res["metrics"][key], val) <= 1e-10, key
        np.testing.assert_array_equal(res["counts"].numpy(), m.counts.numpy())
        for name in ("means", "scatter", "class_ss"):
            a, e = res[name].numpy(), getattr(m, name).numpy()
            assert np.linalg.norm(a - e) <= 1e-10 * np.linalg.norm(e), name
    # also right in absolute terms (independent reference) and for NC4's summed counters
    exp = ref.metrics(x.numpy(), y.numpy(), w.K, wt.numpy())
    for key in exp:
        assert ref.rel_err(ranks[0]["metrics"][key], exp[key]) <= 1e-10, key
    assert ranks[0]["metrics"]["nc4"] == pytest.approx(
        ref.nc4(x.numpy(), ref_means.numpy(), wt.numpy(), b.numpy()), abs=0.5 / len(y)
    )


def test_shards_were_uneven_and_local_state_restored(ranks):
    w = _worker_module()
    n0, n1 = sum(w.SHARDS[0]), sum(w.SHARDS[1])
    assert n0 != n1 and len(w.SHARDS[0]) != len(w.SHARDS[1])
    assert [r["local_n"] for r in ranks] == [n0, n1]
    assert [r["local_after"] for r in ranks] == [n0, n1]  # sync did not overwrite local sums
    assert float(ranks[0]["counts"].sum()) == n0 + n1
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
