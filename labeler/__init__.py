"""Standalone batch labeling: a teacher checkpoint + an image corpus -> predictions.

This package imports nothing from ``pipeline`` or ``trainer``; it owns the model
contract (checkpoint format, eval preprocessing) that both of them use.
"""

from labeler.model import ModelSpec, load_checkpoint, save_checkpoint

__all__ = ["ModelSpec", "load_checkpoint", "save_checkpoint"]
