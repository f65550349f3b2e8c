"""Reading an offline W&B run back with wandb's own reader, and float64 references for what
the callback logs there (shared by tests/callbacks/test_wandb_views.py and the default job)."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np


class WandbRun:
    """An offline run as ``wandb leet inspect`` prints it: ``records`` (``--json``, one dict per
    record) and ``summary`` (``--summary --json``), both read in parallel; media files are
    read from the paths the summary names."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "wandb", "leet", "inspect", *flags, "--json", str(run_dir)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for flags in ((), ("--summary",))
        ]
        (records, err1), (summary, err2) = (p.communicate(timeout=120) for p in procs)
        assert [p.returncode for p in procs] == [0, 0], (err1 + err2)[-2000:]
        self.records = [json.loads(line) for line in records.splitlines() if line.strip()]
        self.summary = json.loads(summary)

    def of_type(self, kind: str) -> list[dict]:
        return [r[kind] for r in self.records if r.get("type") == kind]

    def history(self) -> list[dict]:
        return [h["item"] for h in self.of_type("history")]

    def config(self) -> dict:
        out: dict = {}
        for c in self.of_type("config"):
            out.update(c.get("update", {}))
        return out

    def table(self, key: str) -> dict:
        """The latest ``wandb.Table`` logged as ``key`` (``{"columns": [...], "data": [...]}``)."""
        entry = self.summary["summary"][key]
        assert entry["_type"] == "table-file", entry
        return json.loads((self.run_dir / "files" / entry["path"]).read_text())

    def chart_lines(self, key: str) -> dict[str, dict[float, float]]:
        """``{line: {x: y}}`` of the ``wandb.plot.line_series`` chart logged as ``key``."""
        panel = self.config()[f"_wandb.visualize.{key}"]["panel_config"]
        assert panel["panelDefId"] == "wandb/lineseries/v0"
        assert panel["stringSettings"]["xname"] == "epochs_trained"
        table = self.table(f"{key}_table")
        assert table["columns"] == ["step", "lineKey", "lineVal"]
        lines: dict[str, dict[float, float]] = {}
        for x, name, y in table["data"]:
            lines.setdefault(name, {})[float(x)] = float(y)
        return lines

    def artifacts(self, kind: str) -> list[dict]:
        return [a for a in self.of_type("artifact") if a["type"] == kind]


def number(value) -> float:
    """A logged scalar as wandb's reader prints it (non-finite values as strings)."""
    return float(value) if not isinstance(value, str) else float(value.replace("Infinity", "inf"))


def md5_b64(path: Path) -> str:
    """A file's digest as a W&B artifact manifest writes it (base64 of the MD5)."""
    return base64.b64encode(hashlib.md5(Path(path).read_bytes()).digest()).decode()


def csv_series(rows, key: str) -> dict[float, float]:
    """``{epochs_trained: value}`` of ``key`` in metrics.csv probe rows (finite values)."""
    return {r["epochs_trained"]: r[key] for r in rows if key in r and math.isfinite(r[key])}


def reference_per_class(layer: dict) -> dict[str, np.ndarray]:
    """docs/science.md §8 in numpy float64 from a snapshot's moments: ``class_var``, the
    pairwise CDNV (NaN diagonal), cosines of the means centred on their mean."""
    n = layer["counts"].double().numpy()
    mu = layer["means"].double().numpy()
    v = layer["class_ss"].double().numpy() / n
    K = len(n)
    cdnv = np.full((K, K), np.nan)
    cos = np.eye(K)
    c = mu - mu.mean(0)
    for k in range(K):
        for l in range(K):
            if k != l:
                cdnv[k, l] = (v[k] + v[l]) / (2 * np.sum((mu[k] - mu[l]) ** 2))
                cos[k, l] = c[k] @ c[l] / (np.linalg.norm(c[k]) * np.linalg.norm(c[l]))
    return {"class_var": v, "cdnv_matrix": cdnv, "cosine_matrix": cos}
