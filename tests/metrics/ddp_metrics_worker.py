"""One rank of the 2-process gloo check in ``test_ddp_metrics.py`` (not a test module).

Usage: ``python ddp_metrics_worker.py RANK WORLD PORT OUT_DIR``. Both ranks rebuild the same
data from fixed seeds, stream their *uneven* shard (different numbers of batches and
samples; rank 1 never sees class 2) into every configuration of :func:`configs`
(each scatter mode, a fixed shift, the span mode) and into ``NCCMismatch``, and save what
torchmetrics' sync gives them: the moments, every scalar and per-class quantity. Also
records whether importing ``nclightning.metrics`` pulled in Lightning.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist

K, D = 5, 7
SHARDS = {0: [3, 40, 17], 1: [5, 1, 60, 9, 22, 30, 8]}  # batch sizes per rank
FLOAT32_SHARDS = {0: [700, 300, 1000], 1: [1500, 500]}
MOMENT_FIELDS = ("counts", "means", "scatter", "class_ss", "class_scatter", "span_scatter")
MOMENT_FIELDS += ("norm_sums",)


def shard_batches(rank: int, sizes: dict[int, list[int]]) -> list[slice]:
    start = sum(sum(sizes[r]) for r in range(rank))
    out = []
    for b in sizes[rank]:
        out.append(slice(start, start + b))
        start += b
    return out


def generic_data() -> tuple[np.ndarray, ...]:
    """Float64 features of 195 samples (rank 1's rows contain no class 2), a classifier,
    reference means, per-sample predictions and the mean of an OOD probe."""
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
    preds = np.where(rng.random(len(y)) < 0.6, y, rng.integers(0, K, len(y)))
    ood = 2.0 * rng.standard_normal(D) + 4.0
    return x, y, w, b, ref_means, preds, ood


def collapsed_data() -> tuple[np.ndarray, np.ndarray]:
    """Float32 features with RMS within-class deviation 1e-4 of the mean norm (10)."""
    rng = np.random.default_rng(321)
    n, d = sum(map(sum, FLOAT32_SHARDS.values())), 64
    mu = rng.standard_normal((K, d))
    mu *= 10 / np.linalg.norm(mu, axis=1, keepdims=True)
    y = rng.integers(0, K, n)
    x = (mu[y] + 1e-3 / np.sqrt(d) * rng.standard_normal((n, d))).astype(np.float32)
    return x, y


def configs() -> dict[str, dict]:
    """``ClassStatistics`` options per configuration (the span basis and the fixed shift
    come from the exact means of the union, known to every rank)."""
    from nclightning.metrics import ClassMoments

    x, y, *_ = (torch.from_numpy(a) for a in generic_data())
    first = ClassMoments.from_features(x, y, K)
    common = {"compute_dtype": torch.float64}
    return {
        "full": common,
        "per_class": {**common, "scatter": "per_class"},
        "none": {**common, "scatter": "none"},
        "fixed_shift": {**common, "shift": first.means},
        "span": {**common, "scatter_basis": first.mean_span(), "shift": first.means},
    }


def results(stats, w, ood) -> dict:
    """Synced moments, scalars (classifier and OOD mean included) and per-class arrays."""
    from nclightning.metrics import class_quantities, metrics_from_moments

    m = stats.moments()
    return {
        "moments": {f: getattr(m, f) for f in MOMENT_FIELDS},
        "metrics": metrics_from_moments(m, w, ood_mean=ood),
        "per_class": class_quantities(m),
    }


def main() -> None:
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    from nclightning.metrics import ClassStatistics, NCCMismatch

    lightning_loaded = any(
        m.split(".")[0] in ("lightning", "pytorch_lightning") for m in sys.modules
    )
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    x, y, w, b, ref_means, preds, ood = (torch.from_numpy(a) for a in generic_data())
    out = {"lightning_loaded": lightning_loaded, "configs": {}}
    for name, options in configs().items():
        stats = ClassStatistics(K, D, allow_missing_classes=True, **options)
        stats.set_classifier(w)
        for s in shard_batches(rank, SHARDS):
            stats.update(x[s], y[s])
        res = results(stats, w, ood)
        res["compute"] = {k: float(v) for k, v in stats.compute().items()}
        res["local_counts"] = stats.local_moments().counts  # local again after the sync
        out["configs"][name] = res
    ncc = NCCMismatch(ref_means)
    ncc_clf = NCCMismatch(ref_means, weight=w, bias=b)
    for s in shard_batches(rank, SHARDS):
        ncc.update(x[s], preds[s])
        ncc_clf.update(x[s])
    out["nc4"], out["nc4_classifier"] = float(ncc.compute()), float(ncc_clf.compute())

    xf, yf = (torch.from_numpy(a) for a in collapsed_data())
    stats32 = ClassStatistics(K, xf.shape[1])  # float32 path
    for s in shard_batches(rank, FLOAT32_SHARDS):
        stats32.update(xf[s], yf[s])
    out["metrics32"] = {k: float(v) for k, v in stats32.compute().items()}
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
