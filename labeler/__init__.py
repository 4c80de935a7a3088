"""Standalone batch labeling: a teacher checkpoint + an image corpus -> predictions.

This package imports nothing from ``pipeline`` or ``trainer``; it owns the model
contract (checkpoint format, eval preprocessing) that both of them use. The names below
are imported on first use (PEP 562 ``__getattr__``), so light users (storage, balancing)
do not pay for torch and Ray at ``import labeler``.
"""

from __future__ import annotations

from core.lazy import lazy_exports

# defining module -> its public names
_EXPORTS = {
    "labeler.api": ("LabelOptions", "LabelingStalled", "label_images", "run_labeling", "summarize_predictions"),
    "labeler.dedup": ("DedupOptions", "collect_hashes", "find_duplicates", "hash_dataset"),
    "core.model": (
        "ModelSpec",
        "count_parameters",
        "create_model",
        "load_checkpoint",
        "load_spec",
        "save_checkpoint",
    ),
}

__all__ = sorted(name for names in _EXPORTS.values() for name in names)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
