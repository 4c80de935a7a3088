"""Byte-level I/O on local paths and ``s3://`` URIs through pyarrow's filesystems.

Credentials and the endpoint come from the standard AWS chain (environment, profile,
instance role); ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) points at an
S3-compatible store. Nothing here logs credentials.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

S3_SCHEME = "s3://"


def is_s3(uri: str) -> bool:
    """Whether ``uri`` names an S3 object or prefix (``s3://bucket/key``) rather than a local path."""
    return uri.startswith(S3_SCHEME)


logger = logging.getLogger(__name__)

S3_MAX_ATTEMPTS = 5  # attempts of one S3 request in all (the first and 4 retries), here and in the AWS SDK
BACKOFF_S = (0.2, 5.0)  # our retries: the first wait (exponential after it, with jitter up to as much), the longest
# What a failure that may pass looks like in pyarrow's (AWS SDK's) messages: throttling, 5xx, dropped connections
_TRANSIENT = re.compile(
    r"SLOW_DOWN|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|THROTTLING|NETWORK_CONNECTION|REQUEST_TIMEOUT|"
    r"REQUEST_TIME_TOO_SKEWED|HTTP status 5\d\d|HTTP status 429|curlCode"
)
_STATUS_OF_ERROR = {"SLOW_DOWN": "503 SlowDown", "SERVICE_UNAVAILABLE": "503", "INTERNAL_FAILURE": "500 InternalError",
                    "THROTTLING": "503 Throttling", "REQUEST_TIMEOUT": "408"}  # fmt: skip

_retries: Counter = Counter()  # retries this process made, by operation (GET, PUT, HEAD, LIST, DELETE)
_retries_lock = threading.Lock()


class S3RequestFailed(OSError):
    """An S3 request that failed every one of its attempts; the message names bucket, key and HTTP status."""


def retry_counts() -> dict[str, int]:
    """S3 requests this process retried, by operation (``GET``, ``PUT``, ``HEAD``, ``LIST``, ``DELETE``):
    those of this module's whole-object operations and of the boto3 listing; not the AWS SDK's own
    retries under Ray Data and Ray Train, which it does not report."""
    with _retries_lock:
        return dict(_retries)


def count_retries(op: str, n: int) -> None:
    """Add ``n`` retries of ``op`` to :func:`retry_counts` (for clients that retry by themselves, as botocore)."""
    if n:
        with _retries_lock:
            _retries[op] += n


def http_status(err: BaseException) -> str:
    """The HTTP status (and S3 error code, where known) in a pyarrow S3 error, ``connection failed`` for a
    dropped connection, else ``unknown status``."""
    text = str(err)
    if m := re.search(r"HTTP status (\d{3})", text):
        return m.group(1)
    for name, status in _STATUS_OF_ERROR.items():
        if f"AWS Error {name}" in text:
            return status
    return "connection failed" if "NETWORK_CONNECTION" in text or "curlCode" in text else "unknown status"


def is_transient(err: BaseException) -> bool:
    """Whether a storage error may pass on its own (throttling, a 5xx, a dropped connection): worth a retry."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    return isinstance(err, OSError) and bool(_TRANSIENT.search(str(err)))


def retried(op: str, uri: str, call: Callable):
    """``call()``, retried on transient errors (:func:`is_transient`) up to :data:`S3_MAX_ATTEMPTS` attempts with
    exponential backoff and jitter; each retry counted (:func:`retry_counts`) and logged. Local paths: called once.

    tenacity does the waiting and the bounding; the AWS SDK's own retries cannot be used here, since it does
    not report them (and pyarrow 26 reports a CompleteMultipartUpload retried after a 503 as failed).

    Raises:
        S3RequestFailed: the last attempt failed too (bucket, key, status and attempts named).
    """
    if not is_s3(uri):
        return call()
    import tenacity

    def note(state: tenacity.RetryCallState) -> None:
        err = state.outcome.exception()
        count_retries(op, 1)
        logger.warning(
            f"S3 {op} {uri}: HTTP {http_status(err)}; retry {state.attempt_number} of {S3_MAX_ATTEMPTS - 1} "
            f"in {state.next_action.sleep:.1f} s ({err})"
        )

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(S3_MAX_ATTEMPTS),
        wait=tenacity.wait_exponential_jitter(initial=BACKOFF_S[0], max=BACKOFF_S[1], jitter=BACKOFF_S[0]),
        retry=tenacity.retry_if_exception(is_transient),
        before_sleep=note,
        reraise=True,
    )
    try:
        return retrying(call)
    except OSError as err:
        if not is_transient(err):
            raise
        bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
        raise S3RequestFailed(
            f"S3 {op} failed {S3_MAX_ATTEMPTS} times for bucket '{bucket}', key '{key}': HTTP {http_status(err)} "
            f"(last error: {err})"
        ) from err


@functools.lru_cache(maxsize=8)
def _s3_filesystem(
    endpoint: str | None, region: str | None, profile: str | None, sdk_retries: bool = True
) -> pafs.S3FileSystem:
    """One S3 filesystem per process and setting: building one per read costs a credential lookup
    (and, on an instance role, a metadata request) each time. Keyed by what selects the store and
    the credentials, never by the credentials themselves. ``sdk_retries``: the AWS SDK retries a failed
    request (:data:`S3_MAX_ATTEMPTS` attempts, exponential backoff); without, it fails at once, for
    :func:`retried` to retry and count."""
    kwargs = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS if sdk_retries else 1)}
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


def _counted_filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """As :func:`filesystem_for`, but an S3 filesystem that does not retry by itself: for :func:`retried`."""
    if is_s3(uri):
        endpoint, region = s3_endpoint_and_region()
        return _s3_filesystem(endpoint, region, os.environ.get("AWS_PROFILE"), False), uri[len(S3_SCHEME) :]
    return filesystem_for(uri)


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
    fs, path = _counted_filesystem_for(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    try:
        return retried("GET", uri, read)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{uri} does not exist") from err


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to a local file (parent folders created) or an ``s3://`` object, replacing it."""
    fs, path = _counted_filesystem_for(uri)
    parent = path.rsplit("/", 1)[0]

    def write() -> None:
        if parent:
            fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)

    retried("PUT", uri, write)


def exists(uri: str) -> bool:
    """Whether a file, folder or object (or, on S3, any object under the prefix) is at ``uri``."""
    fs, path = _counted_filesystem_for(uri)
    return retried("HEAD", uri, lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)


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
    counted, _ = _counted_filesystem_for(uri)
    return fs, retried("LIST", uri, lambda: _list_files(counted, root, suffix))


def _list_files(fs: pafs.FileSystem, root: str, suffix: str | None) -> list[str]:
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        paths = [root]
    elif isinstance(fs, pafs.LocalFileSystem):
        paths = sorted(_walk_local(root))
    else:
        listed = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        base = len(root.rstrip("/")) + 1
        paths = sorted(i.path for i in listed if i.is_file and not is_hidden(i.path[base:]))
    return [p for p in paths if suffix is None or p.endswith(suffix)]


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
    fs, path = _counted_filesystem_for(uri)

    def delete() -> None:
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)

    retried("DELETE", uri, delete)


def delete_tree(uri: str) -> None:
    """Remove a folder (or prefix) and everything under it; nothing there is fine."""
    fs, path = _counted_filesystem_for(uri)

    def delete() -> None:
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)

    retried("DELETE", uri, delete)


def list_dirs(uri: str) -> list[str]:
    """Names of the folders directly under ``uri``, sorted."""
    fs, root = _counted_filesystem_for(uri)

    def dirs() -> list[str]:
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            return []
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    return retried("LIST", uri, dirs)


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
