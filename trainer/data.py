"""Training data: labeled class folders and the balanced pseudo-labeled Parquet.

At the scale of the embedded corpus every worker decodes its images once into memory
(uint8 at the model's input size); augmentation runs per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from labeler.images import RejectedImage, decode_image, resize_center_crop
from labeler.storage import filesystem_for, list_files, read_bytes


@dataclass
class ImageSet:
    """Decoded images (N,H,W,C uint8) with soft targets (N,classes) and names."""

    images: np.ndarray
    targets: np.ndarray
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def list_class_folders(root: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(sorted class names, [(file uri, class name)]) of a ``root/<class>/...`` tree."""
    _, base = filesystem_for(root)
    fs, files = list_files(root)
    if not files and fs.get_file_info(base).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{root} does not exist")
    prefix = "s3://" if root.startswith("s3://") else ""
    pairs = []
    for path in files:
        rel = path[len(base.rstrip("/")) + 1 :]
        if "/" in rel and not rel.rsplit("/", 1)[-1].startswith("."):
            pairs.append((prefix + path, rel.split("/", 1)[0]))
    classes = sorted({c for _, c in pairs})
    if not classes:
        raise ValueError(f"{root} has no class folders with images (expected {root}/<class>/<image>)")
    return classes, pairs


def _decode_many(uris: list[str], image_size: int, in_chans: int) -> tuple[np.ndarray, list[bool]]:
    out = np.zeros((len(uris), image_size, image_size, in_chans), dtype=np.uint8)
    ok = []
    for i, uri in enumerate(uris):
        try:
            out[i] = resize_center_crop(decode_image(read_bytes(uri), in_chans), image_size)
            ok.append(True)
        except RejectedImage:
            ok.append(False)
    return out, ok


def parquet_files(root: str) -> list[str]:
    """The Parquet files of a labeled set given as Parquet (empty for a class-folder tree)."""
    return list_files(root, suffix=".parquet")[1]


def _parquet_labeled(root: str) -> tuple[list, list[str]]:
    """(image bytes, class names) of Parquet files with ``image`` (bytes, or a struct with ``bytes``) and
    ``label`` (class name or integer index) columns."""
    fs, files = list_files(root, suffix=".parquet")
    data, labels = [], []
    for path in files:
        t = pq.read_table(path, filesystem=fs, columns=["image", "label"])
        col = t["image"]
        if pa.types.is_struct(col.type):
            col = pa.chunked_array([c.field("bytes") for c in col.chunks], type=col.type.field("bytes").type)
        data += col.to_pylist()
        labels += [str(v) for v in t["label"].to_pylist()]
    return data, labels


def labeled_classes(root: str) -> list[str]:
    """Sorted class names of a labeled set: class folders, or the ``label`` values of Parquet files
    (integer labels 0..K-1 become "0".."K-1", sorted by value)."""
    if not parquet_files(root):
        return list_class_folders(root)[0]
    _, labels = _parquet_labeled(root)
    names = set(labels)
    if all(n.lstrip("-").isdigit() for n in names):
        return [str(i) for i in range(max(int(n) for n in names) + 1)]
    return sorted(names)


def _load_parquet_labeled(root: str, classes: list[str], image_size: int, in_chans: int) -> ImageSet:
    data, labels = _parquet_labeled(root)
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ValueError(f"{root} has labels {unknown[:10]} that the model does not know ({classes[:10]}...)")
    index = {c: i for i, c in enumerate(classes)}
    images = np.zeros((len(data), image_size, image_size, in_chans), dtype=np.uint8)
    keep = []
    for i, blob in enumerate(data):
        try:
            images[i] = resize_center_crop(decode_image(blob or b"", in_chans), image_size)
            keep.append(i)
        except RejectedImage:
            pass
    targets = np.zeros((len(keep), len(classes)), dtype=np.float32)
    targets[np.arange(len(keep)), [index[labels[k]] for k in keep]] = 1.0
    return ImageSet(images[keep], targets, [f"{root}#{k}" for k in keep])


def load_labeled(root: str, classes: list[str], image_size: int, in_chans: int = 3) -> ImageSet:
    """Labeled images with one-hot targets, from class folders or Parquet (``image``, ``label``);
    undecodable images are skipped."""
    if parquet_files(root):
        return _load_parquet_labeled(root, classes, image_size, in_chans)
    found, pairs = list_class_folders(root)
    extra = sorted(set(found) - set(classes))
    if extra:
        raise ValueError(f"{root} has classes {extra} that the model does not know ({classes})")
    index = {c: i for i, c in enumerate(classes)}
    images, ok = _decode_many([u for u, _ in pairs], image_size, in_chans)
    keep = np.flatnonzero(ok)
    targets = np.zeros((len(keep), len(classes)), dtype=np.float32)
    targets[np.arange(len(keep)), [index[pairs[k][1]] for k in keep]] = 1.0
    return ImageSet(images[keep], targets, [pairs[k][0] for k in keep])


def dense_targets(table: pa.Table, num_classes: int) -> np.ndarray:
    """(rows, classes) soft targets from full ``probs`` or from top-k + remaining mass.

    With top-k labels the remaining mass is spread evenly over the other classes.
    """
    if "probs" in table.column_names:
        return np.asarray(table.column("probs").to_pylist(), dtype=np.float32)
    classes = table.column("topk_classes").to_pylist()
    values = table.column("topk_probs").to_pylist()
    rest = table.column("rest_mass").to_numpy()
    out = np.zeros((table.num_rows, num_classes), dtype=np.float32)
    for i, (c, v) in enumerate(zip(classes, values)):
        others = num_classes - len(c)
        if others:
            out[i] = rest[i] / others
        out[i, c] = np.asarray(v, dtype=np.float32)
    return out / out.sum(axis=1, keepdims=True)


def load_pseudo(balanced: str, num_classes: int, image_size: int, in_chans: int = 3, hard: bool = False) -> ImageSet:
    """The balanced pseudo-labeled set, each row repeated ``copies`` times."""
    fs, path = filesystem_for(balanced)
    table = pq.read_table(path, filesystem=fs)
    table = table.sort_by("id")  # file order from a distributed write varies; training order must not
    uris = table.column("path").to_pylist()
    if balanced.startswith("s3://"):
        uris = [u if u.startswith("s3://") else "s3://" + u for u in uris]
    images, ok = _decode_many(uris, image_size, in_chans)
    if not all(ok):
        raise ValueError(f"{sum(not o for o in ok)} pseudo-labeled images no longer decode; re-run labeling")
    if hard:
        probs = np.eye(num_classes, dtype=np.float32)[table.column("label").to_numpy()]
    else:
        probs = dense_targets(table, num_classes)
    reps = table.column("copies").to_numpy()
    return ImageSet(np.repeat(images, reps, axis=0), np.repeat(probs, reps, axis=0), list(np.repeat(uris, reps)))
