"""Speed and memory of the streaming collapse metrics (docs/science.md §1, §10). A script.

    python benchmarks/metrics.py [--repeats 5] [--quick] [--accuracy]

On the same precomputed float32 batches (N = 50,000, d = 512, batch 512, K = 10 and 100;
features near collapse: mean norm 10, within-class RMS deviation 1e-3) it prints

* ``update/bare``: time of ``ClassStatistics.update`` (default ``scatter="full"``) over the
  whole pass divided by the time of the bare ``features.T @ features`` products on the same
  batches (target <= 1.5);
* ``update/ref64``: against a float64 two-pass reference (class means, then centred float64
  scatter) over the same batches (target < 1);
* the same ratio for the other modes: ``scatter="none"``, the span mode (``scatter_basis``
  of K-1 columns with a fixed shift: the second sweep of a cached probe), ``"per_class"``,
  and ``NCCMismatch.update`` (exact NC4 against known means);
* the ``compute()`` time and the error of the full and span passes vs the reference;
* the time of ``class_quantities`` and ``metrics_from_moments`` at K = 1000, d = 512;
* with ``--accuracy``: the worst relative error of every scalar against a float64 two-pass
  computation for float32 features in the strongly collapsed regime, per batching;
* the peak RSS growth of a pass for two values of N (target: independent of N), batches
  generated on the fly so that nothing but the metric's own memory is measured.

Ratios are medians over interleaved repeats (the machine may be shared). Default: one
torch thread (``--threads`` to change), timed by the thread's CPU time, so that time spent
descheduled by other processes on a shared machine does not count (``--wall`` for the wall
clock, the default with more threads). On oversubscribed cores every OpenMP parallel region
waits for a descheduled worker thread, which penalises the few small O(B d) kernels of
``update`` far more than the one large GEMM they are compared with; a single thread measures
both sides fairly.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

from nclightning.metrics import (
    ClassMoments,
    ClassStatistics,
    NCCMismatch,
    class_quantities,
    metrics_from_moments,
)

D, BATCH, N = 512, 512, 50_000


def make_batches(n: int, K: int, seed: int):
    """Float32 batches ``(features[B, d], labels[B])`` near collapse (rows)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(K, D, generator=g)
    mu = 10 * mu / mu.norm(dim=1, keepdim=True)
    for start in range(0, n, BATCH):
        b = min(BATCH, n - start)
        y = torch.randint(0, K, (b,), generator=g)
        x = mu[y] + (1e-3 / D**0.5) * torch.randn(b, D, generator=g)
        yield x.contiguous(), y


def bare(batches):
    for x, _ in batches:
        x.T @ x


def streaming(batches, K, **options):
    """One pass of ``ClassStatistics.update`` with the given constructor options."""
    stats = ClassStatistics(K, D, **options)
    for x, y in batches:
        stats.update(x, y)
    return stats


def ncc_pass(batches, means, predictions):
    """One pass of ``NCCMismatch.update`` (exact NC4 against known means)."""
    ncc = NCCMismatch(means)
    for (x, _), p in zip(batches, predictions):
        ncc.update(x, p)
    return ncc


def reference64(batches, K):
    """Float64 two-pass: pass 1 class sums, pass 2 scatter around the class means."""
    counts = torch.zeros(K, dtype=torch.float64)
    sums = torch.zeros(K, D, dtype=torch.float64)
    for x, y in batches:
        sums.index_add_(0, y, x.double())
        counts += torch.bincount(y, minlength=K)
    means = sums / counts.unsqueeze(1)
    scatter = torch.zeros(D, D, dtype=torch.float64)
    class_ss = torch.zeros(K, dtype=torch.float64)
    for x, y in batches:
        dev = x.double() - means[y]
        scatter += dev.T @ dev
        class_ss.index_add_(0, y, dev.square().sum(1))
    return ClassMoments(counts, means, scatter, class_ss)


CLOCK = time.perf_counter
"""Wall clock by default; ``main`` switches to the thread's CPU time with one thread."""


def timed(fn, *args):
    t0 = CLOCK()
    out = fn(*args)
    return CLOCK() - t0, out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise KeyError(field)


def _malloc_trim() -> None:
    """Return freed heap memory to the OS so that RSS starts from what is live."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_growth_mib(n: int, K: int, keep: bool = False) -> float | None:
    """Peak RSS growth (MiB) of one streaming pass over ``n`` samples generated on the fly.

    ``keep=True`` also stores the batches (what a two-pass method needs without a second
    forward pass): a check that the probe sees memory that grows with ``n``.
    """
    gen = make_batches(n, K, seed=1)
    first = next(gen)
    stats = ClassStatistics(K, D)
    stats.update(*first)  # warm-up: allocator, kernels
    kept = []
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    base = _status_kib("VmRSS")
    for x, y in gen:
        stats.update(x, y)
        if keep:
            kept.append(x)
    stats.compute()
    grow = (_status_kib("VmHWM") - base) / 1024
    del kept
    return grow


def run(K: int, repeats: int) -> None:
    batches = list(make_batches(N, K, seed=0))
    g = torch.Generator().manual_seed(5)
    w = torch.randn(K, D, generator=g)
    first = streaming(batches, K, scatter="none").moments()  # a first sweep: exact means
    basis = first.mean_span()
    predictions = [torch.randint(0, K, (x.shape[0],), generator=g) for x, _ in batches]
    passes = {
        "bare": bare,
        "update": lambda bs: streaming(bs, K),
        "none": lambda bs: streaming(bs, K, scatter="none"),
        "span": lambda bs: streaming(bs, K, scatter_basis=basis, shift=first.means),
        "per_class": lambda bs: streaming(bs, K, scatter="per_class"),
        "ncc": lambda bs: ncc_pass(bs, first, predictions),
        "ref64": lambda bs: reference64(bs, K),
    }
    for fn in passes.values():
        fn(batches[:4])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in passes}
    results = {}
    for _ in range(repeats):  # interleaved so that load changes hit all alike
        for name, fn in passes.items():
            t, results[name] = timed(fn, batches)
            times[name].append(t)
    med = statistics.median

    def ratio(a: str, c: str = "bare") -> str:
        per = [x / y for x, y in zip(times[a], times[c])]
        return f"{med(per):.2f}  (per repeat {', '.join(f'{r:.2f}' for r in per)})"

    print(f"K={K:3d}  N={N} d={D} batch={BATCH} ({len(batches)} batches, float32 features)")
    print("  " + " | ".join(f"{k} {med(v) * 1e3:.1f} ms" for k, v in times.items()))
    print(f"  update/bare        = {ratio('update')}  target <= 1.5 (scatter='full')")
    print(f"  update/ref64       = {ratio('update', 'ref64')}  target < 1")
    print(f"  none/bare          = {ratio('none')}  (scatter='none': means, class_ss, norms)")
    print(f"  span/bare          = {ratio('span')}  (scatter_basis, K-1 columns, fixed shift)")
    print(f"  per_class/bare     = {ratio('per_class')}  (scatter='per_class')")
    print(f"  ncc/bare           = {ratio('ncc')}  (NCCMismatch.update, exact NC4)")
    stats = results["update"]
    stats.set_classifier(w)
    t_comp = []
    for _ in range(repeats):
        stats.set_classifier(w)  # clears torchmetrics' cached result: time the real work
        tc, metrics = timed(stats.compute)
        t_comp.append(tc)
    print(f"  compute()          = {med(t_comp) * 1e3:.1f} ms")
    exact = metrics_from_moments(results["ref64"], w)
    worst = max(abs(float(metrics[k]) / exact[k] - 1) for k in exact)
    span = metrics_from_moments(results["span"].moments(), w)
    worst_span = max(abs(span[k] / exact[k] - 1) for k in exact if k in span)
    print(
        f"  max rel. error vs the float64 two-pass reference: full {worst:.1e}, "
        f"span {worst_span:.1e}"
    )


def per_class_arrays(K: int = 1000, repeats: int = 3) -> None:
    """Time of ``class_quantities`` and ``metrics_from_moments`` at K = 1000, d = 512."""
    g = torch.Generator().manual_seed(2)
    means = torch.randn(K, D, generator=g, dtype=torch.float64)
    m = ClassMoments(
        torch.full((K,), 50.0, dtype=torch.float64),
        means,
        None,
        torch.rand(K, generator=g, dtype=torch.float64),
        norm_sums=torch.rand(K, generator=g, dtype=torch.float64),
    )
    tq = statistics.median(timed(class_quantities, m)[0] for _ in range(repeats))
    tm = statistics.median(timed(metrics_from_moments, m)[0] for _ in range(repeats))
    print(
        f"K={K} d={D}: class_quantities {tq * 1e3:.0f} ms, metrics_from_moments {tm * 1e3:.0f} ms"
    )


def memory() -> None:
    """Peak RSS growth of a streaming pass for two N (K = 100), plus a probe check."""
    K = 100
    state = ClassStatistics(K, D).packed.numel() * 8 / 2**20
    sizes = (N // 2, 2 * N)
    grow = {n: peak_rss_growth_mib(n, K) for n in sizes}
    if None in grow.values():
        print("peak memory: /proc/self/clear_refs unavailable, skipped")
        return
    kept = {n: peak_rss_growth_mib(n, K, keep=True) for n in sizes}
    print(
        f"peak RSS growth of a streaming pass (K={K}, state {state:.1f} MiB): "
        + ", ".join(f"N={n}: {grow[n]:.1f} MiB" for n in sizes)
        + "; probe check, same pass storing the features: "
        + ", ".join(f"N={n}: {kept[n]:.0f} MiB" for n in sizes)
    )


def accuracy() -> None:
    """Worst relative error of every scalar vs a float64 two-pass pass, per batching.

    Float32 features, N = 50,000, d = 256, K = 10, mean norm 10, within-class RMS deviation
    ``ratio`` of it (docs/science.md §10). The reference is ``ClassMoments.from_features``
    on the same values in float64 (the tests use an independent numpy reference).
    """
    n, d, k = 50_000, 256, 10
    g = torch.Generator().manual_seed(0)
    small, total = [], 0
    while total < n:
        small.append(min(int(torch.randint(1, 201, (), generator=g)), n - total))
        total += small[-1]
    batchings = {
        "one 50k batch": [n],
        "random 1..200": small,
        "100 x 1, then 49,900": [1] * 100 + [n - 100],
        "batches of 512": [512] * (n // 512) + [n % 512],
    }
    print(f"accuracy: N={n} d={d} K={k} float32, max rel. error over every scalar (worst key)")
    for ratio in (1e-4, 1e-5, 2e-6):
        mu = torch.randn(k, d, generator=g, dtype=torch.float64)
        mu = 10 * mu / mu.norm(dim=1, keepdim=True)
        y = torch.randint(0, k, (n,), generator=g)
        x = mu[y] + ratio * 10 / d**0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
        x = x.float()
        w = torch.randn(k, d, generator=g, dtype=torch.float64)
        exact = ClassMoments.from_features(x.double(), y, k, norm_sums=True)
        ref = metrics_from_moments(exact, w)
        cells = []
        for name, batch_sizes in batchings.items():
            stats = ClassStatistics(k, d)
            stats.set_classifier(w)
            for xb, yb in zip(x.split(batch_sizes), y.split(batch_sizes)):
                stats.update(xb, yb)
            got = stats.compute()
            err = {key: abs(float(got[key]) / ref[key] - 1) for key in ref}
            worst = max(err, key=err.get)
            cells.append(f"{name}: {err[worst]:.1e} ({worst})")
        print(f"  ratio {ratio:g}: " + " | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="K=10 only, 3 repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--wall", action="store_true", help="time by wall clock (default with >1 thread)"
    )
    parser.add_argument("--accuracy", action="store_true", help="also the accuracy table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    if args.threads == 1 and not args.wall:
        CLOCK = time.thread_time  # time descheduled by other processes does not count
    clock = "wall clock" if CLOCK is time.perf_counter else "thread CPU time"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, {clock}")
    memory()  # first, in a fresh process
    for K in (10,) if args.quick else (10, 100):
        run(K, 3 if args.quick else args.repeats)
    per_class_arrays()
    if args.accuracy:
        accuracy()


if __name__ == "__main__":
    main()
