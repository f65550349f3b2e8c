"""Batch augmentation on the training device (``device_augment``) against the CPU path.

Each crop/flip of :func:`crop_flip` equals the per-sample ``ImageTransform`` operations; over
many draws the two paths give the same distribution: offset and flip frequencies uniform as
drawn, per-pixel means and second moments equal within sampling error.
"""

from __future__ import annotations

import numpy as np
import torch

from nclightning.data.base import ImageTransform, augment_batch, crop_flip
from nclightning.data.vision import CIFAR10DataModule

P, C, H, W = 4, 3, 8, 8


def _images(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, C, H, W), dtype=torch.uint8, generator=g)


def test_each_crop_and_flip_is_the_per_sample_operation():
    x = _images().float()
    for i in range(2 * P + 1):
        for j in range(2 * P + 1):
            for flip in (False, True):
                n = x.shape[0]
                got = crop_flip(
                    x, torch.full((n,), i), torch.full((n,), j), torch.full((n,), flip), P
                )
                want = torch.nn.functional.pad(x, (P, P, P, P))[..., i : i + H, j : j + W]
                want = want.flip(-1) if flip else want
                assert torch.equal(got, want), (i, j, flip)


def _offsets(out: torch.Tensor, x: torch.Tensor):
    """Recover ``(i, j, flip)`` of each crop of the distinct-valued image ``x``."""
    table = {}
    padded = torch.nn.functional.pad(x, (P, P, P, P))
    for i in range(2 * P + 1):
        for j in range(2 * P + 1):
            crop = padded[..., i : i + H, j : j + W]
            for flip in (False, True):
                key = (crop.flip(-1) if flip else crop).numpy().tobytes()
                table.setdefault(key, (i, j, flip))
    return [table[o.numpy().tobytes()] for o in out]


def test_device_and_cpu_paths_draw_the_same_distribution():
    draws = 6000
    x = (torch.arange(C * H * W, dtype=torch.float32).view(1, C, H, W) + 1.0) / 255.0
    cpu_t = ImageTransform(crop_padding=P, flip=True)
    torch.manual_seed(1)
    cpu = torch.stack([cpu_t(x[0]) for _ in range(draws)])
    dev = augment_batch(x.expand(draws, C, H, W), P, True, torch.Generator().manual_seed(2))
    for name, out in (("cpu", cpu), ("device", dev)):
        seen = np.array(_offsets(out, x[0]), dtype=float)
        counts_i = np.bincount(seen[:, 0].astype(int), minlength=2 * P + 1)
        counts_j = np.bincount(seen[:, 1].astype(int), minlength=2 * P + 1)
        expected = draws / (2 * P + 1)
        chi2 = ((counts_i - expected) ** 2 / expected).sum()
        chi2 += ((counts_j - expected) ** 2 / expected).sum()
        assert chi2 < 45, (name, chi2)  # 16 degrees of freedom: p < 1e-3 beyond 39
        assert abs(seen[:, 2].mean() - 0.5) < 4 * 0.5 / draws**0.5, name
    # per-pixel first and second moments agree within sampling error (4 sigma)
    for power in (1, 2):
        a, b = cpu.double() ** power, dev.double() ** power
        se = torch.sqrt((a.var(0) + b.var(0)) / draws).clamp_min(1e-12)
        z = ((a.mean(0) - b.mean(0)) / se).abs()
        assert float(z.max()) < 5.0, (power, float(z.max()))


class _TinyCIFAR(CIFAR10DataModule):
    def _load_source(self, source):
        n = 20
        return _images(n, seed=3), torch.arange(n) % 10


def test_device_path_scales_and_normalises_like_the_cpu_path():
    """The training loader yields the stored uint8 images; ``device_transform`` without
    augmentation gives exactly the CPU path's normalised floats; with it, crops of them."""
    plain = _TinyCIFAR(batch_size=20, device_augment=True, augment=False)
    x, _ = next(iter(plain.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (20, C, H, W)
    cpu = plain._transform(False)
    want = torch.stack([cpu(xi) for xi in x])
    torch.testing.assert_close(plain.device_transform(x), want, rtol=1e-6, atol=1e-6)
    aug = _TinyCIFAR(batch_size=20, device_augment=True, augment=True)
    out = aug.device_transform(x, torch.Generator().manual_seed(0))
    assert out.shape == want.shape and not torch.equal(out, want)
