"""Every trained model's numbers: accuracy, calibration, corruption robustness, prediction flips.

``evaluate_model`` measures one checkpoint on its own; ``add_relative_errors`` then expresses
corruption and flip errors relative to the run's first teacher, as ImageNet-C's mCE and
ImageNet-P's mFR do relative to AlexNet.

Evaluation streams: the test split and every extra set are read batch by batch
(:class:`trainer.data.LabeledBatches`) and each metric is a running sum (counts per bin,
per corruption and severity, per perturbation sequence), so memory is bounded by the batch,
never by the set.
"""

from __future__ import annotations

import numpy as np
import torch

from core.console import ProgressChannel
from core.model import ModelSpec, load_checkpoint
from pipeline.corruptions import (
    CORRUPTIONS,
    FLIPS_AGAINST_FIRST,
    FRAMES,
    PERTURBATIONS,
    SEVERITIES,
    corrupt,
    perturbation_frames,
)
from trainer.data import EVAL_BATCH, LABEL_COLUMN, LabeledBatches
from trainer.evaluate import AccuracySums, predict_logits

ECE_BINS = 15


class CalibrationSums:
    """Per-bin sums for the expected calibration error: count, summed confidence and correct
    predictions in each of ``bins`` equal-width confidence bins (memory: 3 x bins numbers)."""

    def __init__(self, bins: int = ECE_BINS):
        self.bins = bins
        self.count = np.zeros(bins, dtype=np.int64)
        self.confidence = np.zeros(bins, dtype=np.float64)
        self.correct = np.zeros(bins, dtype=np.float64)

    def add(self, probs: np.ndarray, labels: np.ndarray) -> CalibrationSums:
        """Add a batch: ``probs`` float (n, classes) rows summing to 1, ``labels`` int class indices (n,)."""
        conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
        which = np.minimum((conf * self.bins).astype(int), self.bins - 1)
        self.count += np.bincount(which, minlength=self.bins)
        self.confidence += np.bincount(which, weights=conf, minlength=self.bins)
        self.correct += np.bincount(which, weights=correct, minlength=self.bins)
        return self

    def ece(self) -> float:
        """sum over bins of |accuracy - mean confidence| x the bin's share of images; 0.0 when empty."""
        n = int(self.count.sum())
        return float(np.abs(self.correct - self.confidence).sum() / n) if n else 0.0


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: |accuracy - confidence| per equal-width confidence bin, weighted by the bin's share."""
    return CalibrationSums(bins).add(probs, labels).ece()


def _predictions(model, images: np.ndarray, spec: ModelSpec, device, batch: int) -> np.ndarray:
    return predict_logits(model, images, spec, device, batch).argmax(dim=1).numpy()


def flip_counts(
    model, images: np.ndarray, spec: ModelSpec, device, seed: int = 0, first_index: int = 0, batch: int = EVAL_BATCH
) -> dict[str, int]:
    """Top-1 changes per perturbation sequence over ``images`` (uint8 NHWC, images ``first_index``...
    of the set), summed over the ``FRAMES - 1`` comparisons of each sequence (the noise sequence
    against frame 0, the others frame to frame). One frame is held at a time."""
    counts = {}
    for name in PERTURBATIONS:
        first = previous = None
        flips = 0
        for frame in perturbation_frames(images, name, FRAMES, seed, first_index):
            preds = _predictions(model, frame, spec, device, batch)
            if first is None:
                first = preds
            else:
                flips += int(((first if name in FLIPS_AGAINST_FIRST else previous) != preds).sum())
            previous = preds
        counts[name] = flips
    return counts


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
    n = max(1, len(images) * (FRAMES - 1))
    return {name: c / n for name, c in flip_counts(model, images, spec, device, seed).items()}


def evaluate_model(
    model_dir: str,
    test: str,
    extra: dict[str, str] | None = None,
    seed: int = 0,
    batch: int = EVAL_BATCH,
    progress: ProgressChannel | None = None,
    label_column: str = LABEL_COLUMN,
) -> dict:
    """All metrics of one checkpoint on the test split (and on each extra labeled set), streamed.

    ``test`` and each ``extra`` value are labeled sets as :class:`trainer.data.LabeledBatches`
    reads them (class folders, local or ``s3://``, or Parquet); at most ``batch`` images are
    decoded at a time (plus their corrupted and perturbed copies, one at a time).
    Returns ``test_top1``/``test_top5`` (fractions), ``test_loss`` (mean cross entropy, nats),
    ``test_ece``, ``test_images`` (images evaluated), ``test_unreadable`` (images skipped, any
    reason) with ``test_reject_reasons`` (reason -> count), ``corruption_errors`` (name -> error
    per severity 1-5), ``flip_rates`` (sequence -> share of top-1 changes), ``flip_rate`` (their
    mean) and ``extra`` (name -> ``{name}_top1/_top5/_loss/_unreadable``). Corruption noise is
    seeded per image by ``seed`` and the image's index, so results do not depend on ``batch``.
    ``progress``: where to send ``{"done": images read, "total": images in the test split}`` as it goes.

    Raises:
        ValueError: a set where no image could be used, or as :class:`LabeledBatches`.
        FileNotFoundError: a set that does not exist.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, spec = load_checkpoint(model_dir, device=device)
    data = LabeledBatches(
        test, spec.classes, spec.image_size, spec.in_chans, batch, spec.crop_pct, spec.interpolation, label_column
    )
    accuracy, calibration = AccuracySums(), CalibrationSums()
    matrix = np.zeros((spec.num_classes, spec.num_classes), np.int64)
    corrupt_correct = {name: [0] * len(SEVERITIES) for name in CORRUPTIONS}
    flips = dict.fromkeys(PERTURBATIONS, 0)
    n, total = 0, len(data) if progress is not None else 0
    for images, labels in data:
        logits = predict_logits(model, images, spec, device, batch)
        accuracy.add(logits, labels)
        calibration.add(logits.softmax(dim=1).numpy(), labels)
        matrix += confusion_matrix(labels, logits.argmax(dim=1).numpy(), spec.num_classes)
        for name in CORRUPTIONS:
            for j, severity in enumerate(SEVERITIES):
                corrupted = corrupt(images, name, severity, seed, first_index=n)
                corrupt_correct[name][j] += int((_predictions(model, corrupted, spec, device, batch) == labels).sum())
        for name, count in flip_counts(model, images, spec, device, seed, n, batch).items():
            flips[name] += count
        n += len(labels)
        if progress is not None:
            progress.send({"done": n + sum(data.rejected.values()), "total": total})
    if progress is not None:  # the last count even when the throttle held it back
        progress.send({"done": n + sum(data.rejected.values()), "total": total}, force=True)
    _require_images(test, n, data)
    out = accuracy.metrics("test")
    out["test_ece"] = calibration.ece()
    out.update(test_images=n, test_unreadable=sum(data.rejected.values()), test_reject_reasons=dict(data.rejected))
    out.update(classes=list(spec.classes), confusion_matrix=matrix.tolist(), per_class_top1=per_class_accuracy(matrix))
    out["corruption_errors"] = {name: [1.0 - c / n for c in correct] for name, correct in corrupt_correct.items()}
    out["flip_rates"] = {name: f / (n * (FRAMES - 1)) for name, f in flips.items()}
    out["flip_rate"] = float(np.mean(list(out["flip_rates"].values())))
    extra = extra or {}
    out["extra"] = {
        name: _evaluate_extra(model, spec, device, name, root, batch, label_column) for name, root in extra.items()
    }
    return out


def validate_model(model_dir: str, val: str, batch: int = EVAL_BATCH, label_column: str = LABEL_COLUMN) -> dict:
    """``val_top1``/``val_top5``/``val_loss`` and ``val_unreadable`` of a checkpoint on a validation set,
    streamed: what the trainer records for a model it trained, for one it did not (a supplied teacher).

    Raises:
        ValueError: no image of ``val`` could be used. FileNotFoundError: ``val`` does not exist.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, spec = load_checkpoint(model_dir, device=device)
    return _evaluate_extra(model, spec, device, "val", val, batch, label_column)


def _evaluate_extra(
    model, spec: ModelSpec, device, name: str, root: str, batch: int, label_column: str = LABEL_COLUMN
) -> dict:
    """``{name}_top1/_top5/_loss`` and ``{name}_unreadable`` of one extra labeled set, streamed."""
    data = LabeledBatches(
        root, spec.classes, spec.image_size, spec.in_chans, batch, spec.crop_pct, spec.interpolation, label_column
    )
    sums = AccuracySums()
    for images, labels in data:
        sums.add(predict_logits(model, images, spec, device, batch), labels)
    _require_images(root, sums.n, data)
    return {**sums.metrics(name), f"{name}_unreadable": sum(data.rejected.values())}


def _require_images(root: str, n: int, data: LabeledBatches) -> None:
    if n == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(data.rejected.items())) or "no images"
        raise ValueError(f"no image of {root} could be evaluated ({reasons})")


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


def mark_worse_than_teacher(summary: list[dict]) -> None:
    """Set ``worse_than_teacher`` on each student: True when its exported checkpoint's ``val_top1`` is
    below its own teacher's (the previous entry), False when not, None when either has no validation
    number. The comparison is on validation, the split models are selected on; test numbers are
    reported, never used to decide."""
    for prev, e in zip(summary, summary[1:]):
        if e.get("role") != "student":
            continue
        mine, theirs = e.get("val_top1"), prev.get("val_top1")
        e["worse_than_teacher"] = None if mine is None or theirs is None else mine < theirs


def worse_than_teacher_warnings(summary: list[dict]) -> list[str]:
    """One ``WARNING: ...`` line per student that is worse than its teacher on validation."""
    lines = []
    for prev, e in zip(summary, summary[1:]):
        if e.get("worse_than_teacher"):
            lines.append(
                f"WARNING: the iteration {e['iteration']} student ({e['model']}) is worse than its teacher "
                f"({prev['model']}, iteration {prev['iteration']}) on validation: val_top1 {e['val_top1']:.4f} < "
                f"{prev['val_top1']:.4f}. Noisy Student expects the student to beat its teacher: try more student "
                "epochs, more pseudo labels (balance.per_class), or less noise"
            )
    return lines
