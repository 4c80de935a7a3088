"""Byte-level I/O on local paths and ``s3://`` URIs through pyarrow's filesystems.

Credentials and the endpoint come from the standard AWS chain (environment, profile,
instance role); ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) points at an
S3-compatible store. Nothing here logs credentials.
"""

from __future__ import annotations

import json
import os

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a local path or an s3:// URI."""
    if is_s3(uri):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {}
        if endpoint:
            kwargs["endpoint_override"] = endpoint
            kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), uri[len("s3://") :]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem_for(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{uri} does not exist") from err


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem_for(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def exists(uri: str) -> bool:
    fs, path = filesystem_for(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, suffix: str | None = None) -> tuple[pafs.FileSystem, list[str]]:
    """(filesystem, sorted file paths) under ``uri``: recursive for a folder, ``[uri]`` for a file,
    ``[]`` when nothing is there. ``suffix`` keeps only names ending with it."""
    fs, root = filesystem_for(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return fs, []
    if info.type == pafs.FileType.File:
        paths = [root]
    else:
        paths = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.is_file)
    return fs, [p for p in paths if suffix is None or p.endswith(suffix)]


def join(uri: str, *parts: str) -> str:
    """``uri/part/...`` for local paths and URIs alike (os.path.join would mangle ``s3://``)."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def absolute(uri: str) -> str:
    """Local paths made absolute (Ray workers run elsewhere); URIs unchanged."""
    return uri if "://" in uri else os.path.abspath(uri)


def read_json(uri: str):
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj) -> None:
    write_bytes(uri, json.dumps(obj, indent=2).encode())


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
