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
from labeler.sources import image_bytes
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
    """(sorted class names, [(file uri, class name)]) of a ``root/<class>/...`` tree.

    Hidden folders and files (``.ipynb_checkpoints/``, ``.DS_Store``) are neither classes nor images.
    """
    _, base = filesystem_for(root)
    fs, files = list_files(root)
    if not files and fs.get_file_info(base).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{root} does not exist")
    prefix = "s3://" if root.startswith("s3://") else ""
    pairs = []
    for path in files:
        rel = path[len(base.rstrip("/")) + 1 :]
        if "/" in rel:  # files directly under root belong to no class; hidden ones are never listed
            pairs.append((prefix + path, rel.split("/", 1)[0]))
    classes = sorted({c for _, c in pairs})
    if not classes:
        raise ValueError(f"{root} has no class folders with images (expected {root}/<class>/<image>)")
    return classes, pairs


def _decode_many(sources: list, image_size: int, in_chans: int, read=read_bytes) -> tuple[np.ndarray, list[bool]]:
    """Decode ``read(source)`` for each source (a URI by default) at the model's size; ok flags per image."""
    out = np.zeros((len(sources), image_size, image_size, in_chans), dtype=np.uint8)
    ok = []
    for i, src in enumerate(sources):
        try:
            out[i] = resize_center_crop(decode_image(read(src), in_chans), image_size)
            ok.append(True)
        except RejectedImage:
            ok.append(False)
    return out, ok


def class_indices(names: list[str], classes: list[str], root: str) -> np.ndarray:
    """Index into ``classes`` of each class name; a name the model does not know is an error."""
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(f"{root} has classes {unknown[:10]} that the model does not know ({classes[:10]})")
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[n] for n in names], dtype=np.int64)


def _one_hot(images: np.ndarray, ok: list[bool], indices: np.ndarray, ids: list[str], num_classes: int) -> ImageSet:
    keep = np.flatnonzero(ok)
    targets = np.zeros((len(keep), num_classes), dtype=np.float32)
    targets[np.arange(len(keep)), indices[keep]] = 1.0
    return ImageSet(images[keep], targets, [ids[k] for k in keep])


def parquet_files(root: str) -> list[str]:
    """The Parquet files of a labeled set given as Parquet (empty for a class-folder tree)."""
    return list_files(root, suffix=".parquet")[1]


def _parquet_columns(root: str, columns: list[str]) -> dict[str, list]:
    """Python lists of ``columns`` over every Parquet file under ``root`` (``image`` as plain bytes)."""
    fs, files = list_files(root, suffix=".parquet")
    out: dict[str, list] = {c: [] for c in columns}
    for path in files:
        t = pq.read_table(path, filesystem=fs, columns=columns)
        for c in columns:
            out[c] += (image_bytes(t[c]) if c == "image" else t[c]).to_pylist()
    out["label"] = [str(v) for v in out["label"]]
    return out


def labeled_classes(root: str) -> list[str]:
    """Sorted class names of a labeled set: class folders, or the ``label`` values of Parquet files
    (``image`` column, bytes or a struct with ``bytes``; ``label`` column, class names or integer
    indices; integer labels 0..K-1 become "0".."K-1", sorted by value)."""
    if not parquet_files(root):
        return list_class_folders(root)[0]
    names = set(_parquet_columns(root, ["label"])["label"])
    if all(n.lstrip("-").isdigit() for n in names):
        return [str(i) for i in range(max(int(n) for n in names) + 1)]
    return sorted(names)


def load_labeled(root: str, classes: list[str], image_size: int, in_chans: int = 3) -> ImageSet:
    """Labeled images with one-hot targets, from class folders or Parquet (``image``, ``label``);
    undecodable images are skipped."""
    if parquet_files(root):
        cols = _parquet_columns(root, ["image", "label"])
        indices = class_indices(cols["label"], classes, root)
        images, ok = _decode_many(cols["image"], image_size, in_chans, read=lambda blob: blob or b"")
        return _one_hot(images, ok, indices, [f"{root}#{k}" for k in range(len(ok))], len(classes))
    _, pairs = list_class_folders(root)
    indices = class_indices([c for _, c in pairs], classes, root)
    images, ok = _decode_many([u for u, _ in pairs], image_size, in_chans)
    return _one_hot(images, ok, indices, [u for u, _ in pairs], len(classes))


def pseudo_uris(table: pa.Table, balanced: str) -> list[str]:
    """The ``path`` column as readable URIs (rows written through S3 lack the scheme)."""
    uris = table.column("path").to_pylist()
    if balanced.startswith("s3://"):
        uris = [u if u.startswith("s3://") else "s3://" + u for u in uris]
    return uris


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
    uris = pseudo_uris(table, balanced)
    images, ok = _decode_many(uris, image_size, in_chans)
    if not all(ok):
        raise ValueError(f"{sum(not o for o in ok)} pseudo-labeled images no longer decode; re-run labeling")
    if hard:
        probs = np.eye(num_classes, dtype=np.float32)[table.column("label").to_numpy()]
    else:
        probs = dense_targets(table, num_classes)
    reps = table.column("copies").to_numpy()
    return ImageSet(np.repeat(images, reps, axis=0), np.repeat(probs, reps, axis=0), list(np.repeat(uris, reps)))
