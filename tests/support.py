"""Shared test support: a recording logger, float64 brute-force collapse metrics, and a fresh
Python process for a script (memory high-water marks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call in memory: ``rows = [(step, {key: value}), ...]``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def probes(self, probe: str | None = None) -> dict[int, dict[str, float]]:
        """``epochs_trained -> row`` of the probe rows (of one ``probe`` name, if given)."""
        out = {}
        for _, row in self.rows:
            if "epochs_trained" not in row:
                continue
            if probe is None or any(k.startswith((f"nc-{probe}/", f"pm-{probe}-")) for k in row):
                out.setdefault(int(row["epochs_trained"]), {}).update(row)  # probes of one epoch
        return out


def reference_metrics(h: np.ndarray, y: np.ndarray, K: int, weight=None) -> dict[str, float]:
    """Float64 two-pass brute force of docs/science.md §1 (independent of nclightning.metrics)."""
    h = h.astype(np.float64)
    means = np.stack([h[y == k].mean(0) for k in range(K)])
    dev = h - means[y]
    sw = dev.T @ dev / len(h)
    M = (means - means.mean(0)).T  # d x K, centred on the mean of class means
    sb = M @ M.T / K
    G = M.T @ M
    etf = (np.eye(K) - 1 / K) / np.sqrt(K - 1)
    out = {
        "nc1": float(np.trace(sw @ np.linalg.pinv(sb, rtol=1e-10, hermitian=True)) / K),
        "nc1_tilde": float(np.trace(sw) / np.trace(sb)),
        "nc2_etf": float(np.linalg.norm(G / np.linalg.norm(G) - etf)),
    }
    v = np.array([(dev[y == k] ** 2).sum(1).mean() for k in range(K)])
    pairs = [(k, l) for k in range(K) for l in range(K) if k != l]
    out["cdnv"] = float(
        np.mean([(v[k] + v[l]) / (2 * np.sum((means[k] - means[l]) ** 2)) for k, l in pairs])
    )
    if weight is not None:
        w = np.asarray(weight, dtype=np.float64)
        out["nc3"] = float(np.linalg.norm(w / np.linalg.norm(w) - M.T / np.linalg.norm(M)))
    return out


def nearest_mean(h: np.ndarray, means: np.ndarray) -> np.ndarray:
    return ((h[:, None, :].astype(np.float64) - means[None]) ** 2).sum(2).argmin(1)


def run_json_script(script: str, *args: object, timeout: float = 600) -> Any:
    """Run ``script`` in a fresh one-thread Python process with ``args`` as its ``sys.argv[1:]``
    and return the JSON of its last printed line (a fresh process: no freed memory of earlier
    tests is reused, so its high-water mark counts every transient)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=timeout,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])
