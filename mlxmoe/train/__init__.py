"""Training: the loss of one step, resumable run state, and the loop."""

from .loop import TrainResult, train

__all__ = ["TrainResult", "train"]
