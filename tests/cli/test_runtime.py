"""CPU threads that fit the machine (nclightning.runtime): quotas, affinity, the rule, the user."""

from __future__ import annotations

import math
import os

import pytest
import torch

from nclightning import runtime


def _cgroup(root, files: dict[str, str]):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_cgroup_v2_quota_is_the_tightest_along_the_path(tmp_path):
    root = _cgroup(tmp_path, {
        "cgroup.controllers": "cpu memory",
        "cpu.max": "max 100000",
        "jobs/cpu.max": "300000 100000",
        "jobs/me/cpu.max": "150000 100000",
    })  # fmt: skip
    assert runtime.cgroup_cpu_limit(root, "0::/jobs/me\n") == pytest.approx(1.5)
    (root / "jobs/me/cpu.max").write_text("max 100000")
    assert runtime.cgroup_cpu_limit(root, "0::/jobs/me\n") == pytest.approx(3.0)
    (root / "jobs/cpu.max").write_text("max 100000")
    assert runtime.cgroup_cpu_limit(root, "0::/jobs/me\n") is None


def test_cgroup_v1_cfs_quota(tmp_path):
    proc = "12:memory:/x\n4:cpu,cpuacct:/docker/abc\n"
    root = _cgroup(tmp_path, {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
    })  # fmt: skip
    assert runtime.cgroup_cpu_limit(root, proc) == pytest.approx(0.5)
    (root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1")  # no quota
    assert runtime.cgroup_cpu_limit(root, proc) is None


def test_available_cpus_is_the_affinity_mask_capped_by_the_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    empty = tmp_path / "none"
    empty.mkdir()
    assert runtime.available_cpus(empty, "") == affinity
    root = _cgroup(tmp_path / "q", {"cgroup.controllers": "cpu", "cpu.max": "50000 100000"})
    assert runtime.available_cpus(root, "0::/\n") == 1  # half a CPU still gets one thread
    big = _cgroup(tmp_path / "b", {"cgroup.controllers": "cpu", "cpu.max": "6400000 100000"})
    assert runtime.available_cpus(big, "0::/\n") == affinity  # 64 CPUs of quota, fewer here


def test_the_rule_one_thread_below_the_work_threshold():
    small = runtime.choose_threads(75_000, 128, cpus=16)  # the digits MLP
    assert small.threads == 1 and "small model" in small.reason
    edge = math.ceil(runtime.SMALL_WORK / 128)
    assert runtime.choose_threads(edge - 1, 128, cpus=16).threads == 1
    assert runtime.choose_threads(edge, 128, cpus=16).threads == 16
    assert runtime.choose_threads(11_000_000, 128, cpus=16, processes=4).threads == 4
    assert runtime.choose_threads(11_000_000, 128, cpus=2, processes=4).threads == 1
    assert runtime.choose_threads(10**6, None, cpus=8).threads == 8  # batch unknown: 256


@pytest.fixture
def no_thread_env(monkeypatch):
    before = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(runtime, "_THREADS_AT_IMPORT", before)
    monkeypatch.setattr(runtime, "_EXPORTED", None)
    yield
    torch.set_num_threads(before)


def test_configure_threads_applies_the_rule(no_thread_env, monkeypatch):
    model = torch.nn.Linear(64, 10)
    choice = runtime.configure_threads(model, batch_size=128, export=True)
    assert choice.applied and choice.threads == 1 and torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"  # DDP workers inherit it
    assert runtime.user_thread_setting() is None  # ...and it is not taken for the user's


def test_the_users_environment_wins(no_thread_env, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    choice = runtime.configure_threads(torch.nn.Linear(4, 2), batch_size=8)
    assert not choice.applied and "OMP_NUM_THREADS=3" in choice.reason


def test_an_explicit_set_num_threads_wins(no_thread_env):
    odd = max(runtime._torch_defaults()) + 3  # a value torch never picks by itself
    torch.set_num_threads(odd)
    choice = runtime.configure_threads(torch.nn.Linear(4, 2), batch_size=8)
    assert not choice.applied and torch.get_num_threads() == odd
