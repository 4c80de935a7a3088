"""Evaluation on a labeled split, and BatchNorm re-estimation on clean images.

Why recalibrate: a student trained under heavy input noise keeps BatchNorm running
statistics of noised images; on clean test or labeling images they are off, and the
model can score well below its teacher. Re-estimating them on clean images fixes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from core.images import normalize
from core.model import ModelSpec
from trainer.data import EVAL_BATCH, ImageSet, LabeledBatches


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


class AccuracySums:
    """Running sums for top-1, top-5 and cross entropy over batches: memory independent of the set size."""

    def __init__(self) -> None:
        self.n, self.top1, self.top5, self.loss = 0, 0, 0, 0.0

    def add(self, logits: torch.Tensor, labels: np.ndarray | torch.Tensor) -> AccuracySums:
        """Add a batch: ``logits`` float (n, classes), ``labels`` int class indices (n,)."""
        y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
        self.n += len(y)
        self.top1 += int((topk[:, 0] == y).sum().item())
        self.top5 += int((topk == y[:, None]).any(dim=1).sum().item())
        self.loss += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
        return self

    def metrics(self, prefix: str = "test") -> dict[str, float]:
        """``{prefix}_top1``, ``_top5`` (fractions) and ``_loss`` (mean cross entropy, nats); 0 when empty."""
        n = max(1, self.n)
        return {f"{prefix}_top1": self.top1 / n, f"{prefix}_top5": self.top5 / n, f"{prefix}_loss": self.loss / n}


def accuracy_metrics(logits: torch.Tensor, labels: np.ndarray, prefix: str = "test") -> dict:
    """``{prefix}_top1``, ``_top5`` and ``_loss`` (mean cross entropy) of logits against class indices."""
    return AccuracySums().add(logits, labels).metrics(prefix)


LabeledData = ImageSet | LabeledBatches | Iterable[tuple[np.ndarray, np.ndarray]]


def labeled_batches(data: LabeledData, batch: int = EVAL_BATCH) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """``(uint8 NHWC images, int64 class indices)`` batches of ``data``: an in-memory :class:`ImageSet`
    is sliced into batches of ``batch``; a :class:`LabeledBatches` or any such iterable is used as is."""
    if isinstance(data, ImageSet):
        labels = data.targets.argmax(axis=1)
        return ((data.images[i : i + batch], labels[i : i + batch]) for i in range(0, len(data), batch))
    return data


def unreadable_metrics(data: LabeledData, prefix: str = "test") -> dict[str, int]:
    """``{prefix}_unreadable``: images of ``data`` skipped in its last pass (any reject reason);
    empty for data that does not count them (an in-memory :class:`ImageSet` or a plain iterable)."""
    if isinstance(data, LabeledBatches):
        return {f"{prefix}_unreadable": sum(data.rejected.values())}
    return {}


def evaluate_many(
    models: Mapping[str, torch.nn.Module],
    data: LabeledData,
    spec: ModelSpec,
    device,
    batch: int = EVAL_BATCH,
    prefix: str = "test",
) -> dict[str, dict]:
    """:func:`evaluate` for several models in one pass over ``data`` (each batch decoded once).

    Returns ``{name: metrics}`` for each ``models`` entry, keys ``{prefix}_top1`` etc.
    """
    sums = {name: AccuracySums() for name in models}
    modes = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        for images, labels in labeled_batches(data, batch):
            for name, m in models.items():
                sums[name].add(predict_logits(m, images, spec, device, batch), labels)
    finally:
        for name, m in models.items():
            m.train(modes[name])
    return {name: {**s.metrics(prefix), **unreadable_metrics(data, prefix)} for name, s in sums.items()}


def evaluate(model: torch.nn.Module, data: LabeledData, spec: ModelSpec, device, batch: int = EVAL_BATCH) -> dict:
    """top-1, top-5 and mean cross entropy of the un-noised (eval-mode) model, batch by batch.

    ``data``: a :class:`LabeledBatches` stream (read again on each call; adds ``test_unreadable``, the
    images it skipped), an in-memory :class:`ImageSet`, or any iterable of (uint8 NHWC images, int64
    labels) batches. ``batch`` bounds the images per forward pass (and slices an ``ImageSet``).
    The model's train/eval mode is restored afterwards.
    """
    return evaluate_many({"": model}, data, spec, device, batch)[""]


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
