"""How far altered copies of an image hash from it, against how close distinct images hash: the
measurements behind the default ``dedup.max_distance`` (the largest pHash Hamming distance at which an
unlabeled image counts as a near-duplicate of an evaluation image).

    python benchmarks/dedup_distance.py                        # about 10 s on 2 CPU cores
    python benchmarks/dedup_distance.py --tiles 96 --max-d 24

Corpora, all real images available offline, each image decoded with ``core.images.decode_image`` (RGB)
and hashed with ``core.phash`` (``imagehash``'s ``phash``), as the labeler does:

* ``digits 8x8``: scikit-learn's 1,797 handwritten digits as the demo corpus stores them (8x8 PNGs);
* ``digits 32x32``: the same digits upscaled to 32x32, bicubic (``tests.helpers.upscaled_digit_pngs``);
* ``photo tiles TxT``: scikit-learn's two sample photos (640x427) cut into non-overlapping T x T tiles
  (``--tiles``; 96 px gives only 48 tiles, so 48 px tiles, 208 of them, are measured too).

Each image gets the altered copies of ``tests.helpers.altered_copies`` (``jpeg_q30``, ``resize_0.5``,
``resize_2``, ``crop``, ``brighten``). Printed per corpus: the Hamming distance from each original's hash
to its copy's, per kind (max, 99th and 95th percentile, mean; ``tex max``: the max over textured originals,
printed where some original is near-flat); then a table for d = 0 .. ``--max-d``:

  recall     - the fraction of altered copies (all kinds together) within d of their original;
  worst      - the same for the kind with the lowest recall at that d, and which kind it is;
  FP rate    - the fraction of distinct pairs (two different originals; all pairs) within d, and their count;
  tex recall - (where some originals are near-flat) recall over the copies of textured originals: gray std
               of the 32x32 hash input at least 8 (sky tiles fall below: a near-flat image's pHash is noise);
  excluded   - (digits) the fraction of images with at least one OTHER original within d: what a user
               would lose as "duplicates" if every other image were in the evaluation set;
  demo       - (digits) the fraction of the digits demo's unlabeled images (shipped ``data.*`` defaults:
               1,108 images) within d of one of its 539 test images.

A pHash of an image with distinct DCT coefficients has exactly 32 bits set (those above the median of 64),
so distances between such hashes are even and an odd d admits what d - 1 does. Pixel-identical originals
would count as distinct pairs at distance 0; their number is printed. Times are printed per step; the
machine is shared, so they are indicative only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core.images import decode_image  # noqa: E402
from core.phash import BITS, hamming, hash_input, phash_many  # noqa: E402
from tests.helpers import altered_copies, photo_tiles, upscaled_digit_pngs  # noqa: E402

CHUNK_ELEMENTS = 4_000_000  # distances held at once (uint8), per chunk of rows
# below this gray-level std (of the 32x32 hash input) an image is near-flat: its pHash bits are decided
# by coefficients near zero, so noise (JPEG, clipping) flips them
TEXTURE_STD = 8.0


def hashes(blobs: list[bytes]) -> np.ndarray:
    """pHashes (uint64) of encoded images, decoded as everywhere else (RGB)."""
    return phash_many(np.stack([hash_input(decode_image(b, in_chans=3)) for b in blobs]))


def pair_distances(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Over all unordered pairs of different images: the count at each distance 0 .. 64, and each
    image's distance to its nearest other image. Rows are taken in chunks of ``CHUNK_ELEMENTS`` distances."""
    n = len(h)
    counts = np.zeros(BITS + 1, dtype=np.int64)
    nearest = np.empty(n, dtype=np.uint8)
    rows = max(1, CHUNK_ELEMENTS // n)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        d = hamming(h[start:stop, None], h[None, :])
        d[np.arange(stop - start), np.arange(start, stop)] = 255  # not a pair: the image itself
        counts += np.bincount(d.ravel(), minlength=256)[: BITS + 1]
        nearest[start:stop] = d.min(axis=1)
    return counts // 2, nearest  # each unordered pair was counted from both ends


def identical_pairs(blobs: list[bytes]) -> int:
    """Pairs of originals with the same decoded pixels."""
    groups: dict[bytes, int] = {}
    for b in blobs:
        key = decode_image(b, in_chans=3).tobytes()
        groups[key] = groups.get(key, 0) + 1
    return sum(k * (k - 1) // 2 for k in groups.values())


def demo_eval_mask() -> tuple[np.ndarray, np.ndarray]:
    """The digits demo's split with the shipped defaults (``data.*``: 5 labeled and 10 val per class, 30%
    test, seed 0): boolean masks over the 1,797 digits of its unlabeled images and its test images."""
    from sklearn.datasets import load_digits

    from pipeline.digits import split_indices

    splits = split_indices(load_digits().target, 5, 0.3, 0, 10)
    unlabeled, test = np.zeros(1797, bool), np.zeros(1797, bool)
    unlabeled[splits["unlabeled"]] = True
    test[splits["test"]] = True
    return unlabeled, test


def nearest_in(h: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """For each hash of ``h[rows]``, its distance to the nearest hash of ``h[cols]`` (disjoint sets)."""
    return hamming(h[rows][:, None], h[cols][None, :]).min(axis=1)


def measure(name: str, originals: list[bytes], max_d: int, digits: bool) -> None:
    n = len(originals)
    print(f"\n== {name}: {n} images, {n * (n - 1) // 2:,} distinct pairs ==")
    t0 = time.perf_counter()
    copies = [altered_copies(b) for b in originals]
    kinds = list(copies[0])
    t1 = time.perf_counter()
    inputs = np.stack([hash_input(decode_image(b, in_chans=3)) for b in originals])
    h = phash_many(inputs)
    textured = inputs.std(axis=(1, 2)) >= TEXTURE_STD
    dist = {kind: hamming(h, hashes([c[kind] for c in copies])) for kind in kinds}
    t2 = time.perf_counter()
    counts, nearest = pair_distances(h)
    same = identical_pairs(originals)
    t3 = time.perf_counter()
    print(
        f"time: altering and encoding {t1 - t0:.1f} s, decoding and hashing {(t2 - t1):.1f} s "
        f"({(1 + len(kinds)) * n:,} images), pairs {t3 - t2:.2f} s; pixel-identical original pairs: {same}"
    )
    flat = not textured.all()
    if flat:
        print(f"textured originals (gray std >= {TEXTURE_STD:g} at 32x32): {textured.sum()} of {n}")
    print(f"{'kind':<11} {'max':>4} {'p99':>5} {'p95':>5} {'mean':>5}" + (f" {'tex max':>7}" if flat else ""))
    for kind, d in dist.items():
        p99, p95 = np.percentile(d, [99, 95])
        line = f"{kind:<11} {d.max():>4} {p99:>5.1f} {p95:>5.1f} {d.mean():>5.2f}"
        print(line + (f" {d[textured].max():>7}" if flat else ""))
    every = np.concatenate(list(dist.values()))
    every_textured = np.concatenate([d[textured] for d in dist.values()])
    if digits:
        unlabeled, test = demo_eval_mask()
        demo = nearest_in(h, unlabeled, test)
    cumulative = np.cumsum(counts)
    header = f"{'d':>3} {'recall':>7} {'worst':>7} {'(kind)':<11} {'FP rate':>9} {'FP pairs':>10}"
    header += f" {'tex recall':>10}" if flat else ""
    print(header + (f" {'excluded':>9} {'demo':>7}" if digits else ""))
    for d in range(max_d + 1):
        per_kind = {kind: float(np.mean(v <= d)) for kind, v in dist.items()}
        worst = min(per_kind, key=per_kind.get)
        line = (
            f"{d:>3} {np.mean(every <= d):>7.4f} {per_kind[worst]:>7.4f} {worst:<11} "
            f"{cumulative[d] / counts.sum():>9.2e} {cumulative[d]:>10,}"
        )
        if flat:
            line += f" {np.mean(every_textured <= d):>10.4f}"
        if digits:
            line += f" {np.mean(nearest <= d):>9.4f} {np.mean(demo <= d):>7.4f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, nargs="+", default=[96, 48], help="photo tile sides (px)")
    parser.add_argument("--max-d", type=int, default=16, help="largest distance in the tables")
    args = parser.parse_args()
    start = time.perf_counter()
    # size 8 is the digits as stored (PIL's resize to an image's own size is a copy)
    measure("digits 8x8 (native)", [png for _, png in upscaled_digit_pngs(8)], args.max_d, True)
    measure("digits 32x32 (bicubic)", [png for _, png in upscaled_digit_pngs(32)], args.max_d, True)
    for tile in args.tiles:
        measure(f"photo tiles {tile}x{tile}", photo_tiles(tile), args.max_d, False)
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
