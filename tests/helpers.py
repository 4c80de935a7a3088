"""Small builders shared by tests: real image files and real (random-weight) checkpoints."""

import io
import os

import numpy as np
import torch
from PIL import Image, ImageEnhance

from core.model import ModelSpec, create_model, save_checkpoint


def png_bytes(size=(8, 8), mode="L", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "CMYK": 4}[mode]
    arr = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode == "CMYK" else "PNG")
    return buf.getvalue()


def write_bad_and_good_folder(root: str) -> dict:
    """A corpus with each kind of bad file; returns {relative id: expected reject reason or None}."""
    os.makedirs(os.path.join(root, "sub"), exist_ok=True)
    files = {}

    def put(name, data, reason):
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        files[name] = reason

    for i in range(6):
        put(f"good_{i}.png", png_bytes(seed=i), None)
    put("sub/rgb.png", png_bytes((12, 10), "RGB"), None)
    put("cmyk.jpg", png_bytes((9, 9), "CMYK"), None)
    img16 = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    buf = io.BytesIO()
    img16.save(buf, format="PNG")
    put("sixteen_bit.png", buf.getvalue(), None)
    pal = Image.fromarray(np.zeros((8, 8), np.uint8), "L").convert("P")
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    put("palette.png", buf.getvalue(), None)
    put("empty.png", b"", "empty")
    put("notes.png", b"this is not an image at all", "not_an_image")
    put("truncated.png", png_bytes((64, 64), "RGB")[:200], "truncated")
    return files


def random_checkpoint(
    directory: str, arch: str = "test_resnet", num_classes: int = 10, image_size: int = 16, seed: int = 0
) -> ModelSpec:
    """A checkpoint of ``arch`` with seeded random weights (the same files for the same arguments)."""
    torch.manual_seed(seed)
    spec = ModelSpec(arch, [str(i) for i in range(num_classes)], image_size, mean=(0.5,) * 3, std=(0.5,) * 3)
    return save_checkpoint(create_model(spec), spec, directory)


def plant_teacher(cfg, image_size: int = 32) -> ModelSpec:
    """A random-weight first teacher in ``cfg.run_dir/round_0/teacher``, finished and evaluated, recorded as
    made from ``cfg``'s inputs (as a run with ``cfg`` records its stages), so the loop starts from it."""
    from core.storage import write_json
    from pipeline.loop import preflight
    from pipeline.stages import start_stage

    _, _, stages = preflight(cfg)
    for stage in stages[:2]:  # round_0/teacher and its evaluation
        start_stage(stage)
    teacher = os.path.join(cfg.run_dir, "round_0", "teacher")
    spec = random_checkpoint(teacher, image_size=image_size)
    for name in ("final.json", "eval.json"):  # skip training and evaluating it
        write_json(os.path.join(teacher, name), {"test_top1": 0.1})
    return spec


def _encode(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def altered_copies(png: bytes) -> dict[str, bytes]:
    """Encoded altered copies of one image, as a near-duplicate of it would arrive in a corpus:
    ``jpeg_q30`` (JPEG, quality 30), ``resize_0.5`` and ``resize_2`` (bicubic, PNG), ``crop`` (2 px cut
    from each border, 1 px when a side is under 24 px; PNG) and ``brighten`` (``ImageEnhance.Brightness``
    1.2; PNG)."""
    img = Image.open(io.BytesIO(png))
    img.load()
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    w, h = img.size

    def resized(factor: float) -> bytes:
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        return _encode(img.resize(size, Image.Resampling.BICUBIC))

    m = 1 if min(w, h) < 24 else 2
    return {
        "jpeg_q30": _encode(img, "JPEG", quality=30),
        "resize_0.5": resized(0.5),
        "resize_2": resized(2.0),
        "crop": _encode(img.crop((m, m, w - m, h - m))),
        "brighten": _encode(ImageEnhance.Brightness(img).enhance(1.2)),
    }


def upscaled_digit_pngs(size: int = 32) -> list[tuple[int, bytes]]:
    """scikit-learn's 1,797 8x8 digits (scaled to 0-255 as ``pipeline.digits`` writes them), each
    resized to ``size`` x ``size`` (bicubic) and PNG-encoded, as ``(class, bytes)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    return [
        (int(c), _encode(Image.fromarray(a, "L").resize((size, size), Image.Resampling.BICUBIC)))
        for c, a in zip(digits.target, images)
    ]


def photo_tiles(tile: int) -> list[bytes]:
    """Non-overlapping ``tile`` x ``tile`` tiles of scikit-learn's sample photos, as PNGs."""
    from sklearn.datasets import load_sample_images

    out = []
    for photo in load_sample_images().images:
        h, w = photo.shape[:2]
        for y in range(0, h - tile + 1, tile):
            for x in range(0, w - tile + 1, tile):
                out.append(_encode(Image.fromarray(photo[y : y + tile, x : x + tile])))
    return out
