"""Corpus readers: every format becomes rows of (id, path, bytes, read_error, unit) for the decode stage.

Formats, each a local path or an s3:// URI:

* ``folder``: an image folder tree, read recursively; id = path relative to the root; listed as
  a stream into a Parquet listing (:mod:`labeler.listing`), never one list in the driver;
* ``parquet``: Parquet files with an image-bytes column (plain binary, or a struct with a
  ``bytes`` field as Hugging Face datasets write it) and an optional id column; without
  one (or where its value is null), id = ``<file relative to root>#<row index>``, the row's
  position in its file (distinct and stable, also for rows holding the same bytes). Every
  file's schema is checked from its footer before the job (:func:`check_parquet_inputs`);
  a file that fails part-way is still a row per row its footer counts;
* ``manifest``: a ``.txt`` file of image URIs, one per line, or a ``.parquet`` file with a
  ``uri`` column (:mod:`labeler.manifest`); id = the URI as written;
* ``webdataset``: shards named ``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.bz2`` or ``.tar.xz``;
  id = ``<shard relative to root>/<key>``; read by :mod:`labeler.tar_reader` (webdataset's key
  and extension rules, damaged shards as rows).

Hidden files and folders (names starting with ``.``) are skipped by every reader. A Parquet or
WebDataset corpus may hold other files (a README, ``dataset_info.json``): they are skipped with a
warning counting them by extension. With ``format: auto``, files that another format reads
(images beside shards, shards beside Parquet files) are refused before the job instead: which of
them is the corpus is then the user's choice (``--format``), not a guess.

Nothing is decoded here: decoding happens per image in the decode stage so one bad
image is one rejection, never a failed block.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from core.fingerprint import stamp
from core.images import IMAGE_EXTENSIONS, SHARD_SUFFIXES, image_bytes, read_failure
from core.storage import absolute, filesystem_for, retried, uri_of
from labeler.file_reader import SCHEMA, blocks, read_files, relative_id
from labeler.listing import iter_entries, listing_reader, write_listing
from labeler.manifest import is_manifest, parquet_units, read_manifest_range, text_units
from labeler.options import LabelOptions
from labeler.tar_reader import is_shard, read_shards
from labeler.units import UNIT_COLUMN, Reader, Unit, UnitsDatasource, make_units

FORMATS = ("auto", "folder", "parquet", "webdataset", "manifest")
FILES_PER_BLOCK = 1000
SNIFF_FILES = 10_000  # files listed before the format is decided (format: auto)
FOOTER_THREADS = 16  # Parquet footers read at once when checking a remote corpus's schemas
PARQUET_SUFFIX = ".parquet"
# how the labeler command line and a noisy-student config spell the options named in errors
OPTION_NAMES = {
    "format": "--format (labeler command line) or label.format (noisy-student config)",
    "image_column": "--image-column (labeler command line) or label.image_column (noisy-student config)",
    "id_column": "--id-column (labeler command line) or label.id_column (noisy-student config)",
}
logger = logging.getLogger(__name__)


def detect_format(source: str) -> str:
    """Guess the format from the file extensions among the first :data:`SNIFF_FILES` files under
    ``source`` in listing order (pass a format to skip this); the corpus is not listed whole."""
    _, _, _, files = _stream(source)
    return _format_of(source, [path for path, _ in itertools.islice(files, SNIFF_FILES)])


def _stream(source: str) -> tuple[pafs.FileSystem, str, bool, Iterator[tuple[str, str]]]:
    """(filesystem, root, whether it is a folder, its files one ``(path, stamp)`` at a time in sorted
    order: ``labeler.listing.iter_entries``, whose stamps fingerprint the units)."""
    fs, root = filesystem_for(source)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {source} does not exist; check the path (or s3:// URI and credentials)")
    if info.type == pafs.FileType.File:
        return fs, root, False, iter([(root, stamp(info))])
    return fs, root, True, iter_entries(fs, root)


def suffix_of(path: str) -> str:
    """A file's format suffix, lower case: a shard's compound one (``.tar.gz``), else its last one
    (``.json``), else ``""``."""
    name = path.rsplit("/", 1)[-1].lower()
    compound = next((s for s in SHARD_SUFFIXES if name.endswith(s) and len(name) > len(s)), None)
    if compound:
        return compound
    return "." + name.rsplit(".", 1)[1] if "." in name.lstrip(".") else ""


def is_parquet(path: str) -> bool:
    return path.lower().endswith(PARQUET_SUFFIX)


# tar archives compressed in ways Python's tarfile cannot read (3.10-3.13): refused, never read as images
UNREADABLE_SHARDS = (".tar.zst", ".tar.zstd", ".tar.lz4", ".tzst")


def _format_of(source: str, names: list[str]) -> str:
    exts = {suffix_of(n) for n in names}
    unreadable = next((n for n in names if n.lower().endswith(UNREADABLE_SHARDS)), None)
    if unreadable:
        raise ValueError(
            f"input {source} holds tar shards compressed with zstd or lz4 (e.g. {unreadable}), which this labeler "
            "cannot read; decompress them (zstd -d) or recompress with gzip (.tar.gz)"
        )
    if PARQUET_SUFFIX in exts:
        return "parquet"
    if exts & set(SHARD_SUFFIXES):
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


def _is_bytes(t: pa.DataType) -> bool:
    view = getattr(pa.types, "is_binary_view", lambda _: False)
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or view(t)


def image_column_problem(schema: pa.Schema, column: str) -> str | None:
    """Why ``column`` of ``schema`` cannot be read as image bytes, or None when it can: binary or
    large_binary, or a struct with a binary ``bytes`` field (Hugging Face's ``Image`` feature)."""
    if column not in schema.names:
        return f"has no image column {column!r}"
    t = schema.field(schema.names.index(column)).type
    if _is_bytes(t) or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_bytes(t.field("bytes").type)):
        return None
    return (
        f"has an image column {column!r} of type {t}, which holds no image bytes (binary or large_binary, or a "
        "struct with a binary 'bytes' field as Hugging Face writes)"
    )


def _columns_text(schema: pa.Schema, most: int = 20) -> str:
    shown = ", ".join(f"{f.name} ({f.type})" for f in list(schema)[:most])
    return shown + (f", and {len(schema) - most} more" if len(schema) > most else "")


def _schema_problem(fs: pafs.FileSystem, path: str, image_column: str, id_column: str | None) -> tuple | None:
    """(problem text, options that fix it) for one Parquet file, ("footer", error) when its footer
    cannot be read, or None."""
    try:
        with fs.open_input_file(path) as f:
            schema = pq.ParquetFile(f).schema_arrow
    except (OSError, pa.ArrowException) as err:
        return "footer", f"{type(err).__name__}: {err}"
    problems, options = [], []
    image = image_column_problem(schema, image_column)
    if image:
        problems.append(image)
        options.append("image_column")
    if id_column and id_column not in schema.names:
        problems.append(f"has no id column {id_column!r}")
        options.append("id_column")
    if not problems:
        return None
    return f"{' and '.join(problems)}; its columns: {_columns_text(schema)}", options


def check_parquet_inputs(
    fs: pafs.FileSystem, paths: list[str], image_column: str = "image", id_column: str | None = None
) -> None:
    """Check the schema of every Parquet file in ``paths`` before the job, from its footer alone: an
    image column of image bytes (:func:`image_column_problem`) and, when one is set, the id column.
    Footers are read :data:`FOOTER_THREADS` at a time on S3. A file whose footer cannot be read at all
    is left to the reader (one ``unreadable`` row) and logged here.

    Raises:
        ValueError: naming the first file with a problem, what is missing or wrong, the columns it
            has, the option that selects the column, and how many other files have problems.
    """
    check = functools.partial(_schema_problem, fs, image_column=image_column, id_column=id_column)
    if isinstance(fs, pafs.LocalFileSystem) or len(paths) < 2:
        results = list(map(check, paths))
    else:  # a request or two per footer, latency-bound: many at once
        with ThreadPoolExecutor(min(FOOTER_THREADS, len(paths))) as pool:
            results = list(pool.map(check, paths))
    bad, footers = [], []
    for path, problem in zip(paths, results):
        if problem and problem[0] == "footer":
            footers.append((path, problem[1]))
        elif problem:
            bad.append((path, *problem))
    if footers:
        path, err = footers[0]
        logger.warning(
            f"labeler: {len(footers)} of {len(paths)} Parquet files have no readable footer, each of them one "
            f"unreadable row (e.g. {uri_of(fs, path)}: {err})"
        )
    if bad:
        path, problem, options = bad[0]
        fix = "; ".join(f"choose the {o.replace('_', ' ')} with {OPTION_NAMES[o]}" for o in options)
        if "id_column" in options:
            fix += " (or set none: each row's id is then its file and row index)"
        more = ""
        if len(bad) > 1:
            other = f"{uri_of(fs, bad[1][0])} {bad[1][1]}"
            more = f" {len(bad) - 1} more of the {len(paths)} Parquet files have a problem too, e.g. {other}."
        raise ValueError(f"Parquet input {uri_of(fs, path)} {problem}. To read it, {fix}.{more}")


def _parquet_rows(
    batch: pa.Table, path: str, rel: str, first: int, image_column: str, id_column: str | None
) -> list[tuple]:
    """Rows of ``batch``, rows ``first``.. of the file ``path``: ids from ``id_column``, or (without
    one, or where its value is null) ``<rel>#<row index>``."""
    data = image_bytes(batch[image_column]).to_pylist()
    ids = [f"{rel}#{first + i}" for i in range(len(data))]
    if id_column:
        ids = [own if v is None else str(v) for v, own in zip(batch[id_column].to_pylist(), ids)]
    return [(i, path, d, None) for i, d in zip(ids, data)]


def _parquet_file_rows(
    fs: pafs.FileSystem, root: str, path: str, image_column: str, id_column: str | None
) -> Iterator[tuple]:
    """One (id, path, bytes, read_error) row per row of one Parquet file, as its footer counts them."""
    rel = relative_id(path, root)
    try:
        f = retried("GET", uri_of(fs, path), lambda: fs.open_input_file(path))  # a fault that passes is retried
    except OSError as err:
        yield (f"{rel}#unreadable", path, None, read_failure("unreadable", f"{rel}: {type(err).__name__}: {err}"))
        return
    with f:
        try:
            pf = pq.ParquetFile(f)
            total = pf.metadata.num_rows
        except (OSError, pa.ArrowException) as err:  # no footer: the number of rows is unknown
            detail = f"{rel}: no readable footer: {type(err).__name__}: {err}"
            yield (f"{rel}#unreadable", path, None, read_failure("unreadable", detail))
            return
        columns = [image_column] + ([id_column] if id_column else [])
        start = 0  # the file's first row in the row group being read
        for group in range(pf.metadata.num_row_groups):
            size, done, error = pf.metadata.row_group(group).num_rows, 0, None
            try:  # a row group at a time: damage in one loses that group's rows, not the file's
                for batch in pf.iter_batches(batch_size=256, row_groups=[group], columns=columns):
                    table = pa.Table.from_batches([batch])
                    rows = _parquet_rows(table, path, rel, start + done, image_column, id_column)
                    yield from rows
                    done += len(rows)
            except Exception as err:  # any failure mid-file: rows of this file, not a failed job
                error = f"{type(err).__name__}: {err}"
            yield from _unread_rows(path, rel, start + done, start + size, total, error or "the row group ended early")
            start += size
        # every row the footer counts is a row: read, or unreadable with its own id
        yield from _unread_rows(path, rel, start, total, total, "not in any row group")


def _unread_rows(path: str, rel: str, first: int, stop: int, total: int, error: str) -> Iterator[tuple]:
    """An ``unreadable`` row for each of the rows [first, stop) of a Parquet file of ``total`` rows."""
    detail = f"{rel}: rows {first}..{stop - 1} of {total} unread: {error}"
    for i in range(first, stop):
        yield (f"{rel}#{i}", path, None, read_failure("unreadable", detail))


def read_parquet_files(
    fs: pafs.FileSystem, root: str, paths: list[str], image_column: str = "image", id_column: str | None = None
) -> Iterator[pa.Table]:
    """(id, path, bytes, read_error) blocks of Parquet files, streamed a record batch at a time, a row
    per row of each file: a file whose footer cannot be read is one ``unreadable`` row naming it; in
    one that fails part-way, the rows read stay and each row of a row group that could not be read
    (counted from the footer) is an ``unreadable`` row with id ``<file>#<row index>``."""

    def rows():
        for path in paths:
            yield from _parquet_file_rows(fs, root, path, image_column, id_column)

    yield from blocks(rows())


def _inputs_of(
    fs: pafs.FileSystem, source: str, fmt: str, files: Iterable[tuple[str, str]], auto: bool
) -> tuple[list[str], list[str]]:
    """(paths, stamps) of the files of ``files`` (``(path, stamp)``) that ``fmt`` (parquet, webdataset)
    reads, by their suffix. The others are
    counted by extension: a warning names them; with ``auto``, files that another format reads (images,
    shards, Parquet) are an error instead, since which of them is the corpus is then a guess.

    Raises:
        ValueError: no such file, or (``auto``) files of another format beside them.
    """
    keep = is_parquet if fmt == "parquet" else is_shard
    what = "Parquet files (.parquet)" if fmt == "parquet" else f"WebDataset shards ({', '.join(SHARD_SUFFIXES)})"
    paths, stamps, skipped, example = [], [], Counter(), {}
    for path, mark in files:
        if keep(path):
            paths.append(path)
            stamps.append(mark)
        else:
            suffix = suffix_of(path)
            skipped[suffix] += 1
            example.setdefault(suffix, path)
    counts = ", ".join(f"{s or '(no extension)'} x{n}" for s, n in skipped.most_common(10))
    counts += ", ..." if len(skipped) > 10 else ""
    if not paths:
        holds = f"; it holds {counts}" if skipped else ""
        raise ValueError(f"input {source} holds no {what}{holds}; choose its format with {OPTION_NAMES['format']}")
    readable = [s for s in skipped if s.lstrip(".") in IMAGE_EXTENSIONS or s in (*SHARD_SUFFIXES, PARQUET_SUFFIX)]
    if auto and readable:
        raise ValueError(
            f"input {source} holds {what} ({len(paths)}) and also files that another format reads: "
            f"{', '.join(f'{s} x{skipped[s]}' for s in readable)} (e.g. {uri_of(fs, example[readable[0]])}); "
            f"format auto does not guess which are the corpus. Choose with {OPTION_NAMES['format']}: "
            f"{fmt} reads the {what} alone (skipping the rest, with a warning), folder reads every file as one "
            "image; or move the others out"
        )
    if skipped:
        noun = "Parquet files" if fmt == "parquet" else "WebDataset shards"
        logger.warning(f"labeler: input {source}: skipped {sum(skipped.values())} files that are not {noun}: {counts}")
    return paths, stamps


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
    are listed into a list, a unit per file (other files under the corpus: :func:`_inputs_of`), and
    every Parquet file's schema is checked from its footer (:func:`check_parquet_inputs`). With
    ``fmt="auto"`` the format is decided from the first :data:`SNIFF_FILES` files listed.

    Raises:
        FileNotFoundError: ``source`` does not exist. ValueError: an unknown format, no input files,
            files of two formats under ``fmt="auto"``, or a Parquet file without the image (or id) column.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    if fmt == "manifest" or (fmt == "auto" and is_manifest(source)):
        return "manifest", _manifest_units(source, files_per_unit), read_manifest_range
    fs, root, is_folder, stream = _stream(source)
    auto = fmt == "auto"
    head = list(itertools.islice(stream, SNIFF_FILES))
    fmt = _format_of(source, [path for path, _ in head]) if auto else fmt
    files = itertools.chain(head, stream)
    if fmt == "folder" and is_folder:
        written = write_listing(root, files, listing or scratch_listing(source, files_per_unit), files_per_unit)
        units, reader = written.units, listing_reader(written.uri)
    elif fmt == "folder":  # one file
        paths, stamps = zip(*files)
        units, reader = make_units(list(paths), files_per_unit, list(stamps)), read_files
    elif fmt == "parquet":
        paths, stamps = _inputs_of(fs, source, fmt, files, auto)
        check_parquet_inputs(fs, paths, image_column, id_column)
        units = make_units(paths, 1, stamps)
        reader = functools.partial(read_parquet_files, image_column=image_column, id_column=id_column)
    else:
        paths, stamps = _inputs_of(fs, source, fmt, files, auto)
        units, reader = make_units(paths, 1, stamps), read_shards
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

    opts = options or LabelOptions()
    _, units, reader = plan or plan_units(source, opts.format, opts.image_column, opts.id_column, opts.files_per_unit)
    fs, root = filesystem_for(source)
    todo = [u for u in units if u.key not in skip_units]
    if not todo:
        return ray.data.from_arrow(SCHEMA.append(pa.field(UNIT_COLUMN, pa.string())).empty_table())
    datasource = UnitsDatasource(fs, root, todo, reader, unit_log)
    # pinned to a block per unit: Ray would split each read task's output in ~20 otherwise
    return ray.data.read_datasource(datasource, num_cpus=opts.decode_cpus, override_num_blocks=len(todo))
