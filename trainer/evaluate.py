"""Evaluation on a labeled split, and BatchNorm re-estimation on clean images.

Why recalibrate: a student trained under heavy input noise keeps BatchNorm running
statistics of noised images; on clean test or labeling images they are off, and the
model can score well below its teacher. Re-estimating them on clean images fixes it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from labeler.images import normalize
from labeler.model import ModelSpec
from trainer.data import ImageSet


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module, images: np.ndarray, spec: ModelSpec, device, batch: int = 256
) -> torch.Tensor:
    """Logits (N, classes), on the CPU, of ``model`` in its current mode on uint8 images at model size."""
    out = [
        model(normalize(images[i : i + batch], spec.mean, spec.std).to(device)).float().cpu()
        for i in range(0, len(images), batch)
    ]
    return torch.cat(out) if out else torch.zeros((0, spec.num_classes))


def accuracy_metrics(logits: torch.Tensor, labels: np.ndarray, prefix: str = "test") -> dict:
    """``{prefix}_top1``, ``_top5`` and ``_loss`` (mean cross entropy) of logits against class indices."""
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    n = max(1, len(y))
    topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return {
        f"{prefix}_top1": (topk[:, 0] == y).sum().item() / n,
        f"{prefix}_top5": (topk == y[:, None]).any(dim=1).sum().item() / n,
        f"{prefix}_loss": torch.nn.functional.cross_entropy(logits, y, reduction="sum").item() / n,
    }


def evaluate(model: torch.nn.Module, data: ImageSet, spec: ModelSpec, device, batch: int = 256) -> dict:
    """top-1, top-5 and mean cross entropy of the un-noised model."""
    was_training = model.training
    model.eval()
    logits = predict_logits(model, data.images, spec, device, batch)
    model.train(was_training)
    return accuracy_metrics(logits, data.targets.argmax(axis=1))


def recalibrate_batchnorm(
    model: torch.nn.Module, images_hwc: np.ndarray, spec: ModelSpec, device, batch: int = 256
) -> None:
    """Replace BatchNorm running statistics with their exact average over clean uint8 images."""
    batches = (normalize(images_hwc[i : i + batch], spec.mean, spec.std) for i in range(0, len(images_hwc), batch))
    recalibrate_batchnorm_on(model, batches, device)


@torch.no_grad()
def recalibrate_batchnorm_on(model: torch.nn.Module, batches: Iterable[torch.Tensor], device) -> None:
    """The same, over already-normalised NCHW batches (the streaming feed's clean pass)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was_training = model.training
    model.eval()
    for m in norms:
        m.train()
    for x in batches:
        model(x.to(device))
    for m, (momentum, training) in zip(norms, saved):
        m.momentum, m.training = momentum, training
    model.train(was_training)
