"""Test-wide settings: W&B never touches the network or prompts; Lightning stays quiet."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="nclightning-wandb-"))
os.environ.setdefault("PYTHONHASHSEED", "0")
