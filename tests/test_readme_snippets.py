"""The README's Python snippets run (``python`` code blocks, in order).

The library snippet runs as written. The own-Trainer snippet has placeholders (``model``,
``datamodule`` and the ``...`` of the Trainer's arguments, as the README says below it): this
test fills them with a small LightningModule whose ``encoder`` has ``block3``/``block4``,
synthetic data and ``max_epochs=1``, and checks what the snippet promises (both probes logged,
both loggers written). Each runs in a temporary working directory: nothing lands in the
checkout.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn

from nclightning import runtime

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _snippet(marker: str) -> str:
    found = [s for s in _snippets() if marker in s]
    assert len(found) == 1, f"one README python block with {marker!r}, found {len(found)}"
    return found[0]


class _Model(LightningModule):
    """Four small blocks under ``encoder`` (the snippet probes ``block3``/``block4``)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential()
        widths = [8, 16, 16, 16, 16]
        for k in range(4):
            block = nn.Sequential(nn.Linear(widths[k], widths[k + 1]), nn.ReLU())
            self.encoder.add_module(f"block{k + 1}", block)
        self.classifier = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_library_snippet_runs_and_every_residual_is_defined(tmp_path, monkeypatch, capsys):
    code = _snippet("fit_pair(")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    fit = ns["fit"]
    assert fit.status == "fitted" and fit.converged
    assert set(fit.residuals) >= {"nc1", "cdnv"} and "norm_ratio" not in fit.residuals
    assert math.isfinite(fit.measured["norm_ratio"])  # a measured fact, not a residual
    assert all(math.isfinite(v) for v in fit.residuals.values()), fit.residuals
    assert ns["res"].converged
    by_cdnv = ns["by_cdnv"]  # the snippet's one fit to another metric
    assert by_cdnv.status == "fitted" and by_cdnv.converged and by_cdnv.metric == "cdnv"
    assert "cdnv" not in by_cdnv.residuals and math.isfinite(by_cdnv.residuals["nc1_tilde"])
    assert by_cdnv.predicted["cdnv"] == pytest.approx(by_cdnv.measured["cdnv"], rel=1e-6)
    # the streamed statistics equal the in-memory metrics (the snippet's claim)
    h_metrics = ns["h_stats"].compute()
    assert torch.allclose(h_metrics["nc1"], ns["collapse_metrics"](ns["h"], ns["y"])["nc1"])
    # the snippet's comment: from H0's pooled scatter the cdnv residual is NaN
    pooled = ns["ClassStatistics"](num_classes=3, dim=8)
    pooled.update(ns["h0"], ns["y"])
    without = ns["fit_pair"](pooled.moments(), ns["h_stats"].moments(), lambda_W=5e-4,
                             lambda_H=5e-4)  # fmt: skip
    assert math.isnan(without.residuals["cdnv"])
    assert "nc1" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_own_trainer_snippet_runs_with_its_placeholders_filled(tmp_path, monkeypatch):
    from nclightning.data.synthetic import SyntheticDataModule

    code = _snippet("configure_threads(")  # the own-Trainer block (not the Hugging Face one)
    assert "Trainer(..., " in code
    code = code.replace(
        "Trainer(..., ",
        "Trainer(max_epochs=1, enable_progress_bar=False, enable_model_summary=False, ",
    )
    monkeypatch.chdir(tmp_path)
    ns = {
        "model": _Model(),
        "datamodule": SyntheticDataModule(num_classes=3, samples_per_class=20, shape=(8,)),
    }
    saved = (torch.get_num_threads(), runtime._THREADS_AT_IMPORT, runtime._EXPORTED)
    try:
        exec(compile(code, "README.md", "exec"), ns)  # calls configure_threads: restored below
    finally:
        torch.set_num_threads(saved[0])
        runtime._THREADS_AT_IMPORT, runtime._EXPORTED = saved[1], saved[2]
    logged = ns["trainer"].callback_metrics
    assert "nc-train/h/nc1" in logged and "nc-val/h/nc1" in logged
    assert "pm-train-h0->h/coupling" in logged
    csv = tmp_path / "runs" / "mine" / "version_0" / "metrics.csv"
    assert "nc-train/h0/nc1" in csv.read_text().splitlines()[0]
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
