"""Ray Train (TorchTrainer) training of noised teachers and students.

Checkpoints are written in the labeler's format (``labeler.model``).
"""

from trainer.settings import TrainSettings

__all__ = ["TrainSettings"]
