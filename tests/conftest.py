"""Test-wide settings: W&B never touches the network or prompts; one intra-op thread."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="nclightning-wandb-"))
os.environ.setdefault("PYTHONHASHSEED", "0")

# The suite's models are tiny: one intra-op thread is as fast, and it stays fast when the
# machine's cores are shared (OpenMP spin-waits collapse under oversubscription). Subprocesses
# (DDP workers) inherit OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# Shared test support modules (``ondisk``: dataset writers, ``support``: logger, references)
# live beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
