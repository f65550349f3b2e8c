"""Lightning callbacks: :class:`NeuralCollapseCallback` composes the metrics and the model."""

from nclightning.callbacks.neural_collapse import NeuralCollapseCallback

__all__ = ["NeuralCollapseCallback"]
