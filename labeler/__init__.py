"""Standalone batch labeling: a teacher checkpoint + an image corpus -> predictions.

This package imports nothing from ``pipeline`` or ``trainer``; it owns the model
contract (checkpoint format, eval preprocessing) that both of them use. Submodules are
imported on use, so light users (storage, balancing) do not pay for torch.
"""
