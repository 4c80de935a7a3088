"""Standalone batch labeling: a teacher checkpoint + an image corpus -> predictions.

This package imports nothing from ``pipeline`` or ``trainer``; what it shares with them (storage, the
checkpoint format, image decoding) is in ``core``. Its public names are the labeling API and what the
pipeline uses; they are imported on first use (PEP 562 ``__getattr__``), so ``import labeler`` does not
pay for torch and Ray.
"""

from __future__ import annotations

from core.lazy import lazy_exports

# defining module -> its public names
_EXPORTS = {
    "labeler.api": ("LabelingStalled", "gpus_per_task", "label_images", "run_labeling", "summarize_predictions"),
    "labeler.dedup": ("DedupOptions", "Exclusions", "collect_hashes", "find_duplicates", "hash_dataset"),
    "labeler.dedup_report": ("section_for",),
    "labeler.options": ("ROW_SETTINGS", "LabelOptions"),
    "labeler.sources": ("plan_units", "scratch_listing", "unit_rows"),
    "labeler.units": ("UNIT_COLUMN", "corpus_digest", "unit_of"),
    # the checkpoint format a labeling service's users load models with
    "core.model": ("ModelSpec", "count_parameters", "create_model", "load_checkpoint", "load_spec", "save_checkpoint"),
}

__all__ = sorted(name for names in _EXPORTS.values() for name in names)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
