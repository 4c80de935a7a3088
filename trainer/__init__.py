"""Ray Train (TorchTrainer) training of noised teachers and students.

Checkpoints are written in the labeler's format (``core.model``). ``train_model`` and
``TrainingDataError`` are imported on first use (PEP 562 ``__getattr__``), so reading
``TrainSettings`` does not import Ray Train.
"""

from __future__ import annotations

from core.lazy import lazy_exports
from trainer.settings import TrainSettings

# defining module -> its public names (besides TrainSettings, imported above)
_EXPORTS = {"trainer.api": ("train_model",), "trainer.data_check": ("TrainingDataError",)}

__all__ = ["TrainSettings", "TrainingDataError", "train_model"]  # sorted; the last two from _EXPORTS

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
