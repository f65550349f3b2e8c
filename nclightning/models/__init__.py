"""Feature backbones and the ``CollapseClassifier`` LightningModule (see ARCHITECTURE.md)."""

from nclightning.models.backbones import BACKBONES, build_backbone
from nclightning.models.classifier import CollapseClassifier

__all__ = ["BACKBONES", "CollapseClassifier", "build_backbone"]
