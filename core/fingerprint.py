"""Fingerprints of inputs: an output is reused only when the inputs that made it are provably the same.

A finished output (a labeling job's predictions, a stage of the Noisy Student loop) records what made
it: the fingerprints below plus the settings that change its rows. A later run compares that record
with what it would use now, and a difference stops it with :class:`OutputMismatch`, naming what changed
and how to start fresh, instead of keeping rows another model or another corpus made.

What a fingerprint covers, and what it does not:

* a file tree (a labeled set, an evaluation set): every file's path, size and modification time
  (on S3: its LastModified), not its bytes (reading a 100 TB corpus to hash it is no option);
* a checkpoint: the SHA-256 of its weights file's bytes (a folder's ``model.json`` is compared by its
  fields, or hashed too where the loop records a supplied teacher);
* a corpus being labeled: per unit (``labeler.units``), the paths with sizes and modification times
  or ETags of its files; for a text manifest, the bytes of its lines; for a Parquet manifest, the file's
  size and modification time. The images a manifest names are not looked at: an image replaced in place
  under the same name is not noticed there.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Iterator

import pyarrow.fs as pafs

from core.storage import _walk_local, filesystem_for, is_hidden, local_path

__all__ = ["OutputMismatch", "differences", "file_sha256", "stamp", "tree_fingerprint", "record_digest"]

CHUNK = 8 << 20


class OutputMismatch(ValueError):
    """An existing output was made from other inputs than this run's; the message says what changed
    and how to start fresh (another output location, or the overwrite option)."""


def file_sha256(uri: str) -> str:
    """SHA-256 (hex) of a local file's or ``s3://`` object's bytes, read in 8 MB chunks; remembered in
    this process while the file's size and modification time stay the same (a check before a job and
    the job itself read a large checkpoint once).

    Raises:
        FileNotFoundError: nothing at ``uri``.
    """
    fs, path = filesystem_for(uri)
    info = fs.get_file_info(path)
    if not info.is_file:
        raise FileNotFoundError(f"{uri} does not exist")
    return _sha256(uri, stamp(info))


@functools.lru_cache(maxsize=32)
def _sha256(uri: str, mark: str) -> str:
    fs, path = filesystem_for(uri)
    digest = hashlib.sha256()
    try:
        with fs.open_input_stream(path) as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{uri} does not exist") from err
    return digest.hexdigest()


def stamp(info: pafs.FileInfo | os.stat_result) -> str:
    """``size:mtime`` of a listed file: what changes when the file is rewritten (nanoseconds locally)."""
    if isinstance(info, os.stat_result):
        return f"{info.st_size}:{info.st_mtime_ns}"
    mtime = info.mtime_ns if info.mtime_ns is not None else ""
    return f"{info.size}:{mtime}"


def _tree_entries(uri: str) -> Iterator[tuple[str, str]]:
    """(path relative to ``uri``, :func:`stamp`) of every file under it, hidden ones left out, sorted."""
    fs, root = filesystem_for(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist")
    if info.type == pafs.FileType.File:
        yield root.rsplit("/", 1)[-1], stamp(info)
        return
    base = len(root.rstrip("/")) + 1
    if isinstance(fs, pafs.LocalFileSystem):
        for path in sorted(_walk_local(root)):
            yield path[base:], stamp(os.stat(local_path(path)))
        return
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    for i in sorted((i for i in infos if i.is_file and not is_hidden(i.path[base:])), key=lambda i: i.path):
        yield i.path[base:], stamp(i)


def tree_fingerprint(uri: str) -> dict:
    """``{"files": n, "sha256": digest}`` of the files under a folder (or of one file), from their paths,
    sizes and modification times: the same for an unchanged set wherever it is read from.

    Raises:
        FileNotFoundError: nothing at ``uri``.
    """
    digest, n = hashlib.sha256(), 0
    for relative, mark in _tree_entries(uri):
        digest.update(f"{relative}\0{mark}\n".encode("utf-8", "surrogateescape"))
        n += 1
    return {"files": n, "sha256": digest.hexdigest()}


def record_digest(record: dict) -> str:
    """A short SHA-256 of a record (a JSON-able dict; key order does not matter)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _flat(value, prefix: str = "") -> Iterable[tuple[str, object]]:
    if isinstance(value, dict):
        for key in sorted(value):
            yield from _flat(value[key], f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), value


def differences(old: dict, new: dict, limit: int = 8) -> list[str]:
    """``key: old -> new`` for each leaf that differs between two records (nested keys dotted), at most
    ``limit`` of them and a count of the rest."""
    a, b = dict(_flat(old)), dict(_flat(new))
    changed = [f"{k}: {_short(a.get(k, '(none)'))} -> {_short(b.get(k, '(none)'))}" for k in sorted(set(a) | set(b))
               if a.get(k, "(none)") != b.get(k, "(none)")]  # fmt: skip
    return changed[:limit] + ([f"... and {len(changed) - limit} more"] if len(changed) > limit else [])


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."
