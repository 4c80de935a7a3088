"""Bounded, deterministic samples of a round's predictions for the report, read by streaming.

* ``sample_gallery``: for each shown class, the ``per_group`` most confident pseudo labels, the
  ``per_group`` just at or above the threshold and the ``per_group`` just below it;
* ``sample_rejections``: per reject reason, its count and the ``per_reason`` smallest ids.

Both read the predictions Parquet file by file, a few columns at a time, and keep only
classes x groups x ``per_group`` rows (or reasons x ``per_reason`` ids): memory and output are
bounded whatever the corpus size. Ranking is balancing's (``balance_core.sort_keys``: confidence,
ties broken by a stable hash of the id), so the same predictions give the same samples.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.storage import list_files
from labeler.dedup import Exclusions
from pipeline.balance_core import sort_keys

logger = logging.getLogger(__name__)

GROUPS = ("most confident", "just above the threshold", "just below the threshold")
MAX_CLASSES = 20  # classes shown per round (the first ones by index); a 1,000-class corpus shows 20


def _threshold_key(threshold: float) -> np.uint64:
    """The smallest sort key of a confidence >= threshold (float32, as the predictions store it)."""
    bits = np.array([threshold], dtype=np.float32).view(np.uint32).astype(np.uint64)[0]
    return np.uint64(bits) << np.uint64(32)


def sample_gallery(
    predictions: str,
    threshold: float,
    num_classes: int,
    per_group: int = 4,
    max_classes: int = MAX_CLASSES,
    dedup: str | None = None,
) -> dict[int, dict[str, list[dict]]]:
    """{class: {group: [{id, path, confidence}, ...]}} for classes ``0 .. min(num_classes, max_classes) - 1``.

    Groups (see ``GROUPS``): the ``per_group`` highest ranked rows of the class; the lowest ranked
    with confidence >= ``threshold``; the highest ranked below it. Rejected rows are skipped, and so are the
    rows a near-duplicate run at ``dedup`` excluded (``labeler.dedup.Exclusions``): balancing never saw them.
    Each list is ordered from the highest confidence down.
    """

    shown = min(num_classes, max_classes)
    cut = _threshold_key(threshold)
    kept: dict[int, dict[str, list[tuple]]] = {c: {g: [] for g in GROUPS} for c in range(shown)}
    fs, files = list_files(predictions, suffix=".parquet")
    exclusions = Exclusions(dedup, predictions) if dedup else None
    for path in files:
        _keep_from_file(kept, fs, path, shown, cut, per_group, exclusions)
    images = _kept_images(fs, [r for groups in kept.values() for rows in groups.values() for r in rows])
    return {
        c: {
            g: [
                {"id": r[1], "path": r[2], "confidence": r[3], "image": images.get((r[4], r[5]))}
                for r in reversed(rows)
            ]
            for g, rows in groups.items()
        }
        for c, groups in kept.items()
    }


def _keep_from_file(kept: dict, fs, path: str, shown: int, cut: int, per_group: int, exclusions=None) -> None:
    """Merge one predictions file's candidates into ``kept`` (class -> group -> rows
    ``(key, id, path, confidence, file, row)``), keeping ``per_group`` rows per group."""
    t = pq.read_table(path, filesystem=fs, columns=["id", "path", "label", "confidence"])
    t = t.append_column("row", pa.array(np.arange(t.num_rows, dtype=np.int64)))  # to fetch kept images later
    if exclusions is not None:
        t = exclusions.drop(t, exclusions.ids_for(path))
    t = t.filter(pc.and_(pc.greater_equal(t["label"], 0), pc.less(t["label"], shown)))
    if t.num_rows == 0:
        return
    labels = t["label"].to_numpy()
    conf = t["confidence"].to_numpy()
    keys = sort_keys(conf, t["id"])
    order = np.lexsort((keys, labels))  # by class, then ascending rank
    labels, keys = labels[order], keys[order]
    ids, paths = t["id"].to_numpy(zero_copy_only=False)[order], t["path"].to_numpy(zero_copy_only=False)[order]
    conf, file_rows = conf[order], t["row"].to_numpy()[order]
    for c in np.unique(labels):
        lo, hi = np.searchsorted(labels, c, "left"), np.searchsorted(labels, c, "right")
        split = lo + np.searchsorted(keys[lo:hi], cut, "left")  # first row at or above the threshold
        picks = {
            GROUPS[0]: range(max(lo, hi - per_group), hi),
            GROUPS[1]: range(split, min(hi, split + per_group)),
            GROUPS[2]: range(max(lo, split - per_group), split),
        }
        for group, rows in picks.items():
            pool = kept[int(c)][group] + [
                (int(keys[i]), str(ids[i]), str(paths[i]), float(conf[i]), path, int(file_rows[i])) for i in rows
            ]
            pool.sort()
            kept[int(c)][group] = pool[:per_group] if group == GROUPS[1] else pool[-per_group:]


def _kept_images(fs, rows: list[tuple]) -> dict[tuple[str, int], bytes]:
    """The ``image`` bytes the labeler kept (``keep_image_bytes``) for the sampled rows, reading only
    the row groups that hold them: so shard and Parquet corpora get thumbnails too."""
    wanted: dict[str, set[int]] = {}
    for r in rows:
        wanted.setdefault(r[4], set()).add(r[5])
    out = {}
    for path, indices in wanted.items():
        pf = pq.ParquetFile(path, filesystem=fs)
        if "image" not in pf.schema_arrow.names:
            continue
        start = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            inside = sorted(i for i in indices if start <= i < start + n)
            if inside:
                column = pf.read_row_group(g, columns=["image"])["image"]
                out.update({(path, i): column[i - start].as_py() for i in inside})
            start += n
    return {k: v for k, v in out.items() if v is not None}


def sample_rejections(predictions: str, per_reason: int = 5) -> dict[str, dict]:
    """{reason: {"count": n, "examples": [the ``per_reason`` smallest ids]}}, streaming."""
    counts: Counter = Counter()
    examples: dict[str, list[str]] = {}
    fs, files = list_files(predictions, suffix=".parquet")
    for path in files:
        t = pq.read_table(path, filesystem=fs, columns=["id", "reject_reason"])
        t = t.filter(pc.is_valid(t["reject_reason"]))
        for reason in pc.unique(t["reject_reason"]).to_pylist():
            ids = t.filter(pc.equal(t["reject_reason"], reason))["id"]
            counts[reason] += len(ids)
            smallest = pc.take(ids, pc.array_sort_indices(ids)[:per_reason]).to_pylist()  # O(rows) per file
            examples[reason] = sorted(examples.get(reason, []) + smallest)[:per_reason]
    return {r: {"count": counts[r], "examples": examples[r]} for r in sorted(counts)}
