"""Ray Train (TorchTrainer) training of noised teachers and students.

Checkpoints are written in the project's format (``core.model``). The public names are what the pipeline uses;
they are imported on first use (PEP 562 ``__getattr__``), so reading ``TrainSettings`` does not import Ray
Train or torch.
"""

from __future__ import annotations

from core.lazy import lazy_exports

# defining module -> its public names
_EXPORTS = {
    "trainer.api": ("train_model",),
    "trainer.data": (
        "EVAL_BATCH",
        "LABEL_COLUMN",
        "ClassSet",
        "LabeledBatches",
        "list_class_folders",
        "parquet_columns",
        "parquet_files",
        "parquet_source_column",
        "read_class_set",
    ),
    "trainer.data_check": ("TrainingDataError",),
    "trainer.evaluate": ("AccuracySums", "predict_logits"),
    "trainer.loop": ("steps_per_epoch",),
    "trainer.settings": ("TrainSettings",),
}

__all__ = sorted(name for names in _EXPORTS.values() for name in names)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
