"""Training data: labeled class folders and the balanced pseudo-labeled Parquet.

At the scale of the embedded corpus every worker decodes its images once into memory
(uint8 at the model's input size); augmentation runs per step. Evaluation never does:
:class:`LabeledBatches` streams a labeled set batch by batch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from core.images import RejectedImage, decode_into, image_bytes, is_container
from core.storage import filesystem_for, is_s3, iter_tables, list_dirs, list_files, read_bytes, uri_of

EVAL_BATCH = 256  # images per evaluation batch: all an evaluation holds decoded at once
REMOTE_READS = 16  # S3 objects fetched at a time by LabeledBatches (each GET is latency-bound)


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
    pairs = _class_pairs(fs, base, files)
    classes = sorted({c for _, c in pairs})
    if not classes:
        raise ValueError(f"{root} has no class folders with images (expected {root}/<class>/<image>)")
    return classes, pairs


def _class_pairs(fs: pafs.FileSystem, base: str, files: list[str]) -> list[tuple[str, str]]:
    """[(file uri, class name)] of the listed ``files`` under ``base``; files directly under it belong to
    no class (hidden ones are never listed)."""
    pairs = []
    for path in files:
        rel = path[len(base.rstrip("/")) + 1 :]
        if "/" in rel:
            pairs.append((uri_of(fs, path), rel.split("/", 1)[0]))
    return pairs


def read_source_bytes(src: bytes | str) -> bytes:
    """Bytes carried in a table (returned as they are) or read from a URI.

    Raises:
        RejectedImage: ``unreadable`` when the URI cannot be read.
    """
    if isinstance(src, bytes | bytearray | memoryview):
        return bytes(src)
    if is_container(src):  # never read a whole shard as if it were one image
        raise RejectedImage("unreadable", f"{src} is a shard, not an image, and the row carries no image bytes")
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
    return out, [decode_into(out[i], read, src, image_size, in_chans) for i, src in enumerate(sources)]


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
    if None in names:
        raise ValueError(f"{root} has rows without a label (null or NaN); label them or drop them")
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(f"{root} has classes {unknown[:10]} that the model does not know ({classes[:10]})")
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[n] for n in names], dtype=np.int64)


def one_hot(indices: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 (n, num_classes) one-hot rows of integer class ``indices`` (n,): the targets of labeled
    images and of hard pseudo labels, in both training feeds.

    Raises:
        IndexError: an index outside 0..num_classes-1.
    """
    return np.eye(num_classes, dtype=np.float32)[np.asarray(indices, dtype=np.int64)]


def _one_hot(images: np.ndarray, reasons: list, indices: np.ndarray, ids: list[str], num_classes: int) -> ImageSet:
    keep = np.flatnonzero([r is None for r in reasons])
    targets = one_hot(indices[keep], num_classes)
    unreadable, first = _rejections(reasons, ids)
    return ImageSet(images[keep], targets, [ids[k] for k in keep], unreadable, first)


def parquet_files(root: str) -> list[str]:
    """The Parquet files of a labeled set given as Parquet (empty for a class-folder tree)."""
    return list_files(root, suffix=".parquet")[1]


LABEL_COLUMN = "label"  # the default of ``data.label_column``; carved splits (pipeline.split) write it too


def label_names(values: pa.Array | pa.ChunkedArray, where: str) -> list[str | None]:
    """Class names of a Parquet ``label`` column's values; None for a row without a label (null, NaN).

    Accepted: strings (class names, as written), integers (class indices, as ``"3"``) and floats whose
    values are all integral (``3.0`` -> ``"3"``: what pandas writes for an int column with a missing
    value). ``where`` names the file and column in errors.

    Raises:
        ValueError: another type (bool, nested, ...), a float that is not integral, or a negative index.
    """
    t = values.type
    if pa.types.is_dictionary(t):
        values, t = values.cast(t.value_type), t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return values.to_pylist()
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        numbers = values.to_pylist()
        named: list[str | None] = []
        for v in numbers:
            if v is None or v != v:  # null or NaN: no label
                named.append(None)
            elif not math.isfinite(v) or v != int(v) or v < 0:
                raise ValueError(
                    f"{where}: label {v!r} is not a class index (a whole number >= 0); labels must be class names "
                    "(strings) or class indices 0..K-1"
                )
            else:
                named.append(str(int(v)))
        return named
    raise ValueError(
        f"{where} holds {t} values; labels must be class names (strings) or class indices (integers, or floats "
        "holding whole numbers)"
    )


@dataclass
class ClassSet:
    """What a labeled set holds, read before any training (``read_class_set``).

    ``classes``: the class names the set defines, in the project's order (folders: sorted names; Parquet:
    indices 0..K-1 when every label is a number, else sorted names); ``counts``: images (rows, files) per
    class, 0 for a class with none (an empty class folder, an index no row uses); ``unlabeled``: Parquet
    rows without a label; ``unclassified``: files directly under a class-folder root (in no class);
    ``numeric``: every class name is a whole number; ``kind``: ``folders`` or ``parquet``.
    """

    root: str
    kind: str
    classes: list[str]
    counts: dict[str, int]
    unlabeled: int = 0
    unclassified: int = 0
    numeric: bool = False

    @property
    def images(self) -> int:
        """Images (files or rows) that belong to a class."""
        return sum(self.counts.values())

    @property
    def empty(self) -> list[str]:
        """Classes without an image."""
        return [c for c in self.classes if not self.counts.get(c)]


def _is_index(name: str) -> bool:
    return name.isdigit()


def read_class_set(root: str, label_column: str = LABEL_COLUMN) -> ClassSet:
    """The classes of a labeled set and the images in each, from its listing (class folders) or its
    ``label_column`` alone (Parquet, streamed a record batch at a time): no image is read.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no class folder holds an image; a Parquet file without ``label_column`` (naming
            the columns it has); labels that are neither class names nor class indices (:func:`label_names`).
    """
    fs, listed = list_files(root)  # listed once: Parquet files, or the class folders' files
    files = [f for f in listed if f.endswith(".parquet")]
    if not files:
        if not listed and fs.get_file_info(filesystem_for(root)[1]).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{root} does not exist")
        pairs = _class_pairs(fs, filesystem_for(root)[1], listed)
        if not pairs:
            raise ValueError(f"{root} has no class folders with images (expected {root}/<class>/<image>)")
        counts = Counter(c for _, c in pairs)
        folders = [d for d in list_dirs(root) if not d.startswith(".")]
        names = sorted(set(counts) | set(folders))
        loose = len(listed) - len(pairs)
        numeric = all(map(_is_index, names))
        return ClassSet(root, "folders", names, {c: counts.get(c, 0) for c in names}, 0, loose, numeric)
    counts, missing = Counter(), 0
    for path in files:
        where = f"{uri_of(fs, path)}, column {label_column!r}"
        names = pq.read_schema(path, filesystem=fs).names
        if label_column not in names:
            raise ValueError(
                f"{uri_of(fs, path)} has no {label_column!r} column (its columns: {', '.join(names)}); name the "
                "column that holds the labels with data.label_column"
            )
        if not {"image", "path"} & set(names):
            raise ValueError(
                f"{uri_of(fs, path)} has neither an image column (image bytes, or a struct with bytes) nor a path "
                f"column (image URIs); its columns: {', '.join(names)}. Name the image column 'image'"
            )
        for table in iter_tables(fs, path, 64 * 1024, [label_column]):
            named = label_names(table.column(0), where)
            missing += sum(n is None for n in named)
            counts.update(n for n in named if n is not None)
    if counts and all(map(_is_index, counts)):
        top = max(int(n) for n in counts)
        if top + 1 > 100 * len(counts) + 1000:  # an id column, not class indices: do not build a billion names
            raise ValueError(
                f"{root}: the labels in column {label_column!r} are numbers up to {top:,} but only {len(counts):,} "
                "distinct values, so most class indices 0..K-1 would be empty; is data.label_column the label column?"
            )
        classes = [str(i) for i in range(top + 1)]
        return ClassSet(root, "parquet", classes, {c: counts.get(c, 0) for c in classes}, missing, 0, True)
    classes = sorted(counts)
    return ClassSet(root, "parquet", classes, dict(counts), missing, 0, bool(classes) and all(map(_is_index, classes)))


def parquet_columns(root: str, columns: list[str], label_column: str = LABEL_COLUMN) -> dict[str, list]:
    """Python lists of ``columns`` over every Parquet file under ``root`` (``image`` as plain bytes; the
    labels of ``label_column``, under the key ``label``, as class names: :func:`label_names`)."""
    fs, files = list_files(root, suffix=".parquet")
    read = [label_column if c == "label" else c for c in columns]
    out: dict[str, list] = {c: [] for c in columns}
    for path in files:
        t = pq.read_table(path, filesystem=fs, columns=read)
        for c, r in zip(columns, read):
            if c == "label":
                out[c] += label_names(t[r], f"{uri_of(fs, path)}, column {r!r}")
            else:
                out[c] += (image_bytes(t[r]) if c == "image" else t[r]).to_pylist()
    return out


def parquet_source_column(root: str) -> str:
    """Where a Parquet labeled set's images are: ``image`` (bytes, or a struct with ``bytes``) or, in a
    manifest (a file list such as the validation carving writes, ``pipeline.split``), ``path`` (a URI
    per row, read like a class-folder file).

    Raises:
        ValueError: the first file has neither column.
    """
    fs, files = list_files(root, suffix=".parquet")
    names = pq.read_schema(files[0], filesystem=fs).names
    for column in ("image", "path"):
        if column in names:
            return column
    raise ValueError(
        f"{uri_of(fs, files[0])} has neither an image column (image bytes) nor a path column (image URIs); its "
        f"columns: {', '.join(names)}. A labeled Parquet set needs one of them and a label column"
    )


def labeled_classes(root: str, label_column: str = LABEL_COLUMN) -> list[str]:
    """Class names of a labeled set (:attr:`ClassSet.classes`): class folders (sorted names), or the labels
    of Parquet files (class names, sorted, or class indices: integer labels 0..K-1 become "0".."K-1",
    in index order)."""
    return read_class_set(root, label_column).classes


def load_labeled(
    root: str, classes: list[str], image_size: int, in_chans: int = 3, label_column: str = LABEL_COLUMN
) -> ImageSet:
    """Labeled images with one-hot targets, from class folders or Parquet (``image`` or ``path``, ``label``);
    images that cannot be read or decoded are left out and counted in ``ImageSet.unreadable``.

    Returns an :class:`ImageSet`: ``images`` uint8 (n, image_size, image_size, in_chans), ``targets``
    float32 (n, len(classes)) one-hot (smoothing is applied per step, ``trainer.noise.target_smoothing``).

    Raises:
        FileNotFoundError: ``root`` does not exist. ValueError: no class folders, or a class not in ``classes``.
    """
    if parquet_files(root):
        source = parquet_source_column(root)
        cols = parquet_columns(root, [source, "label"], label_column)
        indices = class_indices(cols["label"], classes, root)
        if source == "path":  # a manifest: files named by URI, read as class-folder files are
            images, reasons = _decode_many(cols["path"], image_size, in_chans)
            return _one_hot(images, reasons, indices, cols["path"], len(classes))
        images, reasons = _decode_many([b or b"" for b in cols["image"]], image_size, in_chans)
        return _one_hot(images, reasons, indices, [f"{root}#{k}" for k in range(len(reasons))], len(classes))
    _, pairs = list_class_folders(root)
    indices = class_indices([c for _, c in pairs], classes, root)
    images, reasons = _decode_many([u for u, _ in pairs], image_size, in_chans)
    return _one_hot(images, reasons, indices, [u for u, _ in pairs], len(classes))


class LabeledBatches:
    """A labeled set read batch by batch: the evaluation reader, in bounded memory.

    The same inputs and class rules as :func:`load_labeled`: a ``root/<class>/<image>`` tree
    (local or ``s3://``) or Parquet files with ``image`` (bytes, or a struct with ``bytes``; or
    ``path``, image URIs, in a manifest) and ``label`` (class names, or integer indices) columns;
    every class must be one of ``classes``.
    Images are decoded by :func:`core.images.decode_into` (decode, then resize and centre crop),
    as everywhere else.

    Iterating yields ``(images, labels)``: ``images`` uint8 ``(n, image_size, image_size,
    in_chans)``, ``labels`` int64 ``(n,)`` indices into ``classes``, with ``1 <= n <= batch``
    (every batch full but the last), in a fixed order (files sorted, Parquet rows in file order).
    Each iteration reads the set again. An image that cannot be used is skipped and counted in
    :attr:`rejected` (reason -> count for the pass in progress or last finished): the reasons of
    :func:`decode_image`, or ``unreadable`` for a listed file that cannot be read.

    Memory: about two batches of decoded images, plus the listing (one path per image) for class
    folders, or one Parquet row group's ``image``/``label`` columns for Parquet (reads use
    ``ParquetFile.iter_batches``; a file is never read whole).

    Raises (on construction):
        FileNotFoundError: ``root`` does not exist.
        ValueError: ``batch`` < 1; a class-folder tree without class folders; a class (folder
            name or ``label`` value) that is not in ``classes``.
    """

    def __init__(
        self,
        root: str,
        classes: list[str],
        image_size: int,
        in_chans: int = 3,
        batch: int = EVAL_BATCH,
        crop_pct: float = 1.0,
        interpolation: str = "bilinear",
        label_column: str = LABEL_COLUMN,
    ):
        if batch < 1:
            raise ValueError(f"the evaluation batch must hold at least one image, not {batch}")
        self.root, self.classes, self.image_size, self.in_chans, self.batch = root, classes, image_size, in_chans, batch
        self.crop_pct, self.interpolation = crop_pct, interpolation  # the model's eval resize (ModelSpec)
        self.label_column = label_column
        self.rejected: Counter[str] = Counter()
        self._index = {c: i for i, c in enumerate(classes)}
        self._parquet = parquet_files(root)
        if self._parquet:
            self._check_parquet_labels()
            self._uris, self._labels = [], np.zeros(0, dtype=np.int64)
        else:
            _, pairs = list_class_folders(root)
            self._uris = [u for u, _ in pairs]
            self._labels = class_indices([c for _, c in pairs], classes, root)

    def _check_parquet_labels(self) -> None:
        """Every ``label`` value is a known class (a pass over that column alone, before any decoding)."""
        seen: set[str] = set()
        for pf in self._parquet_files():
            with pf:
                for rb in pf.iter_batches(batch_size=64 * 1024, columns=[self.label_column]):
                    where = f"{self.root}, column {self.label_column!r}"
                    seen.update(label_names(pc.unique(rb.column(0)), where))
        class_indices(list(seen), self.classes, self.root)

    def __len__(self) -> int:
        """Images in the set (rows of its Parquet files, from their footers; or files listed), readable or not."""
        if not self._parquet:
            return len(self._uris)
        total = 0
        for pf in self._parquet_files():
            with pf:
                total += pf.metadata.num_rows
        return total

    def _parquet_files(self) -> Iterator[pq.ParquetFile]:
        fs, _ = filesystem_for(self.root)
        for path in self._parquet:
            yield pq.ParquetFile(fs.open_input_file(path))

    def _sources(self) -> Iterator[tuple[bytes | None, int]]:
        """(image bytes or None when unreadable, class index) in the set's order."""
        if self._parquet:
            source = parquet_source_column(self.root)
            for pf in self._parquet_files():
                with pf:
                    for rb in pf.iter_batches(batch_size=self.batch, columns=[source, self.label_column]):
                        if source == "path":  # a manifest of image URIs
                            blobs = [_read_or_none(u) for u in rb.column(0).to_pylist()]
                        else:
                            blobs = image_bytes(pa.chunked_array([rb.column(0)])).to_pylist()
                        names = label_names(rb.column(1), f"{self.root}, column {self.label_column!r}")
                        labels = [self._index[n] for n in names]
                        yield from zip(blobs, labels)
            return
        with ThreadPoolExecutor(REMOTE_READS) as pool:
            for start in range(0, len(self._uris), self.batch):
                uris = self._uris[start : start + self.batch]
                reads = pool.map(_read_or_none, uris) if is_s3(self.root) else map(_read_or_none, uris)
                yield from zip(reads, self._labels[start : start + self.batch].tolist())

    def _new_batch(self) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.batch, self.image_size, self.image_size, self.in_chans)
        return np.zeros(shape, dtype=np.uint8), np.zeros(self.batch, dtype=np.int64)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        self.rejected = Counter()
        images, labels = self._new_batch()
        n = 0
        for data, label in self._sources():
            if data is None:
                reason = "unreadable"
            else:
                reason = decode_into(
                    images[n],
                    bytes,
                    data,
                    self.image_size,
                    self.in_chans,
                    self.crop_pct,
                    interpolation=self.interpolation,
                )
            if reason is not None:
                self.rejected[reason] += 1
                continue
            labels[n] = label
            n += 1
            if n == self.batch:
                yield images, labels
                images, labels = self._new_batch()
                n = 0
        if n:
            yield images[:n], labels[:n]


def _read_or_none(uri: str) -> bytes | None:
    """A file's bytes, or None when it cannot be read (deleted since the listing, no permission)."""
    try:
        return read_bytes(uri)
    except OSError:
        return None


def pseudo_sources(table: pa.Table) -> list[bytes | str]:
    """Where each pseudo-labeled row's image comes from: the ``image`` bytes the labeler kept
    (``keep_image_bytes``), else its ``path`` URI (only a loose image file can be read that way)."""
    uris = table.column("path").to_pylist()
    if "image" not in table.column_names:
        return uris
    return [b if b is not None else u for b, u in zip(table.column("image").to_pylist(), uris)]


def dense_targets(table: pa.Table, num_classes: int) -> np.ndarray:
    """float32 (rows, num_classes) soft targets from full ``probs`` or from top-k + remaining mass.

    With top-k labels (``topk_classes``, fp16 ``topk_probs``, ``rest_mass``) the remaining mass is
    spread evenly over the other classes and each row renormalised to sum to 1.
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
        return one_hot(table.column("label").to_numpy(), num_classes)
    return dense_targets(table, num_classes)


def load_pseudo(balanced: str, num_classes: int, image_size: int, in_chans: int = 3, hard: bool = False) -> ImageSet:
    """The balanced pseudo-labeled set, each row repeated ``copies`` times; rows that cannot be
    read or decoded are left out and counted (once per copy) in ``ImageSet.unreadable``.

    Returns an :class:`ImageSet` sorted by ``id``: ``images`` uint8 (sum of copies, image_size,
    image_size, in_chans), ``targets`` float32 (sum of copies, num_classes): one-hot pseudo labels
    when ``hard``, else the stored distributions (:func:`pseudo_targets`).
    """
    fs, path = filesystem_for(balanced)
    table = pq.read_table(path, filesystem=fs)
    table = table.sort_by("id")  # file order from a distributed write varies; training order must not
    ids = table.column("id").to_pylist()
    images, reasons = _decode_many(pseudo_sources(table), image_size, in_chans)
    probs = pseudo_targets(table, num_classes, hard)
    reps = table.column("copies").to_numpy()
    unreadable, first = _rejections(reasons, ids, reps)
    ok = np.asarray([r is None for r in reasons], dtype=bool)
    reps = np.where(ok, reps, 0)
    return ImageSet(
        np.repeat(images, reps, axis=0), np.repeat(probs, reps, axis=0), list(np.repeat(ids, reps)), unreadable, first
    )
