"""ImageNet-C-style corruptions and ImageNet-P-style perturbation sequences, in numpy.

Each corruption takes a batch of uint8 images (N, H, W, C) and a severity 1-5 and returns
uint8 images of the same shape. Noise and JPEG follow Hendrycks & Dietterich (2019)'s
parameters; blur radii and pixelation are scaled to the image size (theirs assume 224 px),
so a severity means a comparable loss of detail at any resolution.

Randomness is drawn image by image, each image with its own generator seeded by (seed,
corruption, severity, the image's index in the set): an image is corrupted the same way
whether the set is evaluated whole or in batches of any size, and run after run.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

SEVERITIES = (1, 2, 3, 4, 5)
Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
CORRUPTIONS: dict[str, Corruption] = {}
RANDOM_CORRUPTIONS: set[str] = set()  # those that draw random numbers: applied image by image
PERTURBATIONS = ("gaussian_noise", "translate", "brightness")
FLIPS_AGAINST_FIRST = ("gaussian_noise",)  # flips counted against frame 0; the others frame to frame
FRAMES = 10


def register(name: str, random: bool = False) -> Callable[[Corruption], Corruption]:
    def wrap(fn: Corruption) -> Corruption:
        CORRUPTIONS[name] = fn
        if random:
            RANDOM_CORRUPTIONS.add(name)
        return fn

    return wrap


def _key(name: str) -> int:
    """A stable integer for a name, for seeding (Python's ``hash`` of a str changes per process)."""
    return zlib.crc32(name.encode())


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@register("gaussian_noise", random=True)
def gaussian_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    x = images / 255.0
    return _to_uint8(x + rng.normal(0.0, c, size=x.shape))


@register("shot_noise", random=True)
def shot_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (60, 25, 12, 5, 3)[severity - 1]
    return _to_uint8(rng.poisson(images / 255.0 * c) / c)


@register("impulse_noise", random=True)
def impulse_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    out = images.copy()
    hit = rng.random(images.shape) < amount
    out[hit] = np.where(rng.random(int(hit.sum())) < 0.5, 0, 255).astype(np.uint8)
    return out


def _blur(images: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    c, k = x.shape[1], kernel.shape[0]
    weight = torch.from_numpy(kernel / kernel.sum()).float().expand(c, 1, k, k)
    x = torch.nn.functional.pad(x, (k // 2,) * 4, mode="replicate")
    y = torch.nn.functional.conv2d(x, weight, groups=c)
    return y.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()


def _scale(images: np.ndarray) -> float:
    return images.shape[1] / 32.0


@register("defocus_blur")
def defocus_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius = (1.0, 1.5, 2.0, 2.5, 3.0)[severity - 1] * _scale(images)
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    return _blur(images, disk)


@register("gaussian_blur")
def gaussian_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = (0.4, 0.6, 0.8, 1.0, 1.5)[severity - 1] * _scale(images)
    r = max(1, int(np.ceil(3 * sigma)))
    ax = np.arange(-r, r + 1)
    g = np.exp(-(ax**2) / (2 * sigma**2))
    return _blur(images, np.outer(g, g))


@register("brightness")
def brightness(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
    return _to_uint8(images / 255.0 + c)


@register("contrast")
def contrast(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    x = images / 255.0
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return _to_uint8((x - mean) * c + mean)


@register("jpeg_compression")
def jpeg_compression(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = (25, 18, 15, 10, 7)[severity - 1]
    out = np.empty_like(images)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(buf, "JPEG", quality=quality)
        out[i] = np.asarray(Image.open(buf)).reshape(img.shape)
    return out


@register("pixelate")
def pixelate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factor = (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1]
    h, w = images.shape[1:3]
    small = (max(1, int(w * factor)), max(1, int(h * factor)))
    out = np.empty_like(images)
    for i, img in enumerate(images):
        pil = Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img)
        out[i] = np.asarray(pil.resize(small, Image.BOX).resize((w, h), Image.NEAREST)).reshape(img.shape)
    return out


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0, first_index: int = 0) -> np.ndarray:
    """One corruption at one severity of uint8 images (N, H, W, C); uint8 of the same shape.

    ``images[k]`` is image ``first_index + k`` of the set: a random corruption draws its noise
    from a generator seeded by (``seed``, severity, ``name``, that index), so the same image
    gets the same corruption in any batch and any run.

    Raises:
        ValueError: an unknown ``name``, or ``severity`` not in 1-5.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {sorted(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be 1-5, not {severity}")
    fn = CORRUPTIONS[name]
    if name not in RANDOM_CORRUPTIONS:
        return fn(images, severity, np.random.default_rng((seed, severity, _key(name))))
    out = np.empty_like(images)
    for k in range(len(images)):
        rng = np.random.default_rng((seed, severity, _key(name), first_index + k))
        out[k] = fn(images[k : k + 1], severity, rng)[0]
    return out


def perturbation_frames(
    images: np.ndarray, name: str, frames: int = FRAMES, seed: int = 0, first_index: int = 0
) -> Iterator[np.ndarray]:
    """The ``frames`` frames of one ImageNet-P-style sequence of uint8 images (N, H, W, C), one at a time.

    ``gaussian_noise``: fresh noise of sigma 0.03 per frame (each image its own generator, seeded
    by ``seed`` and its index ``first_index + k``, as in :func:`corrupt`); ``translate``: frame t
    is shifted right by t pixels (the left edge repeated); ``brightness``: frame t is +2% x t.
    Each frame is uint8 of the images' shape; frame 0 of translate and brightness is the images.

    Raises:
        ValueError: an unknown ``name``.
    """
    if name == "gaussian_noise":
        rngs = [np.random.default_rng((seed, _key(name), first_index + k)) for k in range(len(images))]
        for _ in range(frames):
            out = np.empty_like(images)
            for k, rng in enumerate(rngs):
                out[k] = _to_uint8(images[k] / 255.0 + rng.normal(0.0, 0.03, size=images[k].shape))
            yield out
    elif name == "translate":
        width = images.shape[2]
        for t in range(frames):
            yield np.pad(images, ((0, 0), (0, 0), (t, 0), (0, 0)), mode="edge")[:, :, :width]
    elif name == "brightness":
        for t in range(frames):
            yield _to_uint8(images / 255.0 + 0.02 * t)
    else:
        raise ValueError(f"unknown perturbation {name!r}; choose from {list(PERTURBATIONS)}")


def perturbation_sequences(images: np.ndarray, frames: int = FRAMES, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Every sequence of :func:`perturbation_frames`, whole: ``frames`` copies of the set per sequence
    (small sets only; evaluation draws the frames batch by batch)."""
    return {name: list(perturbation_frames(images, name, frames, seed)) for name in PERTURBATIONS}
