"""Statistics and probe cost at the sizes people study, against same-process baselines.

The statistics half of ``benchmarks/scale.py`` (which runs these cases with its own; also
``python benchmarks/scale_statistics.py [--quick] [--case NAME ...]`` alone).

One torch thread, timed by the thread's CPU time (a shared machine's descheduling does not
count). Each case prints one line: what it measures, its ratio and the target.

* ``case_statistics``: ``ClassStatistics`` pass + ``compute()`` at N = 50,000, d = 2048,
  K = 1000 (batches of 512 and one 50,000-row batch) over a bare float32 ``x.T @ x`` of the
  same batches (target <= 1.5); ``case_statistics_memory``: the peak memory growth of the
  pass + compute over its state, in a fresh process (target <= 2; the high-water mark, so
  every transient counts; batches generated on the fly, so only the metric's own memory).
* ``case_vocabulary``: K = 32768 classes at d = 768 (two samples each): nc1, nc1_tilde,
  cdnv, nc2 and the per-class variances in one pass; the process's peak growth
  (target <= 2 GB).
* ``case_probe_mlp``: a ``NeuralCollapseCallback`` probe of the 6 x 1024 MLP over a bare
  eval forward of the same samples (target <= 1.3; see ``benchmarks/callback.py``).

``--quick`` shrinks every size (a smoke run: the ratios are then not the targets' sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import torch

from nclightning.metrics import ClassStatistics
from nclightning.metrics.accumulate import QBLOCK

QUICK = False


def _cpu() -> float:
    return time.thread_time()


def _batches(
    n: int, d: int, K: int, batch: int, seed: int = 0, reuse: bool = False
) -> Iterator[tuple]:
    """Float32 batches near collapse (mean norm 10, within-class std 1e-4 of it).

    ``reuse``: every batch is written into the same two buffers (each batch is then valid
    until the next is drawn), so that a memory measurement sees no allocation of the
    generator's: its temporaries (three ``[batch, d]`` tensors per batch) otherwise leave
    the heap fragmented differently from run to run (1.6-2.0x the state measured).
    """
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(K, d, generator=g)
    mu = 10 * mu / mu.norm(dim=1, keepdim=True)
    rows, noise = (torch.empty(batch, d), torch.empty(batch, d)) if reuse else (None, None)
    for start in range(0, n, batch):
        b = min(batch, n - start)
        y = torch.randint(0, K, (b,), generator=g)
        if rows is None or noise is None:
            yield (mu[y] + (1e-3 / d**0.5) * torch.randn(b, d, generator=g)).contiguous(), y
            continue
        x = torch.index_select(mu, 0, y, out=rows[:b])
        yield x.add_(torch.randn(b, d, generator=g, out=noise[:b]), alpha=1e-3 / d**0.5), y


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _status_mb(key: str) -> float:
    """``VmRSS`` or ``VmHWM`` (the resident high-water mark) of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _peak_from_here() -> float:
    """Reset the resident high-water mark to the current resident size (Linux >= 4.0:
    ``/proc/self/clear_refs``) and return that size: ``_status_mb("VmHWM") - returned`` is then
    the peak growth from here, every transient counted. ``ru_maxrss`` cannot give it: its
    mark is already above a pass's peak after ``import torch`` (about 500 MiB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def case_statistics() -> bool:
    N, d, K = (4096, 512, 100) if QUICK else (50_000, 2048, 1000)
    passed = True
    for batch in (512, N):
        data = list(_batches(N, d, K, batch))
        bare, ours = [], []
        for _ in range(1 if QUICK else 2):  # interleaved repeats
            t = _cpu()
            for x, _ in data:
                x.T @ x
            bare.append(_cpu() - t)
            t = _cpu()
            stats = ClassStatistics(K, d)
            for x, y in data:
                stats.update(x, y)
            stats.compute()
            ours.append(_cpu() - t)
        ratio = min(ours) / min(bare)
        print(
            f"statistics N={N} d={d} K={K} batch={batch}: pass+compute {min(ours):.2f} s, "
            f"bare GEMM {min(bare):.2f} s: ratio {ratio:.2f} (target <= 1.5)"
        )
        passed &= ratio <= 1.5
        del data
    return passed


_MEMORY = """
import itertools, json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from scale_statistics import _batches, _peak_from_here, _rss_mb, _status_mb
from nclightning.metrics import ClassStatistics
N, d, K = (int(a) for a in sys.argv[2:5])
warm = ClassStatistics(3, 8)  # loads the kernels and libraries a pass uses
warm.update(torch.randn(6, 8), torch.arange(3).repeat(2))
warm.compute()
del warm
batches = _batches(N, d, K, 512, seed=1, reuse=True)
first = next(batches)
base_peak = _peak_from_here()
base = _rss_mb()
stats = ClassStatistics(K, d)
sampled = 0.0
for x, y in itertools.chain([first], batches):
    stats.update(x, y)
    sampled = max(sampled, _rss_mb() - base)
stats.compute()
sampled = max(sampled, _rss_mb() - base)
peak = _status_mb("VmHWM") - base_peak
print(json.dumps({"peak_mb": peak, "sampled_mb": sampled}))
"""


def case_statistics_memory() -> bool:
    """Peak memory of a pass + compute, in a fresh process (no earlier case's freed memory is
    reused): the growth of the resident high-water mark (reset before the pass,
    :func:`_peak_from_here`; every transient counted) over the state's size, and the
    resident growth sampled after each batch and compute; batches of 512 made on the fly in
    two reused buffers (allocated before the mark), after a tiny pass that loads the
    libraries."""
    N, d, K = (4096, 512, 100) if QUICK else (50_000, 2048, 1000)
    state_mb = (K * (2 * d + 3) + d * d) * 8 / 2**20
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY, here, str(N), str(d), str(K)],
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"statistics memory N={N} d={d} K={K}: peak growth {got['peak_mb']:.0f} MiB "
        f"(sampled resident {got['sampled_mb']:.0f} MiB) for {state_mb:.0f} MiB of state: "
        f"{got['peak_mb'] / state_mb:.2f}x (target <= 2; fresh process, high-water mark)"
    )
    return bool(got["peak_mb"] <= 2 * state_mb)


_VOCAB = """
import json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])
from scale_statistics import _peak_from_here, _status_mb
from nclightning.metrics import ClassStatistics, metrics_from_moments
K, d = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(0)
base = _peak_from_here()
stats = ClassStatistics(K, d)
for start in range(0, K, 4096):
    y = torch.arange(start, min(K, start + 4096)).repeat(2)
    a = y.unsqueeze(1) * 0.37 + torch.arange(d)
    x = torch.randn(y.shape[0], d, generator=g) + 3 * torch.sin(a)
    stats.update(x, y)
m = stats.moments()
values = metrics_from_moments(m)
var = m.class_ss / m.counts
grow = _status_mb("VmHWM") - base
print(json.dumps({"grow_mb": grow, "finite": [k for k, v in values.items() if v == v]}))
"""


def case_vocabulary() -> bool:
    K, d = (4096, 64) if QUICK else (32768, 768)
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _VOCAB, str(K), str(d), os.path.dirname(os.path.abspath(__file__))],
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"vocabulary K={K} d={d}: peak growth {got['grow_mb']:.0f} MiB (target <= 2048), "
        f"{time.perf_counter() - t:.0f} s wall; finite: {', '.join(got['finite'])}"
    )
    return bool(got["grow_mb"] <= 2048)


def case_probe_mlp() -> bool:
    import statistics

    from callback import Timer, _data  # benchmarks/callback.py
    from lightning.pytorch import Trainer

    from nclightning import NeuralCollapseCallback
    from nclightning.models import CollapseClassifier

    samples, epochs = (1024, 3) if QUICK else (8192, 5)
    torch.manual_seed(0)
    mlp = CollapseClassifier(
        num_classes=10,
        input_shape=(3, 32, 32),
        backbone="mlp",
        backbone_kwargs={"depth": 6, "width": 1024, "batch_norm": True},
    )
    nc = NeuralCollapseCallback(log_figures=False, batch_size=256)
    timer = Timer(nc)
    Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[nc, timer],
    ).fit(mlp, _data(samples))
    probe = statistics.median(timer.probe[1:])  # [0] is the baseline (it also traces)
    bare = statistics.median(timer.bare)
    print(
        f"MLP probe (6 x 1024, N={samples}): probe {probe:.3f} s, bare eval forward "
        f"{bare:.3f} s: ratio {probe / bare:.2f} (target <= 1.3)"
    )
    floor = bare + _probe_floor(samples, 1024, layers=2)
    print(
        f"  floor of an exact probe: {floor:.3f} s = bare forward + {floor - bare:.3f} s "
        f"(one float32 x.T @ x per probed layer, its upper blocks only, one float64 eigh of "
        f"H0's scatter for the pair fit): ratio {floor / bare:.2f}"
    )
    return probe / bare <= 1.3


def _probe_floor(samples: int, width: int, layers: int) -> float:
    """Seconds of the work no exact probe avoids, beyond the forward: the ``d x d`` second
    moment of each probed layer (the statistics; its blocks on and above the diagonal) and
    the eigendecomposition of ``H0``'s within-class scatter (the pair fit,
    ``perturbation._spectral``); medians of 5."""
    import statistics

    g = torch.Generator().manual_seed(0)
    h = torch.randn(samples, width, generator=g)
    a = torch.randn(samples, width, generator=g, dtype=torch.float64)
    scatter = a.T @ a
    gram, eigh = [], []
    for _ in range(5):
        t = time.perf_counter()
        for i in range(0, width, QBLOCK):  # the blocks on and above the diagonal, as the
            h[:, i : i + QBLOCK].T @ h[:, i:]  # statistics multiply them (accumulate.QBLOCK)
        gram.append(time.perf_counter() - t)
        t = time.perf_counter()
        torch.linalg.eigh(scatter)
        eigh.append(time.perf_counter() - t)
    return layers * statistics.median(gram) + statistics.median(eigh)


CASES: list[Callable[[], bool]] = [
    case_statistics_memory,
    case_statistics,
    case_vocabulary,
    case_probe_mlp,
]


def main() -> None:
    global QUICK
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--case", nargs="*", help="case names (default: all)")
    args = parser.parse_args()
    QUICK = args.quick
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(f"torch {torch.__version__}, 1 thread, CPU time; load {os.getloadavg()}")
    for case in CASES:
        if not args.case or case.__name__ in args.case:
            case()


if __name__ == "__main__":
    main()
