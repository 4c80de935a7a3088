"""The paper's noise: crop + flip before RandAugment, magnitudes above 10, the staircase decay."""

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.loop import lr_factor
from trainer.noise import randaugment, train_transform
from trainer.settings import TrainSettings


def _image(seed: int = 0, size: int = 32) -> Image.Image:
    """A smooth, asymmetric RGB image (a gradient with a bright block off-centre)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    arr = np.stack([x * 255 / size, y * 255 / size, np.full((size, size), 90.0)], axis=-1)
    arr[4:12, 2:9] = 250
    arr += rng.normal(0, 4, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _mean_change(magnitude: int, draws: int = 300) -> float:
    img = _image()
    base = np.asarray(img, dtype=np.float64)
    ra = randaugment(2, magnitude, 32)
    random.seed(0)  # timm's RandAugment draws ops and magnitudes from Python's RNG: same ops for both
    return float(np.mean([np.abs(np.asarray(ra(img), dtype=np.float64) - base).mean() for _ in range(draws)]))


def test_magnitude_27_augments_more_than_10():
    """timm clips at 10 without mmax, so 27 used to run as 10; the mean pixel change now grows with it."""
    m10, m27 = _mean_change(10), _mean_change(27)
    assert m27 > 1.15 * m10, (m10, m27)
    assert "mmax=27" in repr(randaugment(2, 27, 32)) and "mmax" not in repr(randaugment(2, 9, 32))


def test_everything_off_is_no_transform():
    assert train_transform(0, 9, 32, random_resized_crop=False, hflip=False) is None


def test_flip_only_mirrors_or_keeps_the_image():
    img = _image()
    arr, mirrored = np.asarray(img), np.asarray(img)[:, ::-1]
    flip = train_transform(0, 0, 32, random_resized_crop=False, hflip=True)
    torch.manual_seed(0)  # torchvision draws from torch's RNG
    outs = [np.asarray(flip(img)) for _ in range(40)]
    kept = sum(np.array_equal(o, arr) for o in outs)
    flipped = sum(np.array_equal(o, mirrored) for o in outs)
    assert kept + flipped == 40 and kept > 5 and flipped > 5


def test_random_resized_crop_keeps_the_size_and_changes_the_view():
    img = _image()
    crop = train_transform(0, 0, 32, random_resized_crop=True, hflip=False)
    torch.manual_seed(0)
    outs = [np.asarray(crop(img)) for _ in range(20)]
    assert all(o.shape == (32, 32, 3) for o in outs)
    changed = [np.abs(o.astype(float) - np.asarray(img, float)).mean() for o in outs]
    assert sum(c > 5 for c in changed) >= 15  # a random area of 8-100% resized back: rarely the same view


def test_the_digits_config_turns_crop_and_flip_off_and_the_default_has_them_on():
    from pipeline.config import load_config

    cfg = load_config("digits")
    assert not any(cfg[s]["hflip"] or cfg[s]["random_resized_crop"] for s in ("teacher", "student"))
    assert TrainSettings().hflip and TrainSettings().random_resized_crop


@pytest.mark.parametrize("warmup", [0, 1])
def test_exponential_is_the_reference_staircase(warmup):
    """0.97 ** floor(step / (2.4 epochs)), counted from step 0 (tf.train.exponential_decay, staircase=True)."""
    s = TrainSettings(schedule="exponential", warmup_epochs=warmup, epochs=20)
    spe = 10  # steps per epoch: a stair is 24 steps
    after_warmup = range(warmup * spe, 20 * spe)
    for step in after_warmup:
        assert lr_factor(step, spe, s) == pytest.approx(0.97 ** math.floor(step / 24))
    assert lr_factor(24, spe, s) == lr_factor(47, spe, s) == pytest.approx(0.97)
    assert lr_factor(48, spe, s) == pytest.approx(0.97**2)
