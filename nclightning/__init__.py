"""nclightning: neural collapse and its perturbation model on PyTorch Lightning.

The maths (``nclightning.metrics``, ``nclightning.perturbation``) imports no Lightning; the
Lightning-facing names below are imported lazily so that ``import nclightning.metrics`` stays
light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "NeuralCollapseCallback": "nclightning.callbacks",
    "LayerwiseTraining": "nclightning.callbacks",
    "CollapseClassifier": "nclightning.models",
    "ClassStatistics": "nclightning.metrics",
    "collapse_metrics": "nclightning.metrics",
    "fit_pair": "nclightning.perturbation",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nclightning' has no attribute {name!r}")
