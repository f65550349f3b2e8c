"""Test-wide settings and collection rules.

* W&B never touches the network or prompts; one intra-op thread; no Hypothesis database (no
  test writes into the checkout); shared support modules
  (``support``, ``ondisk``, ``runif``) importable from every test.
* Tests that need a GPU carry ``RunIf(min_cuda_gpus=...)`` (``runif.py``): they are collected
  everywhere, skipped without CUDA, and marked ``gpu`` here so that ``-m gpu`` selects them.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import lightning.pytorch  # noqa: F401  (see below)
import pytest
import torch
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="nclightning-wandb-"))
os.environ.setdefault("PYTHONHASHSEED", "0")

# The suite's models are tiny: one intra-op thread is as fast, and it stays fast when the
# machine's cores are shared (OpenMP spin-waits collapse under oversubscription). Subprocesses
# (DDP workers) inherit OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# Hypothesis keeps no example database: nothing is written into the checkout (.hypothesis/),
# and a run does not depend on what earlier runs found (tests that want fixed examples say
# derandomize=True).
settings.register_profile("nclightning", database=None)
settings.load_profile("nclightning")
# ... and its other files (recent versions cache constants there) go to a temporary folder.
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="nclightning-hypothesis-"))

# Lightning binds its console handler to the sys.stderr of the moment it is first imported:
# imported here, that is the session's stream, not the capsys buffer of whichever test first
# imported it (closed after that test, so every later Lightning log line would fail to write).

# Shared test support modules (``ondisk``: dataset writers, ``support``: logger, references,
# ``runif``: hardware conditions) live beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection, which reads the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``gpu`` every test whose ``RunIf`` asks for a CUDA device."""
    for item in items:
        needs = any(m.kwargs.get("min_cuda_gpus", 0) for m in item.iter_markers("skipif"))
        if needs and item.get_closest_marker("gpu") is None:
            item.add_marker(pytest.mark.gpu)
