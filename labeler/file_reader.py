"""Reading image files into blocks of (id, path, bytes, read_error) rows (for :mod:`labeler.units`).

Why not ``ray.data.read_binary_files``: it builds a block per file and costs about 0.25 ms
of CPU per small file on the development machine, 25 times the read itself, and one
unreadable file (permission denied, deleted after the listing) fails the whole job. Here a
read task reads a list of files into a few large blocks; a file that cannot be read becomes a row
with ``read_error`` set, which the decode stage turns into an ``unreadable`` rejection.
Remote files (S3) are fetched by a small thread pool per task, since each GET is latency-bound.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs

from core.images import read_failure
from core.storage import local_path, read_bytes, uri_of

SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("bytes", pa.binary()), ("read_error", pa.string())])
REMOTE_READ_THREADS = 16
MAX_BLOCK_BYTES = 64 * 1024 * 1024


def relative_id(path: str, root: str) -> str:
    """An image's stable id: its path relative to the corpus root."""
    root = root.rstrip("/") + "/"
    return path[len(root) :] if path.startswith(root) else path.rsplit("/", 1)[-1]


def _read_one(fs: pafs.FileSystem, path: str) -> tuple[bytes | None, str | None]:
    """The file's bytes, or its ``unreadable`` reason. An S3 GET that fails for a moment (a 5xx, a connection
    reset in the middle of the body, which the AWS SDK does not retry) is read again whole, at most
    ``S3_MAX_ATTEMPTS`` times in all (``core.storage.read_bytes``): a storage fault that passes must not
    become an unreadable image."""
    try:
        if isinstance(fs, pafs.LocalFileSystem):  # Python's open: names may be escaped non-UTF-8 bytes
            with open(local_path(path), "rb") as f:
                return f.read(), None
        return read_bytes(uri_of(fs, path)), None
    except OSError as err:
        return None, read_failure("unreadable", f"{type(err).__name__}: {err}")


def read_files(fs: pafs.FileSystem, root: str, paths: list[str], max_block_bytes: int = MAX_BLOCK_BYTES):
    """Blocks with a row per file, in the order given, each at most about ``max_block_bytes`` of
    image bytes (so a task of large images does not build one huge block); failures are rows too."""
    if isinstance(fs, pafs.LocalFileSystem):
        results: Iterable = (_read_one(fs, p) for p in paths)
        yield from blocks(((relative_id(p, root), p, *r) for p, r in zip(paths, results)), max_block_bytes)
        return
    with ThreadPoolExecutor(REMOTE_READ_THREADS) as pool:
        results = pool.map(lambda p: _read_one(fs, p), paths)
        yield from blocks(((relative_id(p, root), p, *r) for p, r in zip(paths, results)), max_block_bytes)


def blocks(rows: Iterable[tuple], max_block_bytes: int = MAX_BLOCK_BYTES) -> Iterator[pa.Table]:
    """(id, path, bytes, read_error) rows -> :data:`SCHEMA` tables of about ``max_block_bytes`` each."""
    batch, size = [], 0
    for row in rows:
        batch.append(row)
        size += len(row[2] or b"")
        if size >= max_block_bytes:
            yield _table(batch)
            batch, size = [], 0
    if batch:
        yield _table(batch)


def _table(rows: list[tuple]) -> pa.Table:
    return pa.table([list(column) for column in zip(*rows)], schema=SCHEMA)
