"""Standalone batch labeling: a teacher checkpoint + an image corpus -> predictions.

This package imports nothing from ``pipeline`` or ``trainer``; it owns the model
contract (checkpoint format, eval preprocessing) that both of them use. The names below
are imported on first use (PEP 562 ``__getattr__``), so light users (storage, balancing)
do not pay for torch and Ray at ``import labeler``.
"""

from __future__ import annotations

from labeler.lazy import lazy_exports

# public name -> the module that defines it
_EXPORTS = {
    "LabelOptions": "labeler.api",
    "LabelingStalled": "labeler.api",
    "label_images": "labeler.api",
    "run_labeling": "labeler.api",
    "summarize_predictions": "labeler.api",
    "ModelSpec": "labeler.model",
    "create_model": "labeler.model",
    "count_parameters": "labeler.model",
    "load_checkpoint": "labeler.model",
    "load_spec": "labeler.model",
    "save_checkpoint": "labeler.model",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
