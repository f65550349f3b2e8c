"""W&B figures of the callback's history, drawn by :mod:`nclightning.plotting`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nclightning import plotting

__all__ = ["collapse_figures", "history_series"]


def history_series(rows: Sequence[Mapping[str, float]]) -> dict[str, list[tuple[float, float]]]:
    """Flat ``key -> [(epoch, value), ...]`` from the callback's logged rows."""
    out: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        epoch = row["epoch"]
        for key, value in row.items():
            if key != "epoch":
                out.setdefault(key, []).append((epoch, value))
    return out


def collapse_figures(
    rows: Sequence[Mapping[str, float]], split: str, pairs: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """``{"figures/...": wandb.Image}``: metric curves per layer and, per pair, H0 vs H vs H*."""
    import wandb

    series = history_series(rows)
    images: dict[str, Any] = {}
    history = plotting.history_from_scalars(series, split)
    if history:
        fig = plotting.metric_curves(history, title=f"collapse metrics ({split} probe)")
        images[f"figures/{split}/metric_curves"] = _image(wandb, fig)
    last = rows[-1]
    for h0, h in pairs:
        prefix = f"pm/{h0}->{h}/"
        predicted = {k[len(prefix) :]: v for k, v in last.items() if k.startswith(prefix)}
        measured = [
            {
                k.rsplit("/", 1)[1]: v
                for k, v in last.items()
                if k.startswith(f"nc/{split}/{layer}/")
            }
            for layer in (h0, h)
        ]
        metrics = [m for m in plotting.METRIC_ORDER if m in predicted]
        if not metrics:
            continue
        fig = plotting.measured_vs_predicted(
            measured[0],
            measured[1],
            predicted,
            metrics,
            beta=predicted.get("beta"),
            labels=(f"{h0} (H0, measured)", f"{h} (H, measured)", "H* (model)"),
            title=f"{h0} -> {h}, epoch {int(last['epoch'])}",
        )
        images[f"figures/{split}/pm/{h0}->{h}"] = _image(wandb, fig)
    return images


def _image(wandb, fig) -> Any:
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    buf.seek(0)
    return wandb.Image(Image.open(buf).convert("RGB"))
