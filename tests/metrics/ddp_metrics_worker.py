"""One rank of the 2-process gloo check in ``test_ddp_metrics.py`` (not a test module).

Usage: ``python ddp_metrics_worker.py RANK WORLD PORT OUT_DIR``. Both ranks rebuild the same
data from fixed seeds, stream their *uneven* shard (different numbers of batches and
samples; rank 1 never sees class 2) into ``ClassStatistics`` and save what torchmetrics'
sync gives them. Also records whether importing ``nclightning.metrics`` pulled in Lightning.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist

K, D = 5, 7
SHARDS = {0: [3, 40, 17], 1: [5, 1, 60, 9, 22, 30, 8]}  # batch sizes per rank
FLOAT32_SHARDS = {0: [700, 300, 1000], 1: [1500, 500]}


def shard_batches(rank: int, sizes: dict[int, list[int]]) -> list[slice]:
    start = sum(sum(sizes[r]) for r in range(rank))
    out = []
    for b in sizes[rank]:
        out.append(slice(start, start + b))
        start += b
    return out


def generic_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Float64 features of 195 samples; the rows of rank 1 contain no class 2."""
    rng = np.random.default_rng(123)
    n0, n1 = sum(SHARDS[0]), sum(SHARDS[1])
    y0 = np.concatenate([np.arange(K), rng.integers(0, K, n0 - K)])
    y1 = rng.choice([0, 1, 3, 4], n1)
    y = np.concatenate([y0, y1])
    mu = 3.0 * rng.standard_normal((K, D)) + 4.0
    x = mu[y] + 0.7 * rng.standard_normal((len(y), D))
    w = rng.standard_normal((K, D))
    b = rng.standard_normal(K)
    ref_means = mu + 0.2 * rng.standard_normal((K, D))
    return x, y, w, b, ref_means


def collapsed_data() -> tuple[np.ndarray, np.ndarray]:
    """Float32 features with RMS within-class deviation 1e-4 of the mean norm (10)."""
    rng = np.random.default_rng(321)
    n, d = sum(map(sum, FLOAT32_SHARDS.values())), 64
    mu = rng.standard_normal((K, d))
    mu *= 10 / np.linalg.norm(mu, axis=1, keepdims=True)
    y = rng.integers(0, K, n)
    x = (mu[y] + 1e-3 / np.sqrt(d) * rng.standard_normal((n, d))).astype(np.float32)
    return x, y


def main() -> None:
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    from nclightning.metrics import ClassStatistics

    lightning_loaded = any(
        m.split(".")[0] in ("lightning", "pytorch_lightning") for m in sys.modules
    )
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )

    x, y, w, b, ref_means = (torch.from_numpy(a) for a in generic_data())
    stats = ClassStatistics(K, D, compute_dtype=torch.float64)
    stats.set_reference(ref_means, w, b)
    local_n = 0
    for s in shard_batches(rank, SHARDS):
        stats.update(x[s], y[s])
        local_n += s.stop - s.start
    metrics = stats.compute()
    m = stats.moments()
    local_after = float(stats._layout.views(stats.packed)["n"].sum())  # local again after sync

    xf, yf = (torch.from_numpy(a) for a in collapsed_data())
    stats32 = ClassStatistics(K, xf.shape[1])  # float32 path
    for s in shard_batches(rank, FLOAT32_SHARDS):
        stats32.update(xf[s], yf[s])
    metrics32 = stats32.compute()

    torch.save(
        {
            "metrics": metrics,
            "means": m.means,
            "scatter": m.scatter,
            "class_ss": m.class_ss,
            "counts": m.counts,
            "local_n": local_n,
            "local_after": local_after,
            "metrics32": metrics32,
            "lightning_loaded": lightning_loaded,
        },
        f"{out_dir}/rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
