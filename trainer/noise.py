"""Input noise (random-resized-crop, flip, RandAugment: torchvision's and timm's) and the loss helpers."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from core.images import normalize


def randaugment(ops: int, magnitude: int, image_size: int):
    """timm's RandAugment as a PIL -> PIL callable, or None when ``ops`` is 0.

    Magnitudes above 10 are honoured: timm clips the magnitude at 10 unless ``mmax`` is in its config
    string, while the reference TF RandAugment (google-research/noisystudent ``randaugment.py``) maps
    ``magnitude / 10`` onto each op's range unclipped (the paper's 27 for B7/L2), so ``mmax`` is set to
    the magnitude there.
    """
    if ops <= 0:
        return None
    from timm.data.auto_augment import rand_augment_transform

    hparams = {"translate_const": int(image_size * 0.45), "img_mean": (128, 128, 128)}
    mmax = f"-mmax{magnitude}" if magnitude > 10 else ""
    return rand_augment_transform(f"rand-m{magnitude}-n{ops}-mstd0.5{mmax}", hparams)


def train_transform(ops: int, magnitude: int, image_size: int, random_resized_crop: bool = False, hflip: bool = False):
    """The training input noise as one PIL -> PIL callable (None when it is all off), in the reference
    order (google-research/noisystudent ``preprocessing.py`` ``_preprocess_for_train``): a random
    distorted crop (area 8-100%, aspect 3/4-4/3, resized back bicubic to ``image_size``), a random
    horizontal flip, then RandAugment (:func:`randaugment`). torchvision's transforms, seeded by torch's RNG;
    RandAugment draws from Python's ``random``.
    """
    from torchvision import transforms as T

    steps = []
    if random_resized_crop:
        steps.append(
            T.RandomResizedCrop(
                image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=T.InterpolationMode.BICUBIC
            )
        )
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    ra = randaugment(ops, magnitude, image_size)
    if ra is not None:
        steps.append(ra)
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else T.Compose(steps)


def augment_batch(images_hwc: np.ndarray, transform, mean, std) -> torch.Tensor:
    """Apply ``transform`` per image (uint8 HWC) and normalise into an NCHW float tensor."""
    if transform is None:
        return normalize(images_hwc, mean, std)
    out = np.empty_like(images_hwc)
    for i, arr in enumerate(images_hwc):
        img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        res = np.asarray(transform(img), dtype=np.uint8)
        out[i] = res[:, :, None] if res.ndim == 2 else res
    return normalize(out, mean, std)


def smooth(targets: torch.Tensor | np.ndarray, epsilon: float) -> torch.Tensor | np.ndarray:
    """Label smoothing: ``targets * (1 - epsilon) + epsilon / classes`` over the last axis.

    ``targets``: float (..., classes) rows summing to 1, a torch tensor or a numpy array (returned
    as the same kind and dtype); ``epsilon`` <= 0 returns ``targets`` itself. Which targets are
    smoothed, and by how much, is :func:`target_smoothing`'s rule.
    """
    if epsilon <= 0:
        return targets
    return targets * (1.0 - epsilon) + epsilon / targets.shape[-1]


def target_smoothing(label_smoothing: float, pseudo: bool, hard: bool) -> float:
    """The label smoothing epsilon for a set's targets: ``label_smoothing`` for the labeled set and
    for hard (one-hot) pseudo labels, 0 for soft pseudo labels, which are already distributions.

    Source: google-research/noisystudent ``main.py`` smooths one-hot labels (labeled images, and
    hard pseudo labels when ``teacher_softmax_temp = -1``) with ``label_smoothing = 0.1`` and
    feeds soft pseudo labels as they are. Both training feeds (``trainer.loop.MemoryFeed`` and
    ``trainer.feed``) take their epsilon from here.
    """
    return label_smoothing if not pseudo or hard else 0.0


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over examples of -sum(target * log_softmax): every example weighs the same."""
    return -(targets * logits.float().log_softmax(dim=-1)).sum(dim=-1).mean()
