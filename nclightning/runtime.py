"""CPU threads that fit the machine: how many intra-op threads torch should use for a run.

Torch starts one intra-op (OpenMP) thread per core of the *host*. That is the wrong number in
three common cases, and the slowdown is large: on 2 cores that other jobs also used, the
default job ran 20x slower with 2 threads than with 1 (spinning OpenMP threads wait for each
other whenever one of them is descheduled).

* a container or a batch scheduler gives the process fewer CPUs than the host has: the CPU
  affinity mask (``taskset``, cpusets) and the cgroup CPU quota (v2 ``cpu.max``, v1
  ``cpu.cfs_quota_us / cpu.cfs_period_us``) bound what the process can use;
* small models gain nothing from intra-op threads: an op on a ``[128, 128]`` matrix is done
  before a second thread has woken up;
* several processes (DDP on CPU) share the CPUs.

The rule (:func:`choose_threads`), with ``work = trainable parameters x batch size``:

* ``work < SMALL_WORK`` (1e8; e.g. the digits MLP, 75k parameters x 128 = 1e7): **1 thread**;
* otherwise ``available_cpus() // processes`` threads (at least 1).

A choice the user made is never overridden: ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` in the
environment, or a ``torch.set_num_threads(n)`` call made before (:func:`user_thread_setting`).
The ``nclightning`` command applies the rule to every run; in your own script call
:func:`configure_threads` once the model exists::

    from nclightning.runtime import configure_threads
    configure_threads(model, batch_size=128)   # returns a ThreadChoice (threads, reason)

On a busy machine even large models may run faster with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "SMALL_WORK",
    "ThreadChoice",
    "available_cpus",
    "cgroup_cpu_limit",
    "choose_threads",
    "configure_threads",
    "user_thread_setting",
]

SMALL_WORK = 1e8
"""Below this ``parameters x batch size`` a training step runs on one intra-op thread."""

_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


_THREADS_AT_IMPORT = _torch_threads()
_EXPORTED: str | None = None  # the OMP_NUM_THREADS value configure_threads(export=True) set


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count chosen for a run and why (one line, for the log)."""

    threads: int
    reason: str
    applied: bool = True  # False when the user's own setting was kept


# ---------------------------------------------------------------------------------------------
# what the process may use
# ---------------------------------------------------------------------------------------------


def _cgroup_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """``(v2 path, v1 cpu-controller path)`` of this process from ``/proc/self/cgroup`` text."""
    v2 = v1 = None
    for line in proc_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_limit(root: Path, path: str) -> float | None:
    """Smallest ``cpu.max`` quota/period from the process's cgroup up to the root (v2)."""
    limits = []
    node = root / path.lstrip("/")
    while True:
        text = _read(node / "cpu.max")
        if text:
            quota, _, period = text.partition(" ")
            if quota != "max" and period:
                limits.append(int(quota) / int(period))
        if node == root or root not in node.parents:
            break
        node = node.parent
    return min(limits) if limits else None


def _v1_limit(root: Path, path: str) -> float | None:
    """``cpu.cfs_quota_us / cpu.cfs_period_us`` of the process's v1 cpu cgroup (-1: none)."""
    for base in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
        for node in (base / path.lstrip("/"), base):
            quota, period = _read(node / "cpu.cfs_quota_us"), _read(node / "cpu.cfs_period_us")
            if quota and period and int(quota) > 0 and int(period) > 0:
                return int(quota) / int(period)
    return None


def cgroup_cpu_limit(
    root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | None = None
) -> float | None:
    """CPUs granted by the cgroup CPU quota (a float, e.g. 1.5), or None without a quota.

    Reads cgroup v2 ``cpu.max`` (``"max 100000"`` = no quota) along the process's cgroup path,
    else v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``. ``root`` and ``proc_cgroup`` (the
    text of ``/proc/self/cgroup``) default to this machine's.
    """
    root = Path(root)
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    v2, v1 = _cgroup_paths(proc_cgroup)
    if v2 is not None and (root / "cgroup.controllers").exists():
        limit = _v2_limit(root, v2)
        if limit is not None:
            return limit
    return _v1_limit(root, v1) if v1 is not None else None


def available_cpus(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | None = None) -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


# ---------------------------------------------------------------------------------------------
# the rule
# ---------------------------------------------------------------------------------------------


def _torch_defaults() -> set[int]:
    """The values torch picks by itself (host cores, logical CPUs, the affinity mask)."""
    values = {os.cpu_count() or 1, _THREADS_AT_IMPORT}
    try:
        values.add(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        pass
    cores = set()
    for cpu in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        cores.add((_read(cpu / "physical_package_id"), _read(cpu / "core_id")))
    if cores:
        values.add(len(cores))
    return values


def user_thread_setting() -> str | None:
    """How the user chose the thread count (``"OMP_NUM_THREADS=4"`` ...), or None.

    An environment variable torch reads, or a current ``torch.get_num_threads()`` that differs
    from every value torch chooses by itself (so a call to ``torch.set_num_threads`` made
    before this one); a call that happened to pick torch's own default cannot be told apart.
    """
    for var in _ENV_VARS:
        value = os.environ.get(var, "").strip()
        if value and value != _EXPORTED:
            return f"{var}={value}"
    current = _torch_threads()
    if current != _THREADS_AT_IMPORT or current not in _torch_defaults():
        return f"torch.set_num_threads({current})"
    return None


def choose_threads(
    num_params: int, batch_size: int | None = None, *, processes: int = 1, cpus: int | None = None
) -> ThreadChoice:
    """The module docstring's rule: 1 thread below :data:`SMALL_WORK`, else the CPUs per process.

    ``batch_size=None`` counts as 256. ``cpus`` defaults to :func:`available_cpus`.
    """
    work = int(num_params) * int(batch_size or 256)
    if work < SMALL_WORK:
        return ThreadChoice(1, f"small model: parameters x batch = {work:.1e} < {SMALL_WORK:.0e}")
    cpus = available_cpus() if cpus is None else int(cpus)
    threads = max(1, cpus // max(1, int(processes)))
    per = f" / {processes} processes" if processes > 1 else ""
    return ThreadChoice(threads, f"{cpus} CPUs available to this process{per}")


def configure_threads(
    model: Any = None,
    batch_size: int | None = None,
    *,
    processes: int = 1,
    num_params: int | None = None,
    export: bool = False,
) -> ThreadChoice:
    """Apply :func:`choose_threads` to ``torch`` unless the user already chose; return the choice.

    ``model``: an ``nn.Module`` whose trainable parameters are counted (or pass ``num_params``).
    ``export=True`` also sets ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` for worker processes
    started later (DDP), which a later call does not mistake for the user's setting.

    Example:
        >>> import torch
        >>> from nclightning.runtime import choose_threads, configure_threads
        >>> choose_threads(num_params=10_000, batch_size=32).threads  # little work: one thread
        1
        >>> choice = configure_threads(torch.nn.Linear(8, 2), batch_size=32)
        >>> choice.threads == torch.get_num_threads()  # applied, or the user's setting kept
        True
    """
    import torch

    global _EXPORTED, _THREADS_AT_IMPORT
    kept = user_thread_setting()
    if kept is not None:
        return ThreadChoice(_torch_threads(), f"kept the user's setting ({kept})", applied=False)
    if num_params is None:
        params = [] if model is None else model.parameters()
        num_params = sum(p.numel() for p in params if p.requires_grad)
    choice = choose_threads(num_params, batch_size, processes=processes)
    torch.set_num_threads(choice.threads)
    _THREADS_AT_IMPORT = choice.threads  # our own setting is not "the user's" next time
    if export:
        _EXPORTED = str(choice.threads)
        for var in _ENV_VARS:
            os.environ[var] = _EXPORTED
    return choice
