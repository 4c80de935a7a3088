"""64-bit perceptual hashes (pHash) of decoded images, and Hamming distances between them.

The algorithm is the ``imagehash`` package's ``phash`` (hash size 8, high-frequency factor 4): the
image in grayscale (PIL ``L``), resized to 32 x 32 with Lanczos filtering, its 2-D DCT-II (scipy's
unnormalised ``dct`` along both axes), the top-left 8 x 8 coefficients, each bit set where a
coefficient is above their median. Bits are packed row-major, the first coefficient the most
significant bit, so a hash prints as ``imagehash`` prints it (``f"{h:016x}"``). Hashes are stored (the
``phash`` column) as int64 holding the same 64 bits (:func:`stored`, :func:`unsigned`).

Why not call ``imagehash.phash`` per image: it costs about 630 us on a 32 x 32 image here (two scipy
calls and a median per image, most of it call overhead), which at a million images would double the
labeling of a small-image corpus. Here the resize runs per image (as ``imagehash`` does it) and the
DCT of a whole batch is two matrix products. ``tests/test_dedup.py`` checks that both give the same
hashes. One deliberate difference: coefficients are rounded to 1e-6 before the median comparison, so
a flat image (all its AC coefficients zero, which floating-point noise makes tiny positives or
negatives) hashes the same way every time instead of to noise.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HASH_SIZE = 8
SIDE = 32  # HASH_SIZE x imagehash's highfreq_factor 4
BITS = HASH_SIZE * HASH_SIZE


def _dct_rows() -> np.ndarray:
    """The first :data:`HASH_SIZE` rows of scipy's unnormalised DCT-II matrix for :data:`SIDE` points:
    ``2 cos(pi k (2n + 1) / (2 SIDE))``."""
    k = np.arange(HASH_SIZE)[:, None]
    n = np.arange(SIDE)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * SIDE))


_DCT = _dct_rows()
_WEIGHTS = (np.uint64(1) << np.arange(BITS - 1, -1, -1, dtype=np.uint64)).astype(np.uint64)


def hash_input(img: Image.Image) -> np.ndarray:
    """What the hash is computed from: ``img`` in grayscale, resized to 32 x 32 (Lanczos), as uint8
    ``(32, 32)``. This is the per-image step: about 25 us for a 16 x 16 image here (most of it PIL's resize),
    0.3-1 ms for a photo."""
    small = img.convert("L").resize((SIDE, SIDE), Image.Resampling.LANCZOS)
    return np.frombuffer(small.tobytes(), np.uint8).reshape(SIDE, SIDE)  # faster than np.asarray of the image


def phash_many(inputs: np.ndarray) -> np.ndarray:
    """pHashes of ``inputs`` (uint8 or float ``(n, 32, 32)``, from :func:`hash_input`) as uint64 ``(n,)``."""
    inputs = np.asarray(inputs, dtype=np.float64).reshape(-1, SIDE, SIDE)
    coef = np.round(_DCT @ inputs @ _DCT.T, 6).reshape(len(inputs), BITS)  # (n, 64): the low 8 x 8
    bits = coef > np.median(coef, axis=1, keepdims=True)
    return (bits.astype(np.uint64) * _WEIGHTS).sum(axis=1, dtype=np.uint64)


def phash(img: Image.Image) -> int:
    """The 64-bit pHash of one decoded image, as a Python int (0 .. 2**64 - 1)."""
    return int(phash_many(hash_input(img)[None])[0])


def stored(hashes: np.ndarray) -> np.ndarray:
    """uint64 hashes as they are stored: int64 with the same 64 bits (Parquet readers such as Spark, BigQuery
    and pandas from Python ints handle signed 64-bit integers; many have no unsigned ones)."""
    return np.ascontiguousarray(hashes, dtype=np.uint64).view(np.int64)


def unsigned(column) -> np.ndarray:
    """Stored hashes (an int64 Arrow column without nulls, or numpy) as uint64, the same 64 bits."""
    values = column.to_numpy() if hasattr(column, "to_numpy") else np.asarray(column)
    return np.ascontiguousarray(values).view(np.uint64) if values.dtype == np.int64 else values.astype(np.uint64)


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Bits that differ between uint64 hashes (broadcasting), as uint8 0..64."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))
