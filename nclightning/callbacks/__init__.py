"""Lightning callbacks: collapse tracking (composes the metrics and the model) and layer-wise
training (docs/science.md §6, Fig. 2)."""

from nclightning.callbacks.layerwise import LayerwiseTraining
from nclightning.callbacks.neural_collapse import NeuralCollapseCallback

__all__ = ["LayerwiseTraining", "NeuralCollapseCallback"]
