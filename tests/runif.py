"""``RunIf``: skip a test whose hardware is missing, Lightning's test-suite pattern.

``@RunIf(min_cuda_gpus=1)`` (or ``pytestmark = RunIf(...)``) is a ``pytest.mark.skipif`` with
a reason naming what is missing, so a laptop without CUDA reports the test as *skipped*
instead of failing it. A mark made with ``min_cuda_gpus >= 1`` also carries the ``gpu``
marker (added in ``conftest.py`` at collection), so ``pytest -m gpu`` selects every test that
needs a GPU, wherever it lives, and ``pytest -m 'not gpu'`` leaves them out.
"""

from __future__ import annotations

import pytest
import torch

__all__ = ["RunIf"]


def RunIf(*, min_cuda_gpus: int = 0, bf16_cuda: bool = False) -> pytest.MarkDecorator:
    """A ``skipif`` mark: skip unless ``min_cuda_gpus`` CUDA devices (and bf16 on them) exist."""
    missing = []
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available < min_cuda_gpus:
        missing.append(f"{min_cuda_gpus} CUDA device(s) (found {available})")
    if bf16_cuda and not (available and torch.cuda.is_bf16_supported()):
        missing.append("a CUDA device with bfloat16 support")
    return pytest.mark.skipif(
        bool(missing),
        reason="needs " + " and ".join(missing),
        min_cuda_gpus=max(min_cuda_gpus, int(bf16_cuda)),
    )
