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
def evaluate(model: torch.nn.Module, data: ImageSet, spec: ModelSpec, device, batch: int = 256) -> dict:
    """top-1, top-5 and mean cross entropy of the un-noised model."""
    was_training = model.training
    model.eval()
    top1 = top5 = loss = 0.0
    for i in range(0, len(data), batch):
        x = normalize(data.images[i : i + batch], spec.mean, spec.std).to(device)
        y = torch.from_numpy(data.targets[i : i + batch].argmax(axis=1)).to(device)
        logits = model(x).float()
        loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        top1 += (topk[:, 0] == y).sum().item()
        top5 += (topk == y[:, None]).any(dim=1).sum().item()
    model.train(was_training)
    n = max(1, len(data))
    return {"test_top1": top1 / n, "test_top5": top5 / n, "test_loss": loss / n}


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
