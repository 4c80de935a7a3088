"""Training data: labeled class folders and the balanced pseudo-labeled Parquet.

At the scale of the embedded corpus every worker decodes its images once into memory
(uint8 at the model's input size); augmentation runs per step.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from labeler.images import RejectedImage, decode_image, resize_center_crop
from labeler.sources import image_bytes
from labeler.storage import filesystem_for, list_files, read_bytes


@dataclass
class ImageSet:
    """Decoded images (N,H,W,C uint8) with soft targets (N,classes float32) and names.

    ``unreadable`` counts the rows that could not be read or decoded, by reject reason (a
    pseudo-labeled row counts once per copy); ``first_unreadable`` names the first of them
    (``"<id>: <reason>"``). They are left out of ``images``.
    """

    images: np.ndarray
    targets: np.ndarray
    ids: list[str]
    unreadable: dict[str, int] = field(default_factory=dict)
    first_unreadable: str = ""

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


def read_source_bytes(src: bytes | str) -> bytes:
    """Bytes carried in a table (returned as they are) or read from a URI.

    Raises:
        RejectedImage: ``unreadable`` when the URI cannot be read.
    """
    if isinstance(src, bytes | bytearray | memoryview):
        return bytes(src)
    try:
        return read_bytes(src)
    except OSError as err:  # FileNotFoundError, permissions, S3 errors
        raise RejectedImage("unreadable", f"{type(err).__name__}: {err}") from err


def _decode_many(
    sources: list, image_size: int, in_chans: int, read: Callable = read_source_bytes
) -> tuple[np.ndarray, list[str | None]]:
    """Decode ``read(source)`` for each source (bytes or a URI) at the model's size; the reject
    reason of each image (None when it decoded)."""
    out = np.zeros((len(sources), image_size, image_size, in_chans), dtype=np.uint8)
    reasons: list[str | None] = []
    for i, src in enumerate(sources):
        try:
            out[i] = resize_center_crop(decode_image(read(src), in_chans), image_size)
            reasons.append(None)
        except RejectedImage as err:
            reasons.append(err.reason)
    return out, reasons


def _rejections(reasons: list[str | None], ids: list[str], weights=None) -> tuple[dict[str, int], str]:
    """(count per reject reason, ``"<id>: <reason>"`` of the first) of :func:`_decode_many`'s reasons."""
    counts: Counter = Counter()
    first = ""
    for i, reason in enumerate(reasons):
        if reason is not None:
            counts[reason] += 1 if weights is None else int(weights[i])
            first = first or f"{ids[i]}: {reason}"
    return dict(sorted(counts.items())), first


def class_indices(names: list[str], classes: list[str], root: str) -> np.ndarray:
    """Index into ``classes`` of each class name; a name the model does not know is an error."""
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(f"{root} has classes {unknown[:10]} that the model does not know ({classes[:10]})")
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[n] for n in names], dtype=np.int64)


def _one_hot(images: np.ndarray, reasons: list, indices: np.ndarray, ids: list[str], num_classes: int) -> ImageSet:
    keep = np.flatnonzero([r is None for r in reasons])
    targets = np.zeros((len(keep), num_classes), dtype=np.float32)
    targets[np.arange(len(keep)), indices[keep]] = 1.0
    unreadable, first = _rejections(reasons, ids)
    return ImageSet(images[keep], targets, [ids[k] for k in keep], unreadable, first)


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
    images that cannot be read or decoded are left out and counted in ``ImageSet.unreadable``."""
    if parquet_files(root):
        cols = _parquet_columns(root, ["image", "label"])
        indices = class_indices(cols["label"], classes, root)
        images, reasons = _decode_many([b or b"" for b in cols["image"]], image_size, in_chans)
        return _one_hot(images, reasons, indices, [f"{root}#{k}" for k in range(len(reasons))], len(classes))
    _, pairs = list_class_folders(root)
    indices = class_indices([c for _, c in pairs], classes, root)
    images, reasons = _decode_many([u for u, _ in pairs], image_size, in_chans)
    return _one_hot(images, reasons, indices, [u for u, _ in pairs], len(classes))


def pseudo_uris(table: pa.Table, balanced: str) -> list[str]:
    """The ``path`` column as readable URIs (rows written through S3 lack the scheme)."""
    uris = table.column("path").to_pylist()
    if balanced.startswith("s3://"):
        uris = [u if u.startswith("s3://") else "s3://" + u for u in uris]
    return uris


def pseudo_sources(table: pa.Table, balanced: str) -> list[bytes | str]:
    """Where each pseudo-labeled row's image comes from: the ``image`` bytes the labeler kept
    (``keep_image_bytes``), else its ``path`` (only a loose image file can be read that way)."""
    uris = pseudo_uris(table, balanced)
    if "image" not in table.column_names:
        return uris
    return [b if b is not None else u for b, u in zip(table.column("image").to_pylist(), uris)]


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


def pseudo_targets(table: pa.Table, num_classes: int, hard: bool) -> np.ndarray:
    """(rows, classes) float32 targets of balanced rows: one-hot pseudo labels, or the soft ones."""
    if hard:
        return np.eye(num_classes, dtype=np.float32)[table.column("label").to_numpy()]
    return dense_targets(table, num_classes)


def load_pseudo(balanced: str, num_classes: int, image_size: int, in_chans: int = 3, hard: bool = False) -> ImageSet:
    """The balanced pseudo-labeled set, each row repeated ``copies`` times; rows that cannot be
    read or decoded are left out and counted (once per copy) in ``ImageSet.unreadable``."""
    fs, path = filesystem_for(balanced)
    table = pq.read_table(path, filesystem=fs)
    table = table.sort_by("id")  # file order from a distributed write varies; training order must not
    ids = table.column("id").to_pylist()
    images, reasons = _decode_many(pseudo_sources(table, balanced), image_size, in_chans)
    probs = pseudo_targets(table, num_classes, hard)
    reps = table.column("copies").to_numpy()
    unreadable, first = _rejections(reasons, ids, reps)
    ok = np.asarray([r is None for r in reasons], dtype=bool)
    reps = np.where(ok, reps, 0)
    return ImageSet(
        np.repeat(images, reps, axis=0), np.repeat(probs, reps, axis=0), list(np.repeat(ids, reps)), unreadable, first
    )
