"""Feature backbones, the ``CollapseClassifier`` LightningModule, and the model protocols.

``nclightning.models.protocols`` states what callbacks may ask of a model (``FeatureInfo``,
``LayerwiseModel``); see docs/ARCHITECTURE.md for the rest.
"""

from nclightning.models.backbones import BACKBONES, build_backbone
from nclightning.models.classifier import CollapseClassifier
from nclightning.models.protocols import FeatureInfo, LayerwiseModel

__all__ = ["BACKBONES", "CollapseClassifier", "FeatureInfo", "LayerwiseModel", "build_backbone"]
