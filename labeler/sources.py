"""Corpus readers: every format becomes rows of (id, path, bytes, read_error, unit) for the decode stage.

Formats, each a local path or an s3:// URI:

* ``folder``: an image folder tree, read recursively; id = path relative to the root; listed as
  a stream into a Parquet listing (:mod:`labeler.listing`), never one list in the driver;
* ``parquet``: Parquet files with an image-bytes column (plain binary, or a struct with a
  ``bytes`` field as Hugging Face datasets write it) and an optional id column; without
  one, id = ``<file relative to root>#<row hash>``;
* ``manifest``: a ``.txt`` file of image URIs, one per line, or a ``.parquet`` file with a
  ``uri`` column (:mod:`labeler.manifest`); id = the URI as written;
* ``webdataset``: ``.tar`` shards; id = ``<shard relative to root>/<key>``; read by
  :mod:`labeler.tar_reader` (webdataset's key and extension rules, damaged shards as rows).

Hidden files and folders (names starting with ``.``) are skipped by every reader.

Nothing is decoded here: decoding happens per image in the decode stage so one bad
image is one rejection, never a failed block.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import tempfile
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from labeler.file_reader import SCHEMA, blocks, read_files, relative_id
from labeler.images import read_failure
from labeler.listing import iter_files, listing_reader, write_listing
from labeler.manifest import is_manifest, parquet_units, read_manifest_range, text_units
from labeler.storage import absolute, filesystem_for
from labeler.tar_reader import read_shards
from labeler.units import UNIT_COLUMN, Reader, Unit, UnitsDatasource, make_units

FORMATS = ("auto", "folder", "parquet", "webdataset", "manifest")
FILES_PER_BLOCK = 1000
SNIFF_FILES = 10_000  # files listed before the format is decided (format: auto)


def detect_format(source: str) -> str:
    """Guess the format from the file extensions among the first :data:`SNIFF_FILES` files under
    ``source`` in listing order (pass a format to skip this); the corpus is not listed whole."""
    _, _, _, files = _stream(source)
    return _format_of(source, list(itertools.islice(files, SNIFF_FILES)))


def _stream(source: str) -> tuple[pafs.FileSystem, str, bool, Iterator[str]]:
    """(filesystem, root, whether it is a folder, its files one at a time in sorted order)."""
    fs, root = filesystem_for(source)
    kind = fs.get_file_info(root).type
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {source} does not exist; check the path (or s3:// URI and credentials)")
    if kind == pafs.FileType.File:
        return fs, root, False, iter([root])
    return fs, root, True, iter_files(fs, root)


def _format_of(source: str, names: list[str]) -> str:
    exts = {n.rsplit(".", 1)[-1].lower() for n in names if "." in n.rsplit("/", 1)[-1]}
    if "parquet" in exts:
        return "parquet"
    if "tar" in exts:
        return "webdataset"
    if not names:
        raise ValueError(f"input {source} holds no files")
    return "folder"


def scratch_listing(source: str, files_per_unit: int) -> str:
    """A local path for a folder's listing when the caller names none (one per corpus and unit size,
    overwritten by the next listing of it). Local to this machine: on a multi-node cluster pass
    ``listing`` (a shared or s3:// URI) to :func:`plan_units` instead."""
    name = hashlib.sha1(f"{absolute(source)}|{files_per_unit}".encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "labeler-listings", f"{name}.parquet")


def image_bytes(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """An image column as plain bytes: binary as is, or the ``bytes`` field of a Hugging Face struct."""
    if pa.types.is_struct(col.type):
        return pa.chunked_array([c.field("bytes") for c in col.chunks], type=col.type.field("bytes").type)
    return col


def _parquet_rows(batch: pa.Table, path: str, root: str, image_column: str, id_column: str | None) -> list[tuple]:
    data = image_bytes(batch[image_column]).to_pylist()
    if id_column:
        ids = [str(v) for v in batch[id_column].to_pylist()]
    else:
        rel = relative_id(path, root)
        ids = [f"{rel}#{hashlib.sha1(d or b'').hexdigest()[:16]}" for d in data]
    return [(i, path, d, None) for i, d in zip(ids, data)]


def read_parquet_files(
    fs: pafs.FileSystem, root: str, paths: list[str], image_column: str = "image", id_column: str | None = None
) -> Iterator[pa.Table]:
    """(id, path, bytes, read_error) blocks of Parquet files, streamed a record batch at a time; a
    file that cannot be opened, or lacks the columns, is one ``unreadable`` row naming it."""
    columns = [image_column] + ([id_column] if id_column else [])

    def rows():
        for path in paths:
            try:
                with fs.open_input_file(path) as f:
                    for batch in pq.ParquetFile(f).iter_batches(batch_size=256, columns=columns):
                        yield from _parquet_rows(pa.Table.from_batches([batch]), path, root, image_column, id_column)
            except (OSError, pa.ArrowException, KeyError) as err:
                detail = f"{relative_id(path, root)}: {type(err).__name__}: {err}"
                yield (f"{relative_id(path, root)}#unreadable", path, None, read_failure("unreadable", detail))

    yield from blocks(rows())


def plan_units(
    source: str,
    fmt: str = "auto",
    image_column: str = "image",
    id_column: str | None = None,
    files_per_unit: int = FILES_PER_BLOCK,
    listing: str | None = None,
) -> tuple[str, list[Unit], Reader]:
    """(format, units, reader) of a corpus: the deterministic read tasks of labeling (labeler.units).

    A folder is listed as a stream into a Parquet listing at ``listing`` (local path or s3:// URI;
    default :func:`scratch_listing`) and its units are row ranges of it (:mod:`labeler.listing`), so
    the driver never holds every path. Parquet files and WebDataset shards (thousands, not millions)
    are listed into a list, a unit per file. With ``fmt="auto"`` the format is decided from the first
    :data:`SNIFF_FILES` files listed.

    Raises:
        FileNotFoundError: ``source`` does not exist. ValueError: an unknown format, or no input files.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    if fmt == "manifest" or (fmt == "auto" and is_manifest(source)):
        return "manifest", _manifest_units(source, files_per_unit), read_manifest_range
    _, root, is_folder, stream = _stream(source)
    head = list(itertools.islice(stream, SNIFF_FILES))
    fmt = _format_of(source, head) if fmt == "auto" else fmt
    files = itertools.chain(head, stream)
    if fmt == "folder" and is_folder:
        written = write_listing(root, files, listing or scratch_listing(source, files_per_unit), files_per_unit)
        units, reader = written.units, listing_reader(written.uri)
    elif fmt == "folder":  # one file
        units, reader = make_units(list(files), files_per_unit), read_files
    elif fmt == "parquet":
        units = make_units([f for f in files if f.endswith(".parquet")], 1)
        reader = functools.partial(read_parquet_files, image_column=image_column, id_column=id_column)
    else:
        units, reader = make_units([f for f in files if f.endswith(".tar")], 1), read_shards
    if not units:
        raise ValueError(f"input {source} holds no {fmt} input files")
    return fmt, units, reader


def unit_rows(fmt: str, units: list[Unit]) -> int | None:
    """The images ``units`` of a ``fmt`` corpus hold where the listing says (folders: the listing's
    row count), else None (counting Parquet rows or tar members would mean reading them)."""
    if fmt != "folder":
        return None
    return sum(len(u.paths) if u.stop is None else u.stop - u.start for u in units)


def _manifest_units(source: str, per_unit: int) -> list[Unit]:
    fs, path = filesystem_for(source)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"manifest {source} is not a file (a .txt of URIs, or a .parquet with a uri column)")
    units = (parquet_units if path.endswith(".parquet") else text_units)(fs, path, per_unit)
    if not units:
        raise ValueError(f"manifest {source} lists no images")
    return units


def read_source(
    source: str, options=None, skip_units: frozenset = frozenset(), unit_log: str | None = None, plan=None
) -> ray.data.Dataset:
    """A lazy dataset of (id, path, bytes, read_error, unit) rows, one per image.

    ``options``: a ``labeler.api.LabelOptions`` (format, image_column, id_column, files_per_unit;
    read tasks reserve ``decode_cpus``). A read task per unit (``labeler.units``), except those in
    ``skip_units`` (finished before); with ``unit_log``, each task records its unit's row count
    there. ``plan``: :func:`plan_units`'s result when the caller has it (the corpus is listed once).
    Row mappings reserve the same CPUs, so Ray Data fuses them into the read tasks.
    """
    from labeler.api import LabelOptions

    opts = options or LabelOptions()
    _, units, reader = plan or plan_units(source, opts.format, opts.image_column, opts.id_column, opts.files_per_unit)
    fs, root = filesystem_for(source)
    todo = [u for u in units if u.key not in skip_units]
    if not todo:
        return ray.data.from_arrow(SCHEMA.append(pa.field(UNIT_COLUMN, pa.string())).empty_table())
    datasource = UnitsDatasource(fs, root, todo, reader, unit_log)
    # pinned to a block per unit: Ray would split each read task's output in ~20 otherwise
    return ray.data.read_datasource(datasource, num_cpus=opts.decode_cpus, override_num_blocks=len(todo))
