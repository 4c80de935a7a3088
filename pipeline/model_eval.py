"""Every trained model's numbers: accuracy, calibration, corruption robustness, prediction flips.

``evaluate_model`` measures one checkpoint on its own; ``add_relative_errors`` then expresses
corruption and flip errors relative to the run's first teacher, as ImageNet-C's mCE and
ImageNet-P's mFR do relative to AlexNet.
"""

from __future__ import annotations

import numpy as np
import torch

from labeler.images import normalize
from labeler.model import ModelSpec, load_checkpoint
from pipeline.corruptions import CORRUPTIONS, SEVERITIES, corrupt, perturbation_sequences
from trainer.data import load_labeled


@torch.inference_mode()
def predict_probs(model: torch.nn.Module, images: np.ndarray, spec: ModelSpec, device, batch: int = 512) -> np.ndarray:
    """Softmax probabilities (N, classes) of the eval-mode model on uint8 images at model size."""
    out = [
        torch.softmax(model(normalize(images[i : i + batch], spec.mean, spec.std).to(device)).float(), dim=1).cpu()
        for i in range(0, len(images), batch)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, spec.num_classes), np.float32)


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


def accuracy_metrics(probs: np.ndarray, labels: np.ndarray, prefix: str = "test") -> dict:
    k = min(5, probs.shape[1])
    topk = np.argsort(-probs, axis=1)[:, :k]
    p_true = probs[np.arange(len(labels)), labels]
    return {
        f"{prefix}_top1": float((topk[:, 0] == labels).mean()),
        f"{prefix}_top5": float((topk == labels[:, None]).any(axis=1).mean()),
        f"{prefix}_loss": float(-np.log(np.maximum(p_true, 1e-12)).mean()),
    }


def flip_rates(model, images: np.ndarray, spec: ModelSpec, device, seed: int = 0) -> dict[str, float]:
    """Share of frame-to-frame top-1 changes per perturbation sequence (noise: against frame 0)."""
    rates = {}
    for name, frames in perturbation_sequences(images, seed=seed).items():
        preds = [predict_probs(model, f, spec, device).argmax(axis=1) for f in frames]
        ref = [preds[0]] * (len(preds) - 1) if name == "gaussian_noise" else preds[:-1]
        rates[name] = float(np.mean([(a != b).mean() for a, b in zip(ref, preds[1:])]))
    return rates


def evaluate_model(model_dir: str, test: str, extra: dict[str, str] | None = None, seed: int = 0) -> dict:
    """All metrics of one checkpoint on the test split (and on each extra class-folder set)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, spec = load_checkpoint(model_dir, device=device)
    data = load_labeled(test, spec.classes, spec.image_size, spec.in_chans)
    labels = data.targets.argmax(axis=1)
    probs = predict_probs(model, data.images, spec, device)
    out = accuracy_metrics(probs, labels)
    out["test_ece"] = expected_calibration_error(probs, labels)
    out["corruption_errors"] = {
        name: [
            float(1.0 - accuracy_metrics(predict_probs(model, corrupt(data.images, name, s, seed), spec, device),
                                         labels)["test_top1"])
            for s in SEVERITIES
        ]
        for name in CORRUPTIONS
    }  # fmt: skip
    out["flip_rates"] = flip_rates(model, data.images, spec, device, seed)
    out["flip_rate"] = float(np.mean(list(out["flip_rates"].values())))
    out["extra"] = {}
    for name, root in (extra or {}).items():
        ex = load_labeled(root, spec.classes, spec.image_size, spec.in_chans)
        ex_probs = predict_probs(model, ex.images, spec, device)
        out["extra"][name] = accuracy_metrics(ex_probs, ex.targets.argmax(axis=1), name)
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
