"""Input units: the deterministic blocks of a corpus that labeling reads, writes and resumes by.

A unit is one read task: 1,000 files of a folder (a row range of its listing,
:mod:`labeler.listing`), one WebDataset shard, one Parquet file, or 1,000 entries of a
manifest. Its key (``u0000042``: its index in the sorted listing) names the folder its
predictions are written to (``predictions/unit=u0000042/``), and when its read task has read
every row it writes ``units/u0000042.json`` with its row count. A unit is finished when its
predictions hold exactly that many rows; resuming skips finished units and redoes the rest
from scratch. So resume costs memory per unit, never per image, and rows in = predictions +
rejections stays exact across any number of interruptions.

A unit's identity (:attr:`Unit.identity`) names what it reads and a fingerprint of it (the sizes and
modification times or ETags of its files, ``core.fingerprint``). A finished unit whose recorded
identity is not the current one was made from other files: resuming stops with
:class:`core.fingerprint.OutputMismatch` rather than keep its rows or silently relabel it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from core.fingerprint import OutputMismatch
from core.storage import delete_file, delete_tree, join, list_files, read_bytes, uri_of, write_bytes
from labeler.file_reader import SCHEMA

UNIT_COLUMN = "unit"
UNIT_LOG = "units"  # beside predictions/: one <key>.json per fully read unit

Reader = Callable[[pafs.FileSystem, str, list[str]], Iterator[pa.Table]]


@dataclass(frozen=True)
class Unit:
    """One read task's input: ``paths`` (files or shards) under the corpus root, and its ``key``;
    for a manifest, the one manifest file and the range [start, stop) of it (lines: byte
    offsets; Parquet: rows) that the task reads. A folder's units are row ranges of its listing
    (``labeler.listing``), with a ``fingerprint`` (a digest of the paths in the range)."""

    key: str
    paths: tuple[str, ...]
    start: int = 0
    stop: int | None = None
    fingerprint: str = ""
    label: str = ""  # what it reads, for a person (a listing range's first and last file); not part of its identity

    @property
    def identity(self) -> str:
        """What the unit reads, checked on resume: a unit of another size, or of a corpus whose
        listing changed under it (files added, a manifest appended to), is not the same unit."""
        check = f" sha1:{self.fingerprint}" if self.fingerprint else ""
        if self.stop is not None:
            # a listing's range also names the files in it: files added before it shift it
            return f"{self.paths[0]}@{self.start}-{self.stop}{check}"
        return f"{self.paths[0]} .. {self.paths[-1]} ({len(self.paths)} files){check}"


def make_units(paths: list[str], per_unit: int, stamps: list[str] | None = None) -> list[Unit]:
    """Consecutive groups of ``per_unit`` paths (in the order given: sorted), keyed by index; with
    ``stamps`` (one per path: ``labeler.listing.iter_entries``), each unit's fingerprint digests them."""
    units = []
    for i in range(0, len(paths), per_unit):
        group = paths[i : i + per_unit]
        marks = "\n".join(f"{p}\0{m}" for p, m in zip(group, stamps[i : i + per_unit])) if stamps else ""
        fingerprint = hashlib.sha1(marks.encode("utf-8", "surrogateescape")).hexdigest()[:16] if stamps else ""
        units.append(Unit(f"u{i // per_unit:07d}", tuple(group), fingerprint=fingerprint))
    return units


def _read_unit(fs: pafs.FileSystem, root: str, unit: Unit, reader: Reader, log: str | None) -> Iterator[pa.Table]:
    rows = 0
    tables = reader(fs, root, list(unit.paths)) if unit.stop is None else reader(fs, root, unit.start, unit.stop)
    for table in tables:
        rows += table.num_rows
        if fs.type_name != "local":  # the path column holds URIs (s3://bucket/key), as a manifest's entries do
            paths = pa.array([uri_of(fs, p) for p in table["path"].to_pylist()], pa.string())
            table = table.set_column(table.schema.get_field_index("path"), "path", paths)
        yield table.append_column(UNIT_COLUMN, pa.array([unit.key] * table.num_rows, pa.string()))
    if log:  # every row of the unit is on its way: record how many there are
        write_bytes(join(log, unit.key + ".json"), json.dumps({"rows": rows, "input": unit.identity}).encode())


class UnitsDatasource(Datasource):
    """A read task per unit, read by ``reader`` into (id, path, bytes, read_error, unit) blocks of
    at most about 64 MB of bytes; with ``log``, each task records its unit's row count there."""

    def __init__(self, fs: pafs.FileSystem, root: str, units: list[Unit], reader: Reader, log: str | None = None):
        super().__init__()
        self._fs, self._root, self._units, self._reader, self._log = fs, root, units, reader, log

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # the listing has names only; sizes would cost a request per file on S3

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list:
        fs, root, reader, log = self._fs, self._root, self._reader, self._log
        schema = SCHEMA.append(pa.field(UNIT_COLUMN, pa.string()))
        return [
            ReadTask(
                lambda unit=unit: _read_unit(fs, root, unit, reader, log),
                BlockMetadata(None, size_bytes=None, input_files=None, exec_stats=None),
                schema=schema,
                per_task_row_limit=per_task_row_limit,
            )
            for unit in self._units
        ]


def corpus_digest(fmt: str, units: list[Unit]) -> str:
    """A digest of a corpus as its units read it (their keys, ranges, files and fingerprints), the same
    wherever its listing is kept: what a stage that labels the corpus records of it."""
    digest = hashlib.sha256(fmt.encode())
    for u in units:
        where = "" if fmt == "folder" else "|".join(u.paths)  # a folder unit's path is its listing's location
        digest.update(
            f"{u.key}:{u.start}-{u.stop}:{u.fingerprint}:{len(u.paths)}:{where}\n".encode("utf-8", "surrogateescape")
        )
    return digest.hexdigest()[:16]


def unit_of(path: str) -> str | None:
    """The unit key of a predictions file (``.../unit=u0000042/part.parquet``), or None."""
    part = next((p for p in path.split("/") if p.startswith(UNIT_COLUMN + "=")), None)
    return part.split("=", 1)[1] if part else None


def _rows_written(predictions: str) -> tuple[Counter, set[str]]:
    """(rows per unit from the Parquet footers, units with a file that is not valid Parquet)."""
    fs, files = list_files(predictions)
    rows, broken = Counter(), set()
    for path in files:
        unit = unit_of(path)
        try:
            with fs.open_input_file(path) as f:
                rows[unit] += pq.ParquetFile(f).metadata.num_rows
        except (pa.ArrowInvalid, OSError):  # cut off mid-write
            broken.add(unit)
    return rows, broken


def finished_units(out: str, units: list[Unit]) -> tuple[set[str], int]:
    """(keys of the units already labeled under ``out``, their rows); everything written for any
    other unit is deleted so it is redone whole. A unit counts as finished when its predictions hold
    exactly its recorded row count.

    Raises:
        OutputMismatch: a unit recorded as read is not the same input now (another recorded
            ``Unit.identity``: files added, removed or rewritten, another unit size), or is no unit of
            the corpus any more; the message names up to five and says how to start fresh.
    """
    log, predictions = join(out, UNIT_LOG), join(out, "predictions")
    by_key = {u.key: u for u in units}
    rows, broken = _rows_written(predictions)
    done, resumed = set(), 0
    records = {}
    for path in list_files(log, suffix=".json")[1]:
        key = path.rsplit("/", 1)[-1][: -len(".json")]
        try:
            records[key] = json.loads(read_bytes(join(log, key + ".json")))
        except ValueError:  # cut off mid-write: the unit is redone
            records[key] = {}
    changed = [
        f"{key} ({by_key[key].label or by_key[key].identity}): its files differ from when it was labeled"
        if key in by_key
        else f"{key}: no such unit of the corpus now"
        for key, r in sorted(records.items())
        if "input" in r and (key not in by_key or r["input"] != by_key[key].identity)
    ]
    if changed:
        raise OutputMismatch(
            f"{out} holds predictions of other inputs: {len(changed)} of its input units differ from the corpus "
            f"as listed now (files added, removed or rewritten, or another files_per_unit): {'; '.join(changed[:5])}"
            f"{'; ...' if len(changed) > 5 else ''}. To start fresh, write to a new output, or pass --overwrite "
            "(labeler) / run with --overwrite (noisy-student), which deletes what is there."
        )
    for key, record in records.items():
        uri = join(log, key + ".json")
        unit = by_key.get(key)
        if unit and key not in broken and record.get("input") == unit.identity and rows[key] == record.get("rows"):
            done.add(key)
            resumed += record["rows"]
        else:
            delete_file(uri)
    for key in (set(rows) | broken) - done - {None}:
        delete_tree(join(predictions, f"{UNIT_COLUMN}={key}"))
    fs, files = list_files(predictions)
    for path in files:
        if unit_of(path) is None:  # an older layout, or a stray file: its rows are redone by their units
            fs.delete_file(path)
    return done, resumed
