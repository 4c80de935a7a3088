"""The streaming feed (``feed: ray_data``): Ray Data reads, decodes and augments in CPU tasks,
and each training worker iterates its own shard with ``iter_torch_batches``.

For training sets that do not fit in a worker's memory, and so CPU nodes can feed GPU workers.
(The default ``feed: memory`` decodes the sets once per worker and augments in the worker:
faster for small sets, and bit-for-bit reproducible.) Augmentation runs in the tasks, so every
pass over the data draws fresh noise; the order is shuffled per pass (labeled blocks; pseudo-labeled
files) but not reproducible.

A pseudo-labeled row is decoded once and augmented once per copy (``copies``); its image comes
from the ``image`` bytes the labeler kept, so any corpus format streams (no reads into shards).
A row that cannot be read or decoded is not dropped silently: it stays in the stream with
``ok = 0`` and its reject reason's code (``trainer.data_check.reason_codes``), and the worker
counts it per set and per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from core.images import decode_into, normalize
from core.storage import filesystem_for, iter_tables, list_files
from trainer.data import (
    LABEL_COLUMN,
    class_indices,
    label_names,
    list_class_folders,
    one_hot,
    parquet_files,
    parquet_source_column,
    pseudo_targets,
    read_source_bytes,
)
from trainer.data_check import reason_codes
from trainer.noise import smooth, train_transform

DECODE_BATCH = 64


def labeled_dataset(root: str, classes: list[str], label_column: str = LABEL_COLUMN) -> ray.data.Dataset:
    """Rows (path, one-hot target) of a class-folder tree or a Parquet manifest (``path``, ``label``:
    a carved training split, ``pipeline.split``), in a stable order."""
    if parquet_files(root):
        if parquet_source_column(root) != "path":
            raise ValueError(
                f"{root} is a Parquet labeled set with image bytes; feed: ray_data reads class folders or "
                "manifests of image paths, use feed: memory"
            )
        fs, files = list_files(root, suffix=".parquet")
        table = pa.concat_tables([pq.read_table(f, filesystem=fs, columns=["path", label_column]) for f in files])
        names = label_names(table.column(label_column), f"{root}, column {label_column!r}")
        pairs = list(zip(table.column("path").to_pylist(), names))
    else:
        _, pairs = list_class_folders(root)
    indices = class_indices([c for _, c in pairs], classes, root)
    targets = one_hot(indices, len(classes))
    rows = ray.data.from_items([{"path": uri, "target": t} for (uri, _), t in zip(pairs, targets)])
    return rows.randomize_block_order()  # a small set: every pass in a new block order


def _pseudo_rows(table: pa.Table, num_classes: int, hard: bool) -> dict[str, np.ndarray]:
    """Balanced rows -> (path, image bytes or None, copies, dense soft or one-hot target)."""
    n = table.num_rows
    image = table.column("image").to_pylist() if "image" in table.column_names else [None] * n
    return {
        "path": np.asarray(table.column("path").to_pylist(), dtype=object),
        "image": np.asarray(image, dtype=object),
        "copies": table.column("copies").to_numpy(),
        "target": pseudo_targets(table, num_classes, hard),
    }


def _read_balanced_files(batch: dict, balanced: str) -> Iterator[pa.Table]:
    """A task of :func:`pseudo_dataset`: the balanced files in ``batch`` (one), read a record batch of
    ``DECODE_BATCH`` rows at a time without pre-buffering. Ray Data packs the yielded tables into
    blocks of up to its target block size (128 MiB), which the strict repartition then splits."""
    fs, _ = filesystem_for(balanced)
    for path in batch["file"]:
        yield from iter_tables(fs, str(path), DECODE_BATCH)


def pseudo_dataset(balanced: str, num_classes: int, hard: bool) -> ray.data.Dataset:
    """The balanced set, streamed: a task per file, and each pass reads the files in a new random order.

    The file list is what is shuffled (``randomize_block_order`` over blocks of one file name each),
    never the rows, so nothing waits for the whole set. Not ``read_parquet``: it packs many files into
    one read task, and the largest worker of the 1M-image student (``benchmarks/scale_run.py``) grew
    with the corpus (942 MB against 582 MB at 100k, by USS).
    """
    _, files = list_files(balanced, suffix=".parquet")
    if not files:
        raise FileNotFoundError(f"no balanced Parquet files under {balanced}")
    ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files)).randomize_block_order()
    ds = ds.map_batches(_read_balanced_files, batch_size=1, batch_format="numpy", fn_kwargs={"balanced": balanced})
    # Blocks of DECODE_BATCH rows (a streaming split, no shuffle): otherwise one task decodes a whole
    # file (150k rows at 1M images) while holding a CPU, and on a small cluster the labeled stream
    # waits for that CPU for minutes (benchmarks/scale_run.py's 1M student stalled so).
    ds = ds.repartition(target_num_rows_per_block=DECODE_BATCH, strict=True)
    kwargs = {"num_classes": num_classes, "hard": hard}
    return ds.map_batches(_pseudo_rows, batch_format="pyarrow", fn_kwargs=kwargs)


def pseudo_row_count(balanced: str) -> int:
    """Rows the balanced set expands to (the sum of ``copies``), reading that column only, a record
    batch at a time (the column of a 130M-row set would be 0.5 GB in the driver)."""
    fs, files = list_files(balanced, suffix=".parquet")
    tables = (t for path in files for t in iter_tables(fs, path, 1 << 16, ["copies"]))
    return sum(int(pc.sum(t["copies"]).as_py() or 0) for t in tables)


def _decode(src, size: int, chans: int) -> tuple[np.ndarray | None, int]:
    """(uint8 HxWxC image or None, reject reason code: 0 when it decoded)."""
    out = np.empty((size, size, chans), np.uint8)
    reason = decode_into(out, read_source_bytes, src, size, chans)
    if reason is None:
        return out, 0
    codes = reason_codes()
    return None, codes.index(reason) if reason in codes else codes.index("undecodable")


def decode_and_augment(
    batch: dict, spec: dict, ops: int, magnitude: int, smoothing: float, crop: bool = False, flip: bool = False
) -> Iterator[dict[str, np.ndarray]]:
    """Read, decode, noise (random-resized-crop with ``crop``, flip with ``flip``, RandAugment; once per copy;
    :func:`trainer.noise.train_transform`) and normalise; yields at most DECODE_BATCH rows at a time.

    Out: ``image`` float32 (n, C, H, W), ``target`` float32 (n, classes), ``ok`` uint8 (n,) and
    ``reason`` int64 (n,): a row that failed keeps its place with a zero image, ``ok = 0``.
    """
    from PIL import Image

    size, chans = spec["image_size"], spec["in_chans"]
    transform = train_transform(ops, magnitude, size, crop, flip)
    images = batch.get("image", [None] * len(batch["path"]))  # bytes the labeler kept; null (None/NaN): path
    sources = [i if isinstance(i, bytes) else p for i, p in zip(images, batch["path"])]
    copies = batch["copies"] if "copies" in batch else np.ones(len(sources), np.int64)
    targets = np.stack(list(batch["target"])).astype(np.float32, copy=False)
    out: dict[str, list] = {"image": [], "target": [], "ok": [], "reason": []}
    for src, reps, target in zip(sources, copies, targets):
        arr, code = _decode(src, size, chans)
        for _ in range(int(reps)):
            img = np.zeros((size, size, chans), np.uint8) if arr is None else arr
            if transform is not None and arr is not None:
                pil = Image.fromarray(arr[:, :, 0] if chans == 1 else arr)
                img = np.asarray(transform(pil), dtype=np.uint8).reshape(size, size, chans)
            for key, value in (("image", img), ("target", target), ("ok", int(arr is not None)), ("reason", code)):
                out[key].append(value)
            if len(out["ok"]) == DECODE_BATCH:
                yield _finish(out, spec, smoothing)
                out = {k: [] for k in out}
    if out["ok"]:
        yield _finish(out, spec, smoothing)


def _finish(out: dict[str, list], spec: dict, smoothing: float) -> dict[str, np.ndarray]:
    y = np.stack(out["target"])
    return {
        "image": normalize(np.stack(out["image"]), spec["mean"], spec["std"]).numpy(),
        "target": smooth(y, smoothing) if smoothing > 0 else y,
        "ok": np.asarray(out["ok"], dtype=np.uint8),
        "reason": np.asarray(out["reason"], dtype=np.int64),
    }


def augmented(
    ds: ray.data.Dataset,
    spec: dict,
    ops: int,
    magnitude: int,
    smoothing: float,
    crop: bool = False,
    flip: bool = False,
) -> ray.data.Dataset:
    """The CPU-task stage: decode + augment (each dataset shuffles its own order per pass)."""
    kwargs = {"spec": spec, "ops": ops, "magnitude": magnitude, "smoothing": smoothing, "crop": crop, "flip": flip}
    return ds.map_batches(
        decode_and_augment, batch_size=DECODE_BATCH, batch_format="numpy", num_cpus=1, fn_kwargs=kwargs
    )
