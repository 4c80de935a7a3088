"""The Noisy Student loop on Ray: labeling, filtering, balancing, and iteration.

The names below are imported on first use (PEP 562 ``__getattr__``): ``import pipeline`` stays light.
"""

from __future__ import annotations

from labeler.lazy import lazy_exports

# public name -> the module that defines it
_EXPORTS = {
    "run_loop": "pipeline.loop",
    "load_config": "pipeline.config",
    "BalancePlan": "pipeline.balance",
    "NothingPassed": "pipeline.balance",
    "apply_balance": "pipeline.balance",
    "balance_predictions": "pipeline.balance",
    "parquet_runner": "pipeline.balance",
    "plan_balance": "pipeline.balance",
    "ray_runner": "pipeline.balance",
    "run_ablation": "pipeline.ablate",
    "evaluate_model": "pipeline.model_eval",
    "write_report": "pipeline.report",
    "write_digits_corpus": "pipeline.digits",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
