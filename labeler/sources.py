"""Corpus readers: every format becomes rows of (id, path, bytes) for the decode stage.

Formats, each a local path or an s3:// URI:

* ``folder``: an image folder tree, read recursively; id = path relative to the root;
* ``parquet``: Parquet files with an image-bytes column (plain binary, or a struct with a
  ``bytes`` field as Hugging Face datasets write it) and an optional id column; without
  one, id = ``<file relative to root>#<row hash>``;
* ``webdataset``: ``.tar`` shards; id = ``<shard relative to root>/<__key__>``; the first
  member with an image extension is the image.

Nothing is decoded here: decoding happens per image in the decode stage so one bad
image is one rejection, never a failed block.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from labeler.file_reader import ImageFilesDatasource, relative_id
from labeler.images import IMAGE_EXTENSIONS
from labeler.storage import filesystem_for, list_files

FORMATS = ("auto", "folder", "parquet", "webdataset")
FILES_PER_BLOCK = 1000


def detect_format(source: str) -> str:
    """Guess the format from file extensions under ``source`` (pass a format to skip the listing)."""
    return _format_of(source, _listing(source))


def _listing(source: str) -> list[str]:
    fs, root = filesystem_for(source)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {source} does not exist")
    return list_files(source)[1]


def _format_of(source: str, names: list[str]) -> str:
    exts = {n.rsplit(".", 1)[-1].lower() for n in names if "." in n.rsplit("/", 1)[-1]}
    if "parquet" in exts:
        return "parquet"
    if "tar" in exts:
        return "webdataset"
    if not names:
        raise ValueError(f"input {source} holds no files")
    return "folder"


def image_bytes(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """An image column as plain bytes: binary as is, or the ``bytes`` field of a Hugging Face struct."""
    if pa.types.is_struct(col.type):
        return pa.chunked_array([c.field("bytes") for c in col.chunks], type=col.type.field("bytes").type)
    return col


def _parquet_rows(batch: pa.Table, root: str, image_column: str, id_column: str | None) -> pa.Table:
    data = image_bytes(batch[image_column]).to_pylist()
    paths = batch["path"].to_pylist()
    if id_column:
        ids = [str(v) for v in batch[id_column].to_pylist()]
    else:
        ids = [f"{relative_id(p, root)}#{hashlib.sha1(d or b'').hexdigest()[:16]}" for p, d in zip(paths, data)]
    return pa.table({"id": ids, "path": paths, "bytes": pa.array(data, pa.binary())})


def _webdataset_rows(batch: dict, root: str) -> dict:
    n = len(batch["__key__"])
    exts = [e for e in batch if e.lower() in IMAGE_EXTENSIONS]
    data = []
    for i in range(n):
        found = next((batch[e][i] for e in exts if batch[e][i] is not None), None)
        data.append(bytes(found) if found is not None else b"")
    paths = [str(p) for p in batch["path"]] if "path" in batch else [root] * n
    ids = [f"{relative_id(p, root)}/{k}" for p, k in zip(paths, batch["__key__"])]
    return {
        "id": np.array(ids, dtype=object),
        "path": np.array(paths, dtype=object),
        "bytes": np.array(data, dtype=object),
    }


def read_source(
    source: str,
    fmt: str = "auto",
    image_column: str = "image",
    id_column: str | None = None,
    num_cpus: float = 1.0,
    sizes: dict | None = None,
) -> ray.data.Dataset:
    """A lazy dataset of (id, path, bytes[, read_error]) rows, one per image; tasks reserve ``num_cpus``.

    Row mappings reserve the same, so Ray Data fuses them into the read tasks. ``sizes``, if
    given, receives ``inputs``: the number of images for a folder (from its listing), else None
    (counting Parquet rows or tar members would mean reading them).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    files = _listing(source) if fmt in ("auto", "folder") else None  # listed once, also for the folder read
    fmt = _format_of(source, files) if fmt == "auto" else fmt
    fs, root = filesystem_for(source)
    if sizes is not None:
        sizes["inputs"] = len(files) if fmt == "folder" and files is not None else None
    if fmt == "folder":
        if not files:
            raise ValueError(f"input {source} holds no files")
        # a block per FILES_PER_BLOCK files: a task per file spends more on overhead than on reading
        blocks = -(-len(files) // FILES_PER_BLOCK)  # pinned: Ray would split each block in ~20 otherwise
        source = ImageFilesDatasource(fs, root, files, FILES_PER_BLOCK)
        return ray.data.read_datasource(source, num_cpus=num_cpus, override_num_blocks=blocks)
    if fmt == "parquet":
        columns = [image_column] + ([id_column] if id_column else [])
        ds = ray.data.read_parquet(root, filesystem=fs, columns=columns, include_paths=True, num_cpus=num_cpus)
        kwargs = {"root": root, "image_column": image_column, "id_column": id_column}
        return ds.map_batches(_parquet_rows, batch_format="pyarrow", num_cpus=num_cpus, fn_kwargs=kwargs)
    ds = ray.data.read_webdataset(
        root, filesystem=fs, decoder=None, include_paths=True, file_extensions=["tar"], num_cpus=num_cpus
    )
    return ds.map_batches(_webdataset_rows, batch_format="numpy", num_cpus=num_cpus, fn_kwargs={"root": root})
