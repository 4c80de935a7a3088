"""Near-duplicates of evaluation images in a corpus, and duplicates inside it, by perceptual hash.

A web corpus holds copies of evaluation images: re-encoded, resized, cropped, brightened. Pseudo-labeled
and trained on, they make the student's test accuracy a measure of memory. Every image gets a 64-bit
pHash where it is decoded (:mod:`core.phash`; the labeler's ``phash`` column, or :func:`hash_dataset`
for a set without predictions), and:

* **evaluation sets**: every corpus row within ``max_distance`` bits of an evaluation image is excluded
  (reason ``near_duplicate_eval``), by Ray tasks of :data:`FILES_PER_TASK` predictions files each against a
  :class:`HashIndex` of the evaluation hashes (exact, no pairwise scan); a row counts for the set of its
  nearest evaluation image (an image in several sets: the first set named);
* **the labeled set**: rows whose hash equals a labeled image's are counted (training on them is harmless);
* **inside the corpus**: of the rows left, those with the same hash form a group; groups and their rows are
  counted, and with ``keep_one_per_group`` all but one row of each group (the smallest id) are excluded (reason
  ``duplicate_in_corpus``). Rows are grouped in hash buckets (the hash modulo their number) of about
  :data:`BUCKET_ROWS` rows, one Ray task each, so no process holds the corpus's hashes (a hash repeated
  millions of times, such as a blank image's, stays in one bucket). Only equal hashes group (distance 0): grouping by
  distance inside a 300M-image corpus is a self-join of another order of cost.

What is excluded is written beside the predictions, per predictions file (``excluded/`` and
``corpus_groups/``, see :class:`Exclusions`), and read back by the passes that use the predictions
(balancing), so nothing per row is held in one process. ``dedup_stats.json`` holds the counts and
``pairs.json`` the closest pairs and the farthest still within reach (thumbnails inlined) for the report.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import logging
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from core.images import RejectedImage, decode_image, is_container, read_reason, thumbnail
from core.phash import SIDE, hash_input, phash_many, stored, unsigned
from core.settings import setting
from core.storage import canonical, exists, filesystem_for, iter_tables, join, list_files, read_bytes, write_json
from labeler.hash_index import HashIndex
from labeler.manifest import parquet_column_range
from labeler.options import LabelOptions
from labeler.sources import read_source

logger = logging.getLogger(__name__)

EVAL_REASON = "near_duplicate_eval"
CORPUS_REASON = "duplicate_in_corpus"
# chosen from benchmarks/dedup_distance.py (docs/near-duplicates.md, docs/benchmarks.md)
DEFAULT_MAX_DISTANCE = 8
BUCKET_ROWS = 2_000_000  # rows of the corpus one grouping task holds (about 0.1 GB: hash, file, Arrow id)
PAIRS_SHOWN = 16
# predictions files a comparison task reads, one after another: a task per file spent more time starting than
# comparing (100 files of 10,000 rows: 15 s against about 5 s of work on 2 cores)
FILES_PER_TASK = 8


@dataclass
class DedupOptions:
    """Near-duplicate settings: the ``labeler dedup`` command's options and a noisy-student config's
    ``dedup:`` section (same names). ``max_distance`` is in bits of the 64-bit pHash; its default, 8, comes
    from ``benchmarks/dedup_distance.py`` (docs/benchmarks.md, "Near-duplicate distance": 91-97% of
    altered photo copies found, no distinct photo pair within reach).

    Raises:
        ValueError: ``max_distance`` outside 0..32.
    """

    enabled: bool = setting(
        True,
        help="before balancing, exclude unlabeled images within max_distance of a validation, test or eval.extra "
        "image (noisy-student only; labeler dedup always compares)",
    )
    max_distance: int = setting(
        DEFAULT_MAX_DISTANCE,
        help="Hamming distance (bits of the 64-bit perceptual hash) up to which two images are near-duplicates",
    )
    keep_one_per_group: bool = setting(
        False, help="of unlabeled images with equal hashes, keep one (the smallest id) and exclude the rest"
    )

    def __post_init__(self) -> None:
        if not 0 <= self.max_distance <= 32:
            raise ValueError(f"max_distance must be within 0..32 (bits of 64), not {self.max_distance}")


HASH_SCHEMA = pa.schema(
    [("id", pa.string()), ("path", pa.string()), ("phash", pa.int64()), ("reject_reason", pa.string())]
)
HASH_COLUMNS = HASH_SCHEMA.names
EXCLUDED_SCHEMA = pa.schema(
    [("id", pa.string()), ("path", pa.string()), ("reason", pa.string()), ("distance", pa.uint8()),
     ("eval_set", pa.string()), ("eval_id", pa.string()), ("eval_path", pa.string())]
)  # fmt: skip


# --- hashing a set that has no predictions ---------------------------------------------------------


def hash_batch(batch: dict, max_pixels: int) -> dict:
    """(id, path, bytes, read_error) rows -> (id, path, phash, reject_reason): decode, then the pHash."""

    n = len(batch["id"])
    inputs = np.zeros((n, SIDE, SIDE), np.uint8)
    reasons = np.full(n, None, dtype=object)
    errors = batch.get("read_error")
    for i, data in enumerate(batch["bytes"]):
        if errors is not None and isinstance(errors[i], str):
            reasons[i] = read_reason(errors[i])
            continue
        try:
            inputs[i] = hash_input(decode_image(bytes(data) if data is not None else b"", 3, max_pixels))
        except RejectedImage as err:
            reasons[i] = err.reason
    ok = np.array([r is None for r in reasons], bool)
    hashes = pa.array(stored(phash_many(inputs)), pa.int64(), mask=~ok)
    return pa.table(
        {"id": [str(v) for v in batch["id"]], "path": [str(v) for v in batch["path"]], "phash": hashes,
         "reject_reason": pa.array(list(reasons), pa.string())}
    )  # fmt: skip


def hash_dataset(source: str, options=None) -> ray.data.Dataset:
    """A lazy dataset of (id, path, phash, reject_reason) rows, one per image of ``source`` (any corpus
    format the labeler reads: ``labeler.sources``; ``options``: its ``LabelOptions``). No model runs."""

    opts = options or LabelOptions()
    ds = read_source(source, opts)
    return ds.map_batches(
        hash_batch, batch_size=64, batch_format="numpy", num_cpus=opts.decode_cpus,
        fn_kwargs={"max_pixels": opts.max_pixels},
    )  # fmt: skip


def collect_hashes(source: str, options=None) -> pa.Table:
    """Every (id, path, phash, reject_reason) row of a small set (an evaluation set), in this process."""
    batches = hash_dataset(source, options).iter_batches(batch_format="pyarrow", batch_size=None)
    tables = [pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b for b in batches]
    if not tables:
        return HASH_SCHEMA.empty_table()
    return pa.concat_tables(tables).select(HASH_COLUMNS).cast(HASH_SCHEMA)


# --- where exclusions live ------------------------------------------------------------------------


def file_key(root: str, path: str) -> str:
    """A short stable name for the predictions file ``path`` under ``root`` (its relative path's digest)."""
    rel = path[len(filesystem_for(root)[1].rstrip("/")) + 1 :]
    return hashlib.sha1(rel.encode("utf-8", "surrogateescape")).hexdigest()[:20]


@dataclass
class Exclusions:
    """The rows a dedup run at ``folder`` excluded from the predictions (or hashes) under ``root``:
    ``folder/excluded/<file key>.parquet`` (near-duplicates of evaluation images, per file) and
    ``folder/corpus_groups/bucket-*.parquet`` (all but one row of each duplicate group, with ``keep_one``;
    rows of every file, sorted by file key so a file's rows are read by their row groups' statistics)."""

    folder: str
    root: str

    @functools.cached_property
    def _buckets(self) -> tuple:
        """(filesystem, the ``corpus_groups/`` files): listed once, not once per predictions file."""
        return list_files(join(self.folder, "corpus_groups"), suffix=".parquet")

    def ids_for(self, path: str) -> pa.Array:
        """The ids excluded from the predictions file ``path`` (a string array; empty when none)."""
        key = file_key(self.root, path)
        parts = [self.near_eval(path)]
        fs, buckets = self._buckets
        for bucket in buckets:
            t = pq.read_table(bucket, filesystem=fs, columns=["id"], filters=[("file", "=", key)])
            parts.append(t["id"])
        chunks = [c for p in parts for c in (p.chunks if isinstance(p, pa.ChunkedArray) else [p])]
        return pa.concat_arrays(chunks).cast(pa.string()) if chunks else pa.array([], pa.string())

    def near_eval(self, path: str) -> pa.Array:
        """The ids of the predictions file ``path`` excluded as near-duplicates of evaluation images."""
        own = join(self.folder, "excluded", f"{file_key(self.root, path)}.parquet")
        if not exists(own):
            return pa.array([], pa.string())
        fs, p = filesystem_for(own)
        return pq.read_table(p, filesystem=fs, columns=["id"])["id"].combine_chunks().cast(pa.string())

    def drop(self, table: pa.Table, ids: pa.Array) -> pa.Table:
        """``table`` without the rows whose id is in ``ids``."""
        if len(ids) == 0 or table.num_rows == 0:
            return table
        return table.filter(pc.invert(pc.is_in(table["id"].cast(pa.string()), value_set=ids)))


# --- the evaluation pass: a task per few files ---------------------------------------------------------


@dataclass
class Reference:
    """The hashes a corpus is compared with: evaluation sets (excluded within ``max_distance``) and the
    labeled set (counted when equal). ``names[i]``/``ids[i]``/``paths[i]``: the set, id and path of
    ``hashes[i]``; ``index``: their :class:`HashIndex`, built once here and shipped to every task."""

    hashes: np.ndarray
    names: list[str]
    ids: list[str]
    paths: list[str]
    labeled: np.ndarray
    max_distance: int
    index: HashIndex | None = None

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = HashIndex(self.hashes, self.max_distance)

    @classmethod
    def build(cls, eval_sets: dict[str, pa.Table], labeled: pa.Table | None, max_distance: int) -> Reference:
        hashes, names, ids, paths = [], [], [], []
        for name, t in eval_sets.items():
            t = t.filter(pc.is_valid(t["phash"]))
            hashes.append(unsigned(t["phash"]))
            names += [name] * t.num_rows
            ids += t["id"].to_pylist()
            paths += t["path"].to_pylist()
        lab = np.zeros(0, np.uint64) if labeled is None else labeled.filter(pc.is_valid(labeled["phash"]))["phash"]
        lab = np.unique(unsigned(lab))
        all_hashes = np.concatenate(hashes).astype(np.uint64) if hashes else np.zeros(0, np.uint64)
        return cls(all_hashes, names, ids, paths, lab, max_distance)


def _match_table(t: pa.Table, ref: Reference, order: list[str]) -> tuple[pa.Table, dict]:
    """One batch: its rows within reach of an evaluation image (as :data:`EXCLUDED_SCHEMA`) and counts: rows
    hashed, rows without a hash (rejected), rows equal to a labeled image (of those not excluded)."""
    valid = pc.is_valid(t["phash"])
    unhashed = t.num_rows - (pc.sum(valid).as_py() or 0)
    t = t.filter(valid)
    hashes = unsigned(t["phash"])
    q, r, d = ref.index.query(hashes)
    names = [ref.names[i] for i in r]
    rows = pa.table(
        {"id": t["id"].take(q).cast(pa.string()), "path": t["path"].take(q).cast(pa.string()),
         "reason": pa.array([EVAL_REASON] * len(q), pa.string()), "distance": pa.array(d, pa.uint8()),
         "eval_set": pa.array(names, pa.string()), "eval_id": pa.array([ref.ids[i] for i in r], pa.string()),
         "eval_path": pa.array([ref.paths[i] for i in r], pa.string())}
    )  # fmt: skip
    kept = np.ones(len(hashes), bool)
    kept[q] = False
    labeled = int(np.isin(hashes[kept], ref.labeled).sum()) if len(ref.labeled) else 0
    per_set = {name: names.count(name) for name in order}
    counts = {"hashed": len(hashes), "unhashed": unhashed, "labeled_duplicates": labeled, "per_set": per_set}
    return rows, {**counts, "eval_hit": r}


def _match_files(batch: dict, ref: Reference, root: str, folder: str, shown: int) -> dict:
    """Task: each predictions file of ``batch`` against the evaluation hashes (:func:`_match_file`), a row each."""
    outs = [_match_file(str(path), ref, root, folder, shown) for path in batch["file"]]
    return {k: _objects([o[k] for o in outs]) for k in outs[0]}


def _objects(values: list) -> np.ndarray:
    """A 1-D object array of ``values`` (``np.array`` would stack equal-length lists into 2-D)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def _match_file(path: str, ref: Reference, root: str, folder: str, shown: int) -> dict:
    """One predictions file against the evaluation hashes; writes its exclusions, returns counts."""
    fs, _ = filesystem_for(root)
    order = list(dict.fromkeys(ref.names))
    found, hashed, unhashed, labeled, per_set, hits = [], 0, 0, 0, dict.fromkeys(order, 0), []
    names = [c for c in HASH_COLUMNS if c != "reject_reason"]
    for table in iter_tables(fs, path, 65536, names):
        rows, counts = _match_table(table, ref, order)
        hashed, labeled = hashed + counts["hashed"], labeled + counts["labeled_duplicates"]
        unhashed += counts["unhashed"]
        per_set = {k: per_set[k] + counts["per_set"][k] for k in order}
        hits.append(counts["eval_hit"])
        if rows.num_rows:
            found.append(rows)
    excluded = pa.concat_tables(found) if found else EXCLUDED_SCHEMA.empty_table()
    if excluded.num_rows:
        ofs, out = filesystem_for(join(folder, "excluded", f"{file_key(root, path)}.parquet"))
        ofs.create_dir(out.rsplit("/", 1)[0], recursive=True)
        pq.write_table(excluded, out, filesystem=ofs)
    ends = []  # this file's closest pairs and those farthest still within reach (for the report)
    for order in ("ascending", "descending"):
        ends += excluded.take(pc.sort_indices(excluded, [("distance", order), ("id", "ascending")])[:shown]).to_pylist()
    pairs = [{**row, "file": path} for row in {r["id"]: r for r in ends}.values()]
    hit = np.unique(np.concatenate(hits)) if hits else np.zeros(0, np.int64)
    return {"hashed": hashed, "unhashed": unhashed, "labeled_duplicates": labeled, "per_set": per_set,
            "pairs": pairs, "eval_hit": hit}  # fmt: skip


def check_readable(table: pa.Table, what: str) -> None:
    """Refuse a set to compare with (``what`` names it) whose :func:`collect_hashes` rows hold no hash.

    Raises:
        ValueError: no row, or none decoded.
    """
    if table.num_rows == 0 or table["phash"].null_count == table.num_rows:
        raise ValueError(
            f"{what} has no readable image ({table.num_rows} rows, none decoded), so nothing can be compared "
            "with it; check its location and format, or leave it out"
        )


def check_hashed(root: str) -> list[str]:
    """The Parquet files under ``root`` (predictions or hashes), once the first is seen to carry ``phash``.

    Raises:
        FileNotFoundError: no Parquet file there. ValueError: no ``phash`` column (labeled with it off).
    """
    fs, files = list_files(root, suffix=".parquet")
    if not files:
        raise FileNotFoundError(f"no Parquet files (predictions or hashes) under {root}")
    if "phash" not in pq.read_schema(files[0], filesystem=fs).names:
        raise ValueError(
            f"{root} has no phash column: its images were labeled without perceptual hashes; label again with "
            "phash on (the default: --phash / label.phash), or turn dedup off (dedup.enabled: false)"
        )
    return files


def _per_file(fn, files: list[str], kwargs: dict) -> list[dict]:
    """``fn`` as Ray tasks of :data:`FILES_PER_TASK` files each (Ray Data, a block each); every file's small
    output (in no set order)."""
    blocks = math.ceil(len(files) / FILES_PER_TASK)
    ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=blocks)
    out = ds.map_batches(fn, batch_size=FILES_PER_TASK, batch_format="numpy", fn_kwargs=kwargs)
    rows = [row for b in out.iter_batches(batch_format="numpy", batch_size=None) for row in _rows(b)]
    return rows


def _rows(batch: dict) -> list[dict]:
    return [{k: batch[k][i] for k in batch} for i in range(len(next(iter(batch.values()))))]


# --- the corpus pass: one task per hash bucket ------------------------------------------------------


def _group_bucket(batch: dict, root: str, files: list[str], buckets: int, folder: str, keep_one: bool) -> dict:
    """Task: the rows of every file whose hash falls in this bucket (``phash % buckets``), less those excluded
    as near-duplicates of evaluation images, grouped by hash; with ``keep_one``, writes all but the smallest id
    of each group (with their file's key). Holds a hash, a file index and an Arrow id per row of the bucket;
    only the excluded rows' file keys become Python objects."""
    bucket = int(batch["bucket"][0])
    fs, _ = filesystem_for(root)
    exclusions = Exclusions(folder, root)
    hashes, owners, ids = [], [], []
    for f, path in enumerate(files):
        near = exclusions.near_eval(path)  # gone already: not grouped, not counted twice
        for t in iter_tables(fs, path, 65536, ["id", "phash"]):
            t = exclusions.drop(t.filter(pc.is_valid(t["phash"])), near)
            h = unsigned(t["phash"])
            mine = np.flatnonzero(h % np.uint64(buckets) == bucket)
            hashes.append(h[mine])
            owners.append(np.full(len(mine), f, np.int32))
            ids.append(t["id"].take(mine).cast(pa.string()))
    h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    order = np.argsort(h, kind="stable")
    new = np.ones(len(h), bool)
    new[1:] = h[order][1:] != h[order][:-1]
    sizes = np.diff(np.append(np.flatnonzero(new), len(h)))
    grouped = np.repeat(sizes > 1, sizes)
    rows, group = order[grouped], np.repeat(np.arange(len(sizes)), sizes)[grouped]
    extra = _all_but_smallest(group, pa.chunked_array(ids, pa.string()).take(rows))
    if keep_one and len(extra):
        owner = np.concatenate(owners)[rows[extra]] if owners else np.zeros(0, np.int32)
        keys = [file_key(root, files[k]) for k in owner]
        t = pa.table({"file": keys, "id": pa.chunked_array(ids, pa.string()).take(rows[extra])})
        t = t.sort_by([("file", "ascending"), ("id", "ascending")])
        ofs, out = filesystem_for(join(folder, "corpus_groups", f"bucket-{bucket:05d}.parquet"))
        ofs.create_dir(out.rsplit("/", 1)[0], recursive=True)
        pq.write_table(t, out, filesystem=ofs, row_group_size=65536)
    return {"groups": np.array([int((sizes > 1).sum())]), "rows": np.array([len(rows)]),
            "excluded": np.array([len(extra) if keep_one else 0])}  # fmt: skip


def _all_but_smallest(group: np.ndarray, ids: pa.ChunkedArray) -> np.ndarray:
    """Positions of every row but the one with the smallest id of its group (``group[i]``: row i's group),
    sorted by Arrow (no Python object per row)."""
    if not len(group):
        return np.zeros(0, np.int64)
    order = pc.sort_indices(pa.table({"g": group, "id": ids}), [("g", "ascending"), ("id", "ascending")]).to_numpy()
    first = np.ones(len(order), bool)
    first[1:] = group[order][1:] != group[order][:-1]
    return np.sort(order[~first])


def corpus_groups(
    root: str, files: list[str], hashed: int, folder: str, keep_one: bool, bucket_rows: int = BUCKET_ROWS
) -> dict:
    """Duplicate groups inside the corpus (rows with equal hashes, less those excluded as near evaluation
    images): ``groups``, ``rows`` in them, and ``excluded`` (all but one per group with ``keep_one``, else 0).
    One task per bucket of about ``bucket_rows`` rows; each reads the hash column of every file, so the
    corpus's hashes are read once per bucket (1 bucket up to 2M rows; 150 at 300M)."""
    buckets = max(1, math.ceil(hashed / bucket_rows))
    ds = ray.data.from_items([{"bucket": b} for b in range(buckets)], override_num_blocks=buckets)
    out = ds.map_batches(
        _group_bucket, batch_size=1, batch_format="numpy",
        fn_kwargs={"root": root, "files": files, "buckets": buckets, "folder": folder, "keep_one": keep_one},
    )  # fmt: skip
    totals = {"groups": 0, "rows": 0, "excluded": 0, "buckets": buckets}
    for b in out.iter_batches(batch_format="numpy", batch_size=None):
        for k in ("groups", "rows", "excluded"):
            totals[k] += int(b[k].sum())
    return totals


# --- the whole run ----------------------------------------------------------------------------------


def find_duplicates(
    root: str,
    eval_sets: dict[str, pa.Table],
    folder: str,
    labeled: pa.Table | None = None,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    keep_one_per_group: bool = False,
    bucket_rows: int = BUCKET_ROWS,
) -> dict:
    """Compare the rows under ``root`` (predictions with a ``phash`` column, or :func:`hash_dataset`'s
    output written as Parquet) with ``eval_sets`` (name -> :func:`collect_hashes` table) and ``labeled``,
    and with each other; write the exclusions (:class:`Exclusions`), ``folder/dedup_stats.json`` and
    ``folder/pairs.json``. Returns the stats: ``predictions`` (``root``) and ``max_distance``; ``hashed``
    (corpus rows with a hash) and ``unhashed`` (rows without: rejected images); ``eval_images`` (per set:
    hashed, unreadable); ``near_duplicates_of_eval`` (rows excluded, per set, and ``eval_images_matched``:
    evaluation images with at least one copy); ``labeled_duplicates`` (rows left that equal a labeled image);
    ``corpus_duplicates`` (``groups``, ``rows``, ``excluded``: :func:`corpus_groups`, ``bucket_rows`` a
    bucket); ``excluded`` (rows excluded in all) and ``reasons`` (the same by reason).

    Raises:
        FileNotFoundError: no Parquet files under ``root``.
        ValueError: they have no ``phash`` column (labeled with ``phash`` off); an evaluation set without one
            readable image; ``max_distance`` outside 0..32.
    """
    files = check_hashed(root)
    fs, _ = filesystem_for(root)
    for name, t in eval_sets.items():
        check_readable(t, f"evaluation set {name!r}")
    ref = Reference.build(eval_sets, labeled, max_distance)
    outs = _per_file(_match_files, files, {"ref": ref, "root": root, "folder": folder, "shown": PAIRS_SHOWN})
    hashed = sum(int(o["hashed"]) for o in outs)
    groups = corpus_groups(root, files, hashed, folder, keep_one_per_group, bucket_rows)
    stats = {"predictions": canonical(root), **_stats(ref, eval_sets, outs, hashed, groups, keep_one_per_group)}
    stats["unhashed"] = sum(int(o["unhashed"]) for o in outs)
    pairs = _shown_pairs([p for o in outs for p in o["pairs"]])
    write_json(join(folder, "pairs.json"), [_with_images(p, ref, fs) for p in pairs])
    write_json(join(folder, "dedup_stats.json"), stats)
    _warn_if_many(stats)
    logger.info(
        f"dedup: {stats['near_duplicates_of_eval']['rows']} of {hashed} rows within {max_distance} bits of an "
        f"evaluation image (excluded); {groups['rows']} rows in {groups['groups']} duplicate groups in the corpus"
        + (f" ({groups['excluded']} excluded)" if keep_one_per_group else "")
    )
    return stats


def _shown_pairs(pairs: list[dict]) -> list[dict]:
    """The report's pairs: half the closest, half the farthest still within reach (how near the threshold
    looks), ordered by distance; each corpus row once."""
    half = PAIRS_SHOWN // 2
    close = heapq.nsmallest(half, pairs, key=lambda p: (p["distance"], p["id"]))
    taken = {p["id"] for p in close}
    far = heapq.nsmallest(half, (p for p in pairs if p["id"] not in taken), key=lambda p: (-p["distance"], p["id"]))
    return sorted(close + far, key=lambda p: (p["distance"], p["id"]))


MANY = 0.05  # a share of the corpus near evaluation images that deserves a second look


def _warn_if_many(stats: dict) -> None:
    """Warn when more than :data:`MANY` of the corpus is excluded as near evaluation images: a real leak, or
    images too small or too alike for a 64-bit hash at this distance (8x8 digits at 8 bits: 29%)."""
    near, hashed = stats["near_duplicates_of_eval"]["rows"], stats["hashed"]
    if hashed and near / hashed > MANY:
        logger.warning(
            f"dedup: {near} of {hashed} corpus images ({near / hashed:.0%}) are within {stats['max_distance']} bits "
            "of an evaluation image and are excluded. Either the corpus holds that many copies (see the report's "
            "pairs), or its images are too small or too alike for a perceptual hash at this distance: then lower "
            "dedup.max_distance (--max-distance for labeler dedup)"
        )


def _stats(ref: Reference, eval_sets: dict, outs: list[dict], hashed: int, groups: dict, keep_one: bool) -> dict:
    per_set = {name: sum(int(o["per_set"][name]) for o in outs) for name in eval_sets}
    hit = np.unique(np.concatenate([o["eval_hit"] for o in outs]).astype(np.int64)) if outs else np.zeros(0, np.int64)
    matched = {name: 0 for name in eval_sets}
    for i in hit:
        matched[ref.names[int(i)]] += 1
    near = sum(per_set.values())
    return {
        "max_distance": ref.max_distance,
        "hashed": hashed,
        "eval_images": {
            name: {
                "hashed": int(pc.sum(pc.is_valid(t["phash"])).as_py() or 0),
                "unreadable": int(pc.sum(pc.is_null(t["phash"])).as_py() or 0),
            }
            for name, t in eval_sets.items()
        },  # fmt: skip
        "near_duplicates_of_eval": {"rows": near, "per_set": per_set, "eval_images_matched": matched},
        "labeled_duplicates": sum(int(o["labeled_duplicates"]) for o in outs),
        "corpus_duplicates": {**groups, "keep_one_per_group": keep_one},
        "excluded": near + groups["excluded"],
        "reasons": {EVAL_REASON: near, CORPUS_REASON: groups["excluded"]},
    }


def _with_images(pair: dict, ref: Reference, fs) -> dict:
    """A pair for the report: ids, distance and both images as inline thumbnails (None where unreadable);
    ``fs``: the filesystem of the pair's predictions file."""

    eval_path = pair["eval_path"]
    corpus = _kept_bytes(fs, pair["file"], pair["id"]) or _file_image(pair["path"], pair["id"])
    return {
        "distance": int(pair["distance"]), "eval_set": pair["eval_set"], "eval_id": pair["eval_id"],
        "id": pair["id"], "eval_image": thumbnail(eval_path, data=_file_image(eval_path, pair["eval_id"])),
        "image": thumbnail(pair["path"], data=corpus) if corpus else None,
    }  # fmt: skip


def _kept_bytes(fs, path: str, row_id: str) -> bytes | None:
    """The image bytes the labeler kept for ``row_id`` in the predictions file ``path`` (None without)."""
    if "image" not in pq.read_schema(path, filesystem=fs).names:
        return None
    t = pq.read_table(path, filesystem=fs, columns=["id", "image"], filters=[("id", "=", row_id)])
    return t["image"][0].as_py() if t.num_rows else None


def _file_image(path: str, row_id: str) -> bytes | None:
    """An image's bytes from its own file, or from a Parquet file's row (``<file>#<row>`` ids)."""
    try:
        if path.lower().endswith(".parquet") and "#" in row_id:
            fs, p = filesystem_for(path)
            row = int(row_id.rsplit("#", 1)[1])
            column = [c for c in ("image", "path") if c in pq.read_schema(p, filesystem=fs).names][0]
            value = parquet_column_range(fs, p, column, row, row + 1)[0]  # reads only the row group holding it
            if column == "path":
                return read_bytes(value)
            return value["bytes"] if isinstance(value, dict) else value  # a Hugging Face struct, or the bytes
        return None if is_container(path) else read_bytes(path)
    except (OSError, ValueError, IndexError) as err:
        logger.debug(f"dedup: no image for {path} ({row_id}): {err}")
        return None
