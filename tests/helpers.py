"""Small builders shared by tests: real image files and real (random-weight) checkpoints."""

import io
import os

import numpy as np
import torch
from PIL import Image

from labeler.model import ModelSpec, create_model, save_checkpoint


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
    from labeler.storage import write_json
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
