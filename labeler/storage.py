"""Byte-level I/O on local paths and ``s3://`` URIs through pyarrow's filesystems.

Credentials and the endpoint come from the standard AWS chain (environment, profile,
instance role); ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) points at an
S3-compatible store. Nothing here logs credentials.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

S3_SCHEME = "s3://"


def is_s3(uri: str) -> bool:
    """Whether ``uri`` names an S3 object or prefix (``s3://bucket/key``) rather than a local path."""
    return uri.startswith(S3_SCHEME)


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None, profile: str | None) -> pafs.S3FileSystem:
    """One S3 filesystem per process and setting: building one per read costs a credential lookup
    (and, on an instance role, a metadata request) each time. Keyed by what selects the store and
    the credentials, never by the credentials themselves."""
    kwargs = {}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def s3_endpoint_and_region() -> tuple[str | None, str | None]:
    """The S3 endpoint (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``) and region (``AWS_REGION`` or
    ``AWS_DEFAULT_REGION``) every S3 client of the project uses; None where unset (the AWS defaults)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return endpoint or None, region or None


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an ``s3://`` URI.

    The path inside an S3 filesystem is ``bucket/key`` (pyarrow's form, without the scheme);
    :func:`uri_of` turns it back into a URI. S3 filesystems are shared within a process (one per
    endpoint, region and profile, as read from ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``,
    ``AWS_REGION``/``AWS_DEFAULT_REGION`` and ``AWS_PROFILE``); local paths come back absolute.
    """
    if is_s3(uri):
        return _s3_filesystem(*s3_endpoint_and_region(), os.environ.get("AWS_PROFILE")), uri[len(S3_SCHEME) :]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def uri_of(fs: pafs.FileSystem, path: str) -> str:
    """The URI of ``path`` inside ``fs`` (the inverse of :func:`filesystem_for`): ``s3://bucket/key``
    on S3, so a stored path is never mistaken for a relative local one; local paths unchanged."""
    if fs.type_name == "s3" and not is_s3(path):
        return S3_SCHEME + path
    return path


_ESCAPED_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")


def escape_name(name: str) -> str:
    """A local file name as valid UTF-8 text: bytes that are not UTF-8 (Python holds them as
    ``surrogateescape`` surrogates) are written ``\\xNN``, as ``repr`` shows them, so ids, paths
    and Parquet strings stay valid. :func:`local_path` reverses it. (Ambiguous only for a name
    that already holds the literal text ``\\x80``..``\\xff``.)"""
    if not any("\udc80" <= ch <= "\udcff" for ch in name):
        return name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def local_path(path: str) -> str:
    """The operating-system path of a local path that :func:`escape_name` may have escaped."""
    if "\\x" not in path:
        return path
    return _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), path)


def read_bytes(uri: str) -> bytes:
    """Every byte of a local file or an ``s3://`` object.

    Raises:
        FileNotFoundError: naming ``uri`` when nothing is there.
    """
    if not is_s3(uri):  # Python's open: pyarrow cannot open names that are not UTF-8
        try:
            with open(local_path(os.path.abspath(uri)), "rb") as f:
                return f.read()
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{uri} does not exist") from err
    fs, path = filesystem_for(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{uri} does not exist") from err


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to a local file (parent folders created) or an ``s3://`` object, replacing it."""
    fs, path = filesystem_for(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def exists(uri: str) -> bool:
    """Whether a file, folder or object (or, on S3, any object under the prefix) is at ``uri``."""
    fs, path = filesystem_for(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_hidden(relative: str) -> bool:
    """True for a path (relative to a corpus root) with a hidden part: a file or folder whose
    name starts with ``.`` (``.ipynb_checkpoints/``, ``.DS_Store``, ``._photo.jpg``). Hidden
    entries are neither images nor classes in any reader."""
    return any(part.startswith(".") for part in relative.split("/"))


def _walk_local(root: str) -> list[str]:
    """Files under a local folder, hidden ones left out (not descended into), names escaped
    with :func:`escape_name`. Python's walk rather than pyarrow's listing, which fails the
    whole listing on one file name that is not UTF-8."""
    paths, seen = [], set()

    def fail(err: OSError) -> None:  # a folder that cannot be listed is an error, not a silent gap
        raise PermissionError(f"cannot list {err.filename}: {err.strerror}") from err

    for folder, dirs, files in os.walk(root, followlinks=True, onerror=fail):
        real = os.path.realpath(folder)
        if real in seen:  # a symbolic link back to a folder already listed: no loop, no duplicates
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        paths += [escape_name(os.path.join(folder, f)) for f in files if not f.startswith(".")]
    return paths


def list_files(uri: str, suffix: str | None = None) -> tuple[pafs.FileSystem, list[str]]:
    """(filesystem, sorted file paths) under ``uri``: recursive for a folder, ``[uri]`` for a file,
    ``[]`` when nothing is there. ``suffix`` keeps only names ending with it. Hidden files and
    folders (:func:`is_hidden`) are left out; local names that are not UTF-8 come escaped
    (:func:`escape_name`; :func:`read_bytes` and the labeler's reader open them)."""
    fs, root = filesystem_for(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return fs, []
    if info.type == pafs.FileType.File:
        paths = [root]
    elif isinstance(fs, pafs.LocalFileSystem):
        paths = sorted(_walk_local(root))
    else:
        listed = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        base = len(root.rstrip("/")) + 1
        paths = sorted(i.path for i in listed if i.is_file and not is_hidden(i.path[base:]))
    return fs, [p for p in paths if suffix is None or p.endswith(suffix)]


def join(uri: str, *parts: str) -> str:
    """``uri/part/...`` for local paths and URIs alike (os.path.join would mangle ``s3://``)."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def absolute(uri: str) -> str:
    """Local paths made absolute (Ray workers run elsewhere); URIs unchanged."""
    return uri if "://" in uri else os.path.abspath(uri)


def canonical(uri: str) -> str:
    """One spelling of a location, for records that compare them: local paths absolute, no trailing ``/``
    (``s3://b/c/`` and ``s3://b/c`` are the same prefix)."""
    return absolute(uri).rstrip("/") or "/"


def read_json(uri: str):
    """The JSON value in a local file or ``s3://`` object.

    Raises:
        FileNotFoundError: nothing at ``uri``. json.JSONDecodeError: not JSON.
    """
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj) -> None:
    """``obj`` as indented JSON at ``uri`` (local or ``s3://``)."""
    write_bytes(uri, json.dumps(obj, indent=2).encode())


def delete_file(uri: str) -> None:
    """Remove one file (or object); nothing there is fine."""
    fs, path = filesystem_for(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def delete_tree(uri: str) -> None:
    """Remove a folder (or prefix) and everything under it; nothing there is fine."""
    fs, path = filesystem_for(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def list_dirs(uri: str) -> list[str]:
    """Names of the folders directly under ``uri``, sorted."""
    fs, root = filesystem_for(uri)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def iter_tables(
    fs: pafs.FileSystem, path: str, batch_rows: int, columns: list[str] | None = None
) -> Iterator[pa.Table]:
    """One Parquet file as tables of at most ``batch_rows`` rows (``columns`` only, when given), opened
    without pre-buffering: memory stays at about one record batch whatever the file's size. A file
    without rows gives one empty table, so every file gives its reader at least one."""
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle, pre_buffer=False)
        if parquet.metadata.num_rows == 0:
            empty = parquet.schema_arrow.empty_table()
            yield empty.select(columns) if columns else empty
        for batch in parquet.iter_batches(batch_rows, columns=columns):
            yield pa.Table.from_batches([batch])
