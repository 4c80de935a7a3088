"""Exact per-class balancing, as pure numpy on one batch at a time (no Ray here).

Rank order inside a class: higher confidence first; ties by a stable 32-bit hash of the
id (smaller first); remaining ties by the id itself. Each row gets a 64-bit sort key
``confidence_bits << 32 | ~hash32(id)`` whose descending order is that rank order
(the id breaks exact key ties in the final gather step).

To find each class's cut-off (the key of its K-th ranked row) without sorting or
gathering the rows, the driver refines one byte of the key per pass: per class a
256-bin histogram of the rows that still match the chosen prefix. Once the bucket
holding the K-th row is small (<= ``GATHER_LIMIT`` rows) or the key is exhausted, one
more pass gathers just those rows and sorts them. Memory: classes x (256 + GATHER_LIMIT).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

KEY_BYTES = 8
GATHER_LIMIT = 1024


def hash32(ids) -> np.ndarray:
    """Stable 32-bit FNV-1a hash of each id's UTF-8 bytes (process- and platform-independent).

    Vectorised over the rows: one numpy step per byte position, not one Python call per id.
    """
    arr = pa.array(ids, pa.string()) if not isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = arr.cast(pa.large_string())
    if arr.null_count:
        raise ValueError("ids must not be null")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(1, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(len(arr), 2166136261, dtype=np.uint64)
    for j in range(int(lengths.max()) if len(arr) else 0):
        live = lengths > j
        byte = data[np.minimum(starts + j, len(data) - 1)].astype(np.uint64)
        h = np.where(live, ((h ^ byte) * np.uint64(16777619)) & np.uint64(0xFFFFFFFF), h)
    return h


def sort_keys(confidence: np.ndarray, ids) -> np.ndarray:
    """uint64 keys; a larger key ranks higher. Confidence must be >= 0."""
    conf_bits = np.ascontiguousarray(confidence, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return (conf_bits << np.uint64(32)) | (np.uint64(0xFFFFFFFF) - hash32(ids))


def prefix_match(keys: np.ndarray, prefix: np.ndarray, level: np.ndarray) -> np.ndarray:
    """Whether each key's top ``level`` bytes equal ``prefix`` (per row; level 0 matches all)."""
    shift = (np.uint64(64) - np.uint64(8) * level.astype(np.uint64)).clip(0, 63)
    return (level == 0) | ((keys >> shift) == prefix)


def digit(keys: np.ndarray, level: np.ndarray) -> np.ndarray:
    """The key byte at position ``level`` (0 = most significant)."""
    shift = np.uint64(56) - np.uint64(8) * level.astype(np.uint64)
    return ((keys >> shift) & np.uint64(0xFF)).astype(np.int64)


def class_histogram(labels, keys, prefix, level, refining, num_classes) -> np.ndarray:
    """(num_classes, 256) counts of the next key byte for rows of refining classes in their bucket."""
    lvl, pre = level[labels], prefix[labels]
    sel = refining[labels] & prefix_match(keys, pre, lvl)
    flat = labels[sel] * 256 + digit(keys[sel], lvl[sel])
    return np.bincount(flat, minlength=num_classes * 256).reshape(num_classes, 256)


def choose_bucket(hist_row: np.ndarray, need: int) -> tuple[int, int, int]:
    """Walking bytes from high to low, the byte holding the ``need``-th row.

    Returns (byte, rows ranked above that bucket, rows in the bucket).
    """
    above = 0
    for b in range(255, -1, -1):
        c = int(hist_row[b])
        if above + c >= need:
            return b, above, c
        above += c
    raise ValueError(f"histogram holds {above} rows, fewer than the {need} needed")


def copies_for(labels, keys, ids, plan) -> np.ndarray:
    """Copies of each row under a finished plan (see ``pipeline.balance.BalancePlan``).

    ``ids`` is only read for rows whose key equals their class's cut key (rare).
    """
    base = plan.base[labels]
    key_cut, id_cut = plan.cut_key[labels], plan.cut_id
    above = keys > key_cut
    tie = keys == key_cut
    if tie.any():
        for i in np.flatnonzero(tie):
            cut_id = id_cut[int(labels[i])]
            above[i] = cut_id is None or str(ids[int(i)]) <= cut_id
    top = np.where(plan.all_top[labels], True, np.where(plan.none_top[labels], False, above))
    return base + top.astype(np.int64)
