"""Speed and memory of the streaming collapse metrics (docs/science.md §1). A script.

    python benchmarks/metrics.py [--repeats 5] [--quick]

On the same precomputed float32 batches (N = 50,000, d = 512, batch 512, K = 10 and 100;
features near collapse: mean norm 10, within-class RMS deviation 1e-3) it prints

* ``update/bare``: time of ``ClassStatistics.update`` over the whole pass divided by the time
  of the bare ``features.T @ features`` products on the same batches (target <= 1.5);
* ``update/ref64``: against a float64 two-pass reference (class means, then centred float64
  scatter) over the same batches (target < 1);
* the ``compute()`` time, the metrics of that single pass and their error vs the reference;
* the peak RSS growth of a pass for two values of N (target: independent of N), batches
  generated on the fly so that nothing but the metric's own memory is measured.

Ratios are medians over interleaved repeats (the machine may be shared). Default: one
torch thread (``--threads`` to change). On oversubscribed cores every OpenMP parallel region
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

from nclightning.metrics import ClassMoments, ClassStatistics, metrics_from_moments

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


def streaming(batches, K, reference=None):
    """One pass of ``ClassStatistics.update``; ``reference=(moments, W, b)`` adds streaming NC4."""
    stats = ClassStatistics(K, D)
    if reference is not None:
        stats.set_reference(*reference)
    for x, y in batches:
        stats.update(x, y)
    return stats


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


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


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
    w, b = torch.randn(K, D, generator=g), torch.randn(K, generator=g)
    previous = streaming(batches[:20], K).moments()  # stands in for the previous pass
    for fn in (bare, lambda bs: streaming(bs, K), lambda bs: reference64(bs, K)):
        fn(batches[:4])  # warm-up
    times: dict[str, list[float]] = {"bare": [], "update": [], "update+nc4": [], "ref64": []}
    for _ in range(repeats):  # interleaved so that load changes hit all alike
        times["bare"].append(timed(bare, batches)[0])
        tu, stats = timed(streaming, batches, K)
        times["update"].append(tu)
        t4, stats4 = timed(streaming, batches, K, (previous, w, b))
        times["update+nc4"].append(t4)
        tr, ref = timed(reference64, batches, K)
        times["ref64"].append(tr)
    med = statistics.median

    def ratio(a: str, c: str) -> str:
        per = [x / y for x, y in zip(times[a], times[c])]
        return f"{med(per):.2f}  (per repeat {', '.join(f'{r:.2f}' for r in per)})"

    print(f"K={K:3d}  N={N} d={D} batch={BATCH} ({len(batches)} batches, float32 features)")
    print("  " + " | ".join(f"{k} {med(v) * 1e3:.1f} ms" for k, v in times.items()))
    print(f"  update/bare        = {ratio('update', 'bare')}  target <= 1.5")
    print(f"  update/ref64       = {ratio('update', 'ref64')}  target < 1")
    print(f"  (update+nc4)/bare  = {ratio('update+nc4', 'bare')}  streaming NC4 switched on")
    stats.set_classifier(w)
    t_comp = []
    for _ in range(repeats):
        stats._computed = None  # defeat torchmetrics' cache: time the real work
        tc, metrics = timed(stats.compute)
        t_comp.append(tc)
    print(f"  compute()          = {med(t_comp) * 1e3:.1f} ms")
    exact = metrics_from_moments(ref, w)
    worst = max(abs(metrics[k] / exact[k] - 1) for k in exact)
    one_pass = stats4.compute()
    print(
        f"  one pass ({stats4.nc4_reference} means for nc4): "
        + ", ".join(f"{k}={v:.4g}" for k, v in one_pass.items())
    )
    print(f"  max rel. error of nc1..nc3 vs the float64 two-pass reference: {worst:.1e}")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="K=10 only, 3 repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    memory()  # first, in a fresh process
    for K in (10,) if args.quick else (10, 100):
        run(K, 3 if args.quick else args.repeats)


if __name__ == "__main__":
    main()
