"""Manifest inputs: a text file of image URIs (one per line) or a Parquet file with a ``uri``
(or, without one, ``path``) column, for corpora whose files are too many to list (listing 100M
loose files takes hours, one request per 1,000 keys on S3, and a listing held in the driver grows with
the corpus).

The driver never holds the URIs: it reads the manifest once, streaming, to cut it into units of
``files_per_unit`` entries (text: the byte offset where each unit starts; Parquet: row ranges
from the footer alone), and each read task reads its own range. URIs may be local paths
(absolute, or relative to the manifest's folder) or ``s3://`` URIs; the id of an image is its
URI as written in the manifest. Blank lines and lines starting with ``#`` are not entries.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from core.fingerprint import stamp
from core.storage import escape_name, filesystem_for, is_s3, join
from labeler.file_reader import REMOTE_READ_THREADS, _read_one, blocks
from labeler.units import Unit

URI_COLUMN = "uri"
PATH_COLUMN = "path"  # read when there is no uri column
READ_CHUNK = 1 << 20


def is_manifest(path: str) -> bool:
    """A ``.txt`` file is a manifest (a Parquet manifest needs ``format: manifest``)."""
    return path.lower().endswith(".txt")


def _entry(line: bytes) -> str | None:
    """The URI on a manifest line, or None (blank, comment). Bytes that are not UTF-8 are escaped as
    in folder listings (``core.storage.escape_name``); a byte-order mark is dropped."""
    text = escape_name(line.strip().decode("utf-8", "surrogateescape").lstrip("\ufeff"))
    return text if text and not text.startswith("#") else None


def text_units(fs: pafs.FileSystem, path: str, per_unit: int) -> list[Unit]:
    """Units of ``per_unit`` entries of a text manifest, by the byte offset each one starts at; each
    unit's fingerprint is a SHA-1 of its entries (so an edited line changes its unit's identity)."""
    starts, digests, entries, offset, tail = [], [], 0, 0, b""

    def add(line: bytes) -> None:
        nonlocal entries
        entry = _entry(line)
        if entry is None:
            return
        if entries % per_unit == 0:
            starts.append(offset)
            digests.append(hashlib.sha1())
        digests[-1].update(entry.encode("utf-8", "surrogateescape") + b"\n")
        entries += 1

    with fs.open_input_stream(path) as f:
        while chunk := f.read(READ_CHUNK):
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for line in lines:
                add(line)
                offset += len(line) + 1
    add(tail)
    end = offset + len(tail)
    bounds = zip(starts, [*starts[1:], end], digests)
    return [Unit(f"u{i:07d}", (path,), s, e, d.hexdigest()[:16]) for i, (s, e, d) in enumerate(bounds)]


def parquet_units(fs: pafs.FileSystem, path: str, per_unit: int) -> list[Unit]:
    """Units of ``per_unit`` rows of a Parquet manifest (its footer only is read here); their fingerprint
    is the file's size and modification time (``core.fingerprint.stamp``)."""
    with fs.open_input_file(path) as f:
        rows = pq.ParquetFile(f).metadata.num_rows
    mark = hashlib.sha1(stamp(fs.get_file_info(path)).encode()).hexdigest()[:16]
    return [Unit(f"u{i // per_unit:07d}", (path,), i, min(i + per_unit, rows), mark) for i in range(0, rows, per_unit)]


def _text_entries(fs: pafs.FileSystem, path: str, start: int, stop: int) -> list[str]:
    with fs.open_input_file(path) as f:
        f.seek(start)
        data = f.read(stop - start)
    return [e for e in map(_entry, data.split(b"\n")) if e is not None]


def parquet_column_range(fs: pafs.FileSystem, path: str, column: str, start: int, stop: int) -> list:
    """Rows [start, stop) of one column of a Parquet file, reading only the row groups that hold them
    (a manifest's ``uri`` column, a folder listing's ``path`` column: labeler.listing)."""
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        groups, first, row = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row + n > start and row < stop:
                groups.append(g)
                first = row if first is None else first
            row += n
        if not groups:
            return []
        table = pf.read_row_groups(groups, columns=[column])
    return table.column(column).slice(start - first, stop - start).to_pylist()


def _parquet_entries(fs: pafs.FileSystem, path: str, start: int, stop: int) -> list[str]:
    """Rows [start, stop) of the ``uri`` column, else of the ``path`` column (a file list such as the loop's
    carved validation split, ``pipeline.split``)."""
    with fs.open_input_file(path) as f:
        names = pq.read_schema(f).names
    column = URI_COLUMN if URI_COLUMN in names or PATH_COLUMN not in names else PATH_COLUMN
    return [str(u) for u in parquet_column_range(fs, path, column, start, stop)]


def read_manifest_range(fs: pafs.FileSystem, manifest: str, start: int, stop: int) -> Iterator[pa.Table]:
    """(id, path, bytes, read_error) blocks of the images a manifest range lists, in its order.

    ``fs``/``manifest``: the manifest's filesystem and path in it; relative entries are read
    from the manifest's folder on that filesystem. A file that cannot be read is a row with
    ``read_error`` set (an ``unreadable`` rejection), like in every reader.
    """

    entries = (_parquet_entries if manifest.endswith(".parquet") else _text_entries)(fs, manifest, start, stop)
    folder = manifest.rsplit("/", 1)[0]
    local = pafs.LocalFileSystem()

    def where(entry: str) -> tuple[pafs.FileSystem, str]:
        if is_s3(entry):
            return filesystem_for(entry)  # one S3 filesystem per process (core.storage)
        # local names stay escaped here (valid UTF-8 in the path column); _read_one unescapes them
        return (local, entry) if os.path.isabs(entry) else (fs, join(folder, entry))

    def one(entry: str) -> tuple:
        entry_fs, path = where(entry)
        return (entry, entry if is_s3(entry) else path, *_read_one(entry_fs, path))

    remote = any(map(is_s3, entries)) or not isinstance(fs, pafs.LocalFileSystem)
    with ThreadPoolExecutor(REMOTE_READ_THREADS if remote else 1) as pool:
        yield from blocks(pool.map(one, entries))
