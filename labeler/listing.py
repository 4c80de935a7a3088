"""Folder listings that stream: a corpus of loose files listed without one Python list of its paths.

:func:`iter_files` yields a folder's files one at a time, in sorted path order (the order
``core.storage.list_files`` sorts into), holding one folder's entries (local) or one page of
1,000 keys (S3) at a time. :func:`write_listing` streams it into a Parquet listing (one ``path``
column: each file's path relative to the corpus root, row groups of :data:`ROW_GROUP` rows),
written to a temporary name and then renamed, and cuts it into units of ``files_per_unit`` rows
as it goes: the driver holds a row group and one :class:`labeler.units.Unit` per unit (offsets
and a digest of its paths), never every path. Each read task reads its own row range
(:func:`read_listing_range`), so ids (paths relative to the root) and the ``path`` column are
exactly those of the listed-in-memory reader.

A unit's identity includes the digest of the paths it holds, so when files are added to or
removed from the corpus between runs, every unit whose range now holds other files is redone on
resume, never wrongly skipped.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from core.fingerprint import stamp
from core.storage import (
    S3_MAX_ATTEMPTS,
    S3RequestFailed,
    count_retries,
    escape_name,
    filesystem_for,
    is_hidden,
    s3_endpoint_and_region,
)
from labeler.file_reader import read_files
from labeler.manifest import parquet_column_range
from labeler.units import Unit

PATH_COLUMN = "path"
ROW_GROUP = 16_384  # rows per Parquet row group: what the writer and each reader hold at once
S3_PAGE = 1000  # keys per list_objects_v2 page (S3's maximum)


def iter_entries(fs: pafs.FileSystem, root: str) -> Iterator[tuple[str, str]]:
    """Files under the folder ``root`` of ``fs`` (as :func:`core.storage.filesystem_for` gives),
    one ``(path, stamp)`` at a time, in sorted order (code point order of the whole path, which is S3's
    key order too). ``stamp`` is ``size:mtime`` (nanoseconds) locally and ``size:ETag`` on S3: what
    changes when a file is rewritten (``core.fingerprint``). Hidden files and folders (names starting
    with ``.``) are left out and not descended into; local names that are not UTF-8 come escaped
    (:func:`core.storage.escape_name`); a symbolic link to a folder already listed (a loop, or a
    second name) is not listed again.

    Raises:
        PermissionError: a local folder that cannot be listed (not a silent gap).
    """
    if isinstance(fs, pafs.LocalFileSystem):
        yield from _iter_local(root, set())
    else:
        yield from _iter_s3(root)


def iter_files(fs: pafs.FileSystem, root: str) -> Iterator[str]:
    """The paths of :func:`iter_entries`, one at a time."""
    return (path for path, _ in iter_entries(fs, root))


def _iter_local(folder: str, seen: set[str]) -> Iterator[tuple[str, str]]:
    # our own recursion rather than os.walk: os.walk lists a folder's entries in the order the
    # operating system returns them, and sorting after it would need every path in memory
    real = os.path.realpath(folder)
    if real in seen:
        return
    seen.add(real)
    try:
        with os.scandir(folder) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=True), e) for e in it if not e.name.startswith(".")]
    except OSError as err:
        raise PermissionError(f"cannot list {folder}: {err.strerror}; fix its permissions or leave it out") from err
    # a folder sorts as "name/": then visiting entries in this order yields whole paths in sorted order
    entries.sort(key=lambda e: escape_name(e[0]) + ("/" if e[1] else ""))  # the DirEntry never ties
    for name, is_dir, entry in entries:
        path = os.path.join(folder, name)
        if is_dir:
            yield from _iter_local(path, seen)
        else:
            yield escape_name(path), _stamp_of(entry)


def _s3_client():
    """A boto3 S3 client with the endpoint and region :func:`core.storage.filesystem_for` uses
    (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``);
    credentials from the standard AWS chain."""
    import boto3
    from botocore.config import Config

    endpoint, region = s3_endpoint_and_region()
    # botocore's standard mode: exponential backoff with jitter, the attempts of core.storage's own retries
    retries = Config(retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS})
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=retries)


def _stamp_of(entry: os.DirEntry) -> str:
    try:
        return stamp(entry.stat(follow_symlinks=True))
    except OSError:  # a dangling link, or gone since: listed all the same, read as unreadable
        return "missing"


def _iter_s3(root: str) -> Iterator[tuple[str, str]]:
    # boto3's paginator rather than pyarrow's FileSelector: pyarrow returns the whole recursive
    # listing as one list; list_objects_v2 pages come in key order, 1,000 keys at a time
    bucket, _, prefix = root.strip("/").partition("/")
    prefix = prefix + "/" if prefix else ""
    pages = (
        _s3_client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": S3_PAGE})
    )
    for page in _pages(pages, bucket, prefix):
        for obj in page.get("Contents", []):
            relative = obj["Key"][len(prefix) :]
            if relative and not relative.endswith("/") and not is_hidden(relative):  # "x/": a folder marker
                yield f"{bucket}/{obj['Key']}", f"{obj.get('Size')}:{obj.get('ETag', '')}"


def _pages(pages: Iterable[dict], bucket: str, prefix: str) -> Iterator[dict]:
    """``pages`` with the retries botocore made for each counted (``core.storage.retry_counts``); a page
    that failed every attempt raises :class:`core.storage.S3RequestFailed` naming bucket, prefix and status."""
    from botocore.exceptions import BotoCoreError, ClientError

    it = iter(pages)
    while True:
        try:
            page = next(it)
        except StopIteration:
            return
        except (BotoCoreError, ClientError) as err:
            meta = getattr(err, "response", {}).get("ResponseMetadata", {})
            count_retries("LIST", meta.get("RetryAttempts", 0))
            status = meta.get("HTTPStatusCode")
            code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
            raise S3RequestFailed(
                f"S3 LIST failed for bucket '{bucket}', key prefix '{prefix}': "
                f"HTTP {f'{status} {code}'.strip() if status else 'connection failed'} ({err})"
            ) from err
        count_retries("LIST", page.get("ResponseMetadata", {}).get("RetryAttempts", 0))
        yield page


@dataclass(frozen=True)
class Listing:
    """A written listing: where it is, how many files it holds, and its units."""

    uri: str
    rows: int
    units: list[Unit]


def write_listing(root: str, paths: Iterable[str | tuple[str, str]], uri: str, files_per_unit: int) -> Listing:
    """Stream ``paths`` (under the corpus folder ``root``, in order; each a path, or a ``(path, stamp)``
    of :func:`iter_entries`) into a Parquet listing at ``uri`` (local path or s3:// URI; written under a
    temporary name, then renamed, so a listing is never seen half-written) and cut it into units of
    ``files_per_unit`` rows, keyed ``u0000000``.. in order. Memory: one row group of paths and a Unit per
    unit. Each unit's ``fingerprint`` is a SHA-1 of its relative paths and their stamps, so
    :attr:`Unit.identity` changes when the files in its range do, or are rewritten."""
    fs, path = filesystem_for(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    base = len(root.rstrip("/")) + 1
    schema = pa.schema([(PATH_COLUMN, pa.string())])
    units: list[Unit] = []
    rows, digest, span = 0, hashlib.sha1(), ["", ""]  # span: the unit's first and last file, for messages

    def close_unit() -> None:
        start = len(units) * files_per_unit
        label = f"files {span[0]} .. {span[1]}"
        units.append(Unit(f"u{len(units):07d}", (uri,), start, rows, digest.hexdigest()[:16], label))

    temporary = f"{path}.{os.getpid()}.tmp"  # per process: two listings of one corpus do not collide
    with fs.open_output_stream(temporary) as out, pq.ParquetWriter(out, schema) as writer:
        for group in _batched(paths, ROW_GROUP):
            entries = [(p, "") if isinstance(p, str) else p for p in group]
            relative = [p[base:] for p, _ in entries]
            for name, (_, mark) in zip(relative, entries):
                digest.update(name.encode("utf-8", "surrogateescape") + (f"\0{mark}" if mark else "").encode() + b"\n")
                span[0], span[1] = (name if rows % files_per_unit == 0 else span[0]), name
                rows += 1
                if rows % files_per_unit == 0:
                    close_unit()
                    digest = hashlib.sha1()
            writer.write_table(pa.table({PATH_COLUMN: relative}, schema=schema), row_group_size=ROW_GROUP)
    if rows % files_per_unit:
        close_unit()
    fs.move(temporary, path)
    return Listing(uri, rows, units)


def _batched(items: Iterable, n: int) -> Iterator[list]:
    # itertools.batched is Python 3.12+; this project supports 3.10
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def listing_entries(uri: str, start: int, stop: int) -> list[str]:
    """Rows [start, stop) of a listing's ``path`` column, reading only the row groups that hold them."""
    fs, path = filesystem_for(uri)
    return parquet_column_range(fs, path, PATH_COLUMN, start, stop)


def read_listing_range(fs: pafs.FileSystem, root: str, start: int, stop: int, listing: str) -> Iterator[pa.Table]:
    """(id, path, bytes, read_error) blocks of the files in rows [start, stop) of ``listing``, read from
    the corpus folder ``root`` of ``fs``; the same rows :func:`labeler.file_reader.read_files` gives
    for those paths (id = path relative to ``root``)."""
    prefix = root.rstrip("/") + "/"
    yield from read_files(fs, root, [prefix + e for e in listing_entries(listing, start, stop)])


def listing_reader(listing: str):
    """The unit reader (``labeler.units.Reader``) of a listing written at ``listing``."""
    return functools.partial(read_listing_range, listing=listing)
