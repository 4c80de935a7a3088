"""The Noisy Student loop on Ray: labeling, filtering, balancing, and iteration.

The names below are imported on first use (PEP 562 ``__getattr__``): ``import pipeline`` stays light.
"""

from __future__ import annotations

from core.lazy import lazy_exports

# defining module -> its public names
_EXPORTS = {
    "pipeline.loop": ("run_loop",),
    "pipeline.config": ("load_config",),
    "pipeline.balance": (
        "BalancePlan",
        "NothingPassed",
        "apply_balance",
        "balance_predictions",
        "files_runner",
        "parquet_runner",
        "plan_balance",
        "ray_runner",
    ),
    "pipeline.ablate": ("run_ablation",),
    "pipeline.model_eval": ("evaluate_model",),
    "pipeline.report": ("write_report",),
    "pipeline.digits": ("write_digits_corpus",),
}

__all__ = sorted(name for names in _EXPORTS.values() for name in names)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
