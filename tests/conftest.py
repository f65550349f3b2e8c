"""Test-wide settings: W&B never touches the network or prompts; Lightning stays quiet."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="nclightning-wandb-"))
os.environ.setdefault("PYTHONHASHSEED", "0")

# Shared test support modules (e.g. ``ondisk``: dataset writers) live beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
