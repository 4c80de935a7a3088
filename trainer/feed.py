"""The streaming feed (``feed: ray_data``): Ray Data reads, decodes and augments in CPU tasks,
and each training worker iterates its own shard with ``iter_torch_batches``.

For training sets that do not fit in a worker's memory, and so CPU nodes can feed GPU workers.
(The default ``feed: memory`` decodes the sets once per worker and augments in the worker:
faster for small sets, and bit-for-bit reproducible.) Augmentation runs in the tasks, so every
pass over the data draws fresh noise; the order is shuffled per pass but not reproducible.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from labeler.images import RejectedImage, decode_image, normalize, resize_center_crop
from labeler.storage import filesystem_for, read_bytes
from trainer.data import class_indices, dense_targets, list_class_folders, parquet_files, pseudo_uris
from trainer.noise import randaugment, smooth

DECODE_BATCH = 64


def labeled_dataset(root: str, classes: list[str]) -> ray.data.Dataset:
    """Rows (path, one-hot target) of a class-folder tree, in a stable order."""
    if parquet_files(root):
        raise ValueError(f"{root} is a Parquet labeled set; feed: ray_data reads class folders, use feed: memory")
    _, pairs = list_class_folders(root)
    indices = class_indices([c for _, c in pairs], classes, root)
    eye = np.eye(len(classes), dtype=np.float32)
    return ray.data.from_items([{"path": uri, "target": eye[i]} for (uri, _), i in zip(pairs, indices)])


def _expand(table: pa.Table, num_classes: int, hard: bool, balanced: str) -> dict[str, np.ndarray]:
    """Balanced rows -> one row per copy, with dense soft (or one-hot) targets."""
    reps = table.column("copies").to_numpy()
    if hard:
        targets = np.eye(num_classes, dtype=np.float32)[table.column("label").to_numpy()]
    else:
        targets = dense_targets(table, num_classes)
    paths = np.asarray(pseudo_uris(table, balanced), dtype=object)
    return {"path": np.repeat(paths, reps), "target": np.repeat(targets, reps, axis=0)}


def pseudo_dataset(balanced: str, num_classes: int, hard: bool) -> ray.data.Dataset:
    fs, path = filesystem_for(balanced)
    ds = ray.data.read_parquet(path, filesystem=fs)
    kwargs = {"num_classes": num_classes, "hard": hard, "balanced": balanced}
    return ds.map_batches(_expand, batch_format="pyarrow", fn_kwargs=kwargs)


def pseudo_row_count(balanced: str) -> int:
    """Rows the balanced set expands to (the sum of ``copies``), reading that column only."""
    fs, path = filesystem_for(balanced)
    return int(pc.sum(pq.read_table(path, filesystem=fs, columns=["copies"])["copies"]).as_py() or 0)


def decode_and_augment(batch: dict, spec: dict, ops: int, magnitude: int, smoothing: float) -> dict[str, np.ndarray]:
    """Read, decode, RandAugment and normalise a batch; undecodable images are dropped."""
    from PIL import Image

    size, chans = spec["image_size"], spec["in_chans"]
    transform = randaugment(ops, magnitude, size)
    images, keep = [], []
    for i, uri in enumerate(batch["path"]):
        try:
            arr = resize_center_crop(decode_image(read_bytes(uri), chans), size)
        except (RejectedImage, FileNotFoundError):
            continue
        if transform is not None:
            img = Image.fromarray(arr[:, :, 0] if chans == 1 else arr)
            arr = np.asarray(transform(img), dtype=np.uint8).reshape(size, size, chans)
        images.append(arr)
        keep.append(i)
    x = normalize(np.stack(images) if images else np.zeros((0, size, size, chans), np.uint8), spec["mean"], spec["std"])
    y = np.asarray(batch["target"], dtype=np.float32)[keep]
    if smoothing > 0:
        y = smooth(y, smoothing)
    return {"image": x.numpy(), "target": y}


def augmented(ds: ray.data.Dataset, spec: dict, ops: int, magnitude: int, smoothing: float) -> ray.data.Dataset:
    """The CPU-task stage: decode + augment, shuffled block order so passes differ."""
    kwargs = {"spec": spec, "ops": ops, "magnitude": magnitude, "smoothing": smoothing}
    return ds.randomize_block_order().map_batches(
        decode_and_augment, batch_size=DECODE_BATCH, batch_format="numpy", num_cpus=1, fn_kwargs=kwargs
    )
