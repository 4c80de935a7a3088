"""What the perceptual hash adds to the labeler's decode stage, per image, against the same stage without it.

    python benchmarks/phash_cost.py                    # the scale run's 16 x 16 digits (writes 20,000 if absent)
    python benchmarks/phash_cost.py --images 5000 --size 224   # photo-sized: random-texture 224 x 224 JPEGs

``core.images.decode_batch`` over the same images, batches of 64 as the labeler runs it, with ``phash``
off and on, interleaved for ``--rounds`` rounds in this one process (the machine is shared and noisy: the
fastest round of each is compared). Prints microseconds per image for each and the difference. One core:
multiply the difference by the images and divide by the cores to estimate what it adds to a labeling job,
whose own CPU time per image ``benchmarks/scale_run.py`` gives (wall time x cores / images).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def images(n: int, size: int) -> list[bytes]:
    """``n`` encoded images: the scale run's digit variants (16 px PNG), or random-texture JPEGs of ``size``."""
    if size == 16:
        from benchmarks.scale_run import synthetic_digits

        return [png for _, png in synthetic_digits(n, seed=2)]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def per_image_us(blobs: list[bytes], phash: bool, image_size: int) -> float:
    from core.images import decode_batch

    start = time.perf_counter()
    for s in range(0, len(blobs), 64):
        chunk = blobs[s : s + 64]
        batch = {"id": np.array([str(i) for i in range(len(chunk))]), "path": np.array(["x"] * len(chunk))}
        batch["bytes"] = np.array(chunk, dtype=object)
        decode_batch(batch, image_size, 0.875, 3, 64_000_000, phash=phash)
    return (time.perf_counter() - start) / len(blobs) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=16, help="16: the scale run's digits; else random JPEGs")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    blobs = images(args.images, args.size)
    model_size = 16 if args.size == 16 else 224
    off, on = [], []
    for _ in range(args.rounds):
        off.append(per_image_us(blobs, False, model_size))
        on.append(per_image_us(blobs, True, model_size))
    print(f"{len(blobs)} images of {args.size} px, decoded to {model_size} px, fastest of {args.rounds} rounds:")
    print(f"  decode stage without phash {min(off):.1f} us/image, with {min(on):.1f}: +{min(on) - min(off):.1f} us")


if __name__ == "__main__":
    main()
