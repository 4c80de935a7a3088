"""WebDataset shards read sample by sample, by the webdataset format's own rules.

A shard is a tar archive named ``.tar``, or compressed as ``.tar.gz`` / ``.tgz``, ``.tar.bz2`` or
``.tar.xz`` (:data:`core.images.SHARD_SUFFIXES`; the webdataset library reads gzip shards too).

Why not ``ray.data.read_webdataset``: it makes one column per member extension, so a sample
whose image is ``left.png``, or a shard mixing ``.jpg`` and ``.png`` samples, cannot be read
as "the image of the sample" (the second case failed whole jobs with a ``TypeError``), and a
shard cut off mid-member fails the whole dataset, taking the good shards with it.

The convention (webdataset's ``base_plus_ext``): a member's *key* is its path up to the first
dot of its base name, its *extension* everything after that dot; consecutive members with one
key form a sample. The image of a sample is its first member whose extension's last part
(``left.png`` -> ``png``), matched case-insensitively, is an image extension. Members without
a key (no dot, or hidden: ``.``-prefixed) are not samples and are skipped, as webdataset does.

Every sample is one row: a sample without an image member is a ``no_image`` row, a shard that
cannot be opened an ``unreadable`` row, and damage (a truncated or corrupt shard) a
``damaged_shard`` row naming the shard, after the rows of every sample read before it.
"""

from __future__ import annotations

import lzma
import tarfile
import zlib
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from core.images import IMAGE_EXTENSIONS, SHARD_SUFFIXES, read_failure
from core.storage import retried, uri_of
from labeler.file_reader import blocks, relative_id

# what reading a damaged shard can raise (tarfile wraps most decompressor errors in ReadError, not all)
DAMAGE_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)


def is_shard(path: str) -> bool:
    """True for a WebDataset shard's name: :data:`core.images.SHARD_SUFFIXES`, any case."""
    return path.lower().endswith(SHARD_SUFFIXES)


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member name by the webdataset convention, or None when the
    member belongs to no sample (no dot in its base name, or a hidden one).

    >>> split_member_name("train/s0001.left.png")
    ('train/s0001', 'left.png')
    """
    name = "/".join(p for p in name.split("/") if p not in ("", "."))  # tar -C dir -cf x.tar . writes ./000.jpg
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or any(p.startswith(".") for p in name.split("/")):
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def is_image_extension(ext: str) -> bool:
    """True when the last part of a member extension names an image format (``left.PNG`` -> png)."""
    return ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def _sample_row(shard_id: str, path: str, key: str, members: list[tuple[str, bytes]]) -> tuple:
    image = next((data for ext, data in members if is_image_extension(ext)), None)
    if image is None:
        exts = ", ".join(ext for ext, _ in members) or "none"
        return (f"{shard_id}/{key}", path, None, read_failure("no_image", f"members: {exts}"))
    return (f"{shard_id}/{key}", path, image, None)


def shard_rows(fs: pafs.FileSystem, root: str, path: str) -> Iterator[tuple]:
    """(id, path, bytes, read_error) rows, one per sample of the shard at ``path``, in order.

    id = ``<shard relative to root>/<key>``; the damage row's id is ``<shard>#damaged``.
    """
    shard_id = relative_id(path, root)
    key, members, ending = None, [], None
    try:
        # tarfile detects compression itself; a fault that passes while opening is retried
        stream = retried("GET", uri_of(fs, path), lambda: fs.open_input_stream(path, compression=None))
    except OSError as err:
        yield (f"{shard_id}#unreadable", path, None, read_failure("unreadable", f"{type(err).__name__}: {err}"))
        return
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                parts = split_member_name(info.name) if info.isfile() else None
                if parts is None:
                    continue
                if parts[0] != key and key is not None:
                    yield _sample_row(shard_id, path, key, members)
                    members = []
                key = parts[0]
                members.append((parts[1], tar.extractfile(info).read()))
            ending = _bad_compressed_ending(tar)  # reads on to the end of the stream: before it is closed
    except DAMAGE_ERRORS as err:
        # the sample being read when the damage was found is lost with the rest of the shard
        detail = f"{shard_id} after {key or 'its start'}: {type(err).__name__}: {err}"
        yield (f"{shard_id}#damaged", path, None, read_failure("damaged_shard", detail))
        return
    if key is not None:
        yield _sample_row(shard_id, path, key, members)
    ending = ending or _bad_ending(fs, path, tar)
    if ending:
        detail = f"{shard_id} after {key or 'its start'}: {ending}"
        yield (f"{shard_id}#damaged", path, None, read_failure("damaged_shard", detail))


def _bad_ending(fs: pafs.FileSystem, path: str, tar: tarfile.TarFile) -> str | None:
    """Why an uncompressed shard that tarfile read to its "end" is in fact cut off or corrupt, or None.

    In stream mode tarfile takes a missing, short or invalid header after the first one for the
    end of the archive; a real end is at least two 512-byte blocks of zeros.
    """
    if getattr(tar.fileobj, "comptype", "tar") != "tar":
        return None  # compressed: checked by _bad_compressed_ending
    size = fs.get_file_info(path).size
    rest = size - tar.offset
    if rest < 2 * tarfile.BLOCKSIZE:
        return f"cut off: {rest} bytes after the last member, not the two zero blocks that end an archive"
    with fs.open_input_file(path) as f:
        f.seek(tar.offset)
        tail = f.read(min(rest, 1 << 20))
    if tail.strip(b"\0"):
        return f"unreadable header at byte {tar.offset} (corrupt, or the end of a cut-off member)"
    return None


def _bad_compressed_ending(tar: tarfile.TarFile) -> str | None:
    """Why a compressed shard that tarfile read to its "end" is in fact cut off or corrupt, or None.

    tarfile's stream mode stops quietly where the decompressed data stops, so a ``.tar.gz`` cut
    between two members reads as a shorter archive (bz2 and xz streams mostly raise). The rest of
    the stream is read here: the decompressor must reach its end-of-stream marker, and the archive
    must end in two 512-byte blocks of zeros (tarfile has read the first block of the end already).
    """
    stream = tar.fileobj  # tarfile's _Stream: decompresses as it reads
    comptype = getattr(stream, "comptype", "tar")
    if comptype == "tar" or not hasattr(stream, "pos"):
        return None  # uncompressed: checked by _bad_ending, which can seek
    after, zeros = stream.pos - tar.offset, True
    try:
        while chunk := stream.read(1 << 16):
            after += len(chunk)
            zeros = zeros and not chunk.strip(b"\0")
    except DAMAGE_ERRORS as err:
        return f"corrupt {comptype} data after the last member: {type(err).__name__}: {err}"
    if not getattr(getattr(stream, "cmp", None), "eof", True):
        return f"cut off: the {comptype} stream ends before its end-of-stream marker"
    if after < 2 * tarfile.BLOCKSIZE:
        return f"cut off: {after} bytes after the last member, not the two zero blocks that end an archive"
    if not zeros:
        return f"unreadable data at byte {tar.offset} of the decompressed archive (corrupt, or a cut-off member)"
    return None


def read_shards(fs: pafs.FileSystem, root: str, paths: list[str]) -> Iterator[pa.Table]:
    """Blocks of sample rows for each shard in ``paths``, in order (a reader for ImageFilesDatasource)."""
    for path in paths:
        yield from blocks(shard_rows(fs, root, path))
