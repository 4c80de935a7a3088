"""Every trained model's numbers: accuracy, calibration, corruption robustness, prediction flips.

``evaluate_model`` measures one checkpoint on its own; ``add_relative_errors`` then expresses
corruption and flip errors relative to the run's first teacher, as ImageNet-C's mCE and
ImageNet-P's mFR do relative to AlexNet.
"""

from __future__ import annotations

import numpy as np
import torch

from labeler.model import ModelSpec, load_checkpoint
from pipeline.corruptions import CORRUPTIONS, SEVERITIES, corrupt, perturbation_sequences
from trainer.data import load_labeled
from trainer.evaluate import accuracy_metrics, predict_logits


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: |accuracy - confidence| per equal-width confidence bin, weighted by the bin's share."""
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    which = np.minimum((conf * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


PER_CLASS_KEYS = ("per_class_top1", "confusion_matrix", "classes")


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(classes, classes) int64 counts: row = true class, column = predicted class."""
    flat = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(predicted, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(matrix: np.ndarray) -> list[float | None]:
    """Top-1 accuracy of each true class from a confusion matrix; None for a class with no test image."""
    totals = matrix.sum(axis=1)
    return [float(matrix[k, k] / totals[k]) if totals[k] else None for k in range(len(matrix))]


def flip_rates(model, images: np.ndarray, spec: ModelSpec, device, seed: int = 0) -> dict[str, float]:
    """Share of frame-to-frame top-1 changes per perturbation sequence (noise: against frame 0)."""
    rates = {}
    for name, frames in perturbation_sequences(images, seed=seed).items():
        preds = [predict_logits(model, f, spec, device).argmax(dim=1).numpy() for f in frames]
        ref = [preds[0]] * (len(preds) - 1) if name == "gaussian_noise" else preds[:-1]
        rates[name] = float(np.mean([(a != b).mean() for a, b in zip(ref, preds[1:])]))
    return rates


def evaluate_model(model_dir: str, test: str, extra: dict[str, str] | None = None, seed: int = 0) -> dict:
    """All metrics of one checkpoint on the test split (and on each extra class-folder set)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, spec = load_checkpoint(model_dir, device=device)
    data = load_labeled(test, spec.classes, spec.image_size, spec.in_chans)
    labels = data.targets.argmax(axis=1)
    logits = predict_logits(model, data.images, spec, device)
    out = accuracy_metrics(logits, labels)
    out["test_ece"] = expected_calibration_error(logits.softmax(dim=1).numpy(), labels)
    matrix = confusion_matrix(labels, logits.argmax(dim=1).numpy(), spec.num_classes)
    out["classes"] = list(spec.classes)
    out["confusion_matrix"] = matrix.tolist()
    out["per_class_top1"] = per_class_accuracy(matrix)
    out["corruption_errors"] = {
        name: [
            1.0 - accuracy_metrics(predict_logits(model, corrupt(data.images, name, s, seed), spec, device),
                                   labels)["test_top1"]
            for s in SEVERITIES
        ]
        for name in CORRUPTIONS
    }  # fmt: skip
    out["flip_rates"] = flip_rates(model, data.images, spec, device, seed)
    out["flip_rate"] = float(np.mean(list(out["flip_rates"].values())))
    out["extra"] = {}
    for name, root in (extra or {}).items():
        ex = load_labeled(root, spec.classes, spec.image_size, spec.in_chans)
        ex_logits = predict_logits(model, ex.images, spec, device)
        out["extra"][name] = accuracy_metrics(ex_logits, ex.targets.argmax(axis=1), name)
    return out


def add_relative_errors(entries: list[dict]) -> None:
    """Add ``corruption_ce`` per type, ``mce`` and ``mfr``, each relative to the first entry (the first teacher)."""
    if not entries or "corruption_errors" not in entries[0]:
        return
    base = entries[0]
    for e in entries:
        ce = {}
        for name, errs in e["corruption_errors"].items():
            denom = sum(base["corruption_errors"][name])
            ce[name] = sum(errs) / denom if denom > 0 else None
        e["corruption_ce"] = ce
        valid = [v for v in ce.values() if v is not None]
        e["mce"] = float(np.mean(valid)) if valid else None
        fr = [e["flip_rates"][k] / b for k, b in base["flip_rates"].items() if b > 0]
        e["mfr"] = float(np.mean(fr)) if fr else None
