"""Confidence filtering and exact per-class balancing over a Ray Dataset of predictions.

Semantics (docs/outputs.md, "Balancing"), for each pseudo-label class c among rows with
``confidence >= threshold``:

* count >= N: keep exactly the N highest ranked rows (1 copy each);
* 0 < count < N: keep all, ``N // count`` copies each, plus one more for the
  ``N % count`` highest ranked; exactly N rows in total;
* count = 0: the class is reported in ``empty_classes``.

The output keeps every prediction column and adds ``copies`` (>= 1); rows with zero
copies are not written. The trainer repeats each row ``copies`` times, so it sees
exactly N rows per non-empty class. Passes: one for counts, a few (usually 1-3) that
refine each class's cut-off key, one that applies the plan; each reads only the
columns it needs, and nothing per row reaches the driver except the few rows that sit
in a class's final cut-off bucket.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from core.storage import canonical, filesystem_for, iter_tables, join, list_files, read_json, write_bytes
from labeler.dedup import Exclusions
from labeler.units import UNIT_COLUMN, unit_of
from pipeline.balance_core import (
    GATHER_LIMIT,
    KEY_BYTES,
    choose_bucket,
    class_histogram,
    copies_for,
    prefix_match,
    sort_keys,
)

logger = logging.getLogger(__name__)

STAT_COLUMNS = ["id", "label", "confidence", "reject_reason"]
APPLY_BATCH_ROWS = 8192  # predictions rows per record batch in a pass over files (a few MB with image bytes)


@dataclass
class BalancePlan:
    """Per class: base copies for every passing row, +1 for rows ranked at or above the cut."""

    num_classes: int
    per_class: int
    threshold: float
    base: np.ndarray
    cut_key: np.ndarray
    cut_id: list[str | None]  # None: every row with the cut key is kept; else those with id <= cut_id
    all_top: np.ndarray
    none_top: np.ndarray
    predictions: np.ndarray
    passing: np.ndarray
    top_rows: np.ndarray = None
    max_confidence: np.ndarray = None  # per class, over its predictions (0 when it has none)
    passes: int = 0
    stats: dict = field(default_factory=dict)


def _passing(table: pa.Table, threshold: float) -> pa.Table:
    ok = pc.and_(pc.is_null(table["reject_reason"]), pc.greater_equal(table["confidence"], threshold))
    return table.filter(ok)


def _count_batch(table: pa.Table, threshold: float, num_classes: int) -> dict:
    good = table.filter(pc.is_null(table["reject_reason"]))
    labels = good["label"].to_numpy()
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"predictions hold labels outside 0..{num_classes - 1}; pass the model's number of classes")
    passing = _passing(table, threshold)["label"].to_numpy()
    top = np.zeros(num_classes, np.float64)  # confidences are >= 0, so 0 stands for "no prediction"
    np.maximum.at(top, labels, good["confidence"].to_numpy().astype(np.float64))
    return {
        "predictions": np.bincount(labels, minlength=num_classes)[None, :],
        "passing": np.bincount(passing, minlength=num_classes)[None, :],
        "max_confidence": top[None, :],
    }


def _refine_batch(table: pa.Table, threshold, num_classes, prefix, level, refining, gathering, tying, cut_key):
    """One refinement pass over a batch: per-class byte histograms for ``refining`` classes,
    the keys of rows in the cut-off bucket for ``gathering`` classes, and the ids of rows
    whose key equals the cut key for ``tying`` classes (64-bit key collisions: rare)."""
    t = _passing(table, threshold)
    labels = t["label"].to_numpy().astype(np.int64)
    keys = sort_keys(t["confidence"].to_numpy(), t["id"])
    hist = class_histogram(labels, keys, prefix, level, refining, num_classes)
    cls, byte = np.nonzero(hist)
    g = gathering[labels] & prefix_match(keys, prefix[labels], level[labels])
    tie = tying[labels] & (keys == cut_key[labels])
    n_h, n_g, n_t = len(cls), int(g.sum()), int(tie.sum())
    tie_ids = t["id"].filter(pa.array(tie)).combine_chunks().cast(pa.string()) if n_t else pa.array([], pa.string())
    return pa.table(
        {
            "label": np.concatenate([cls, labels[g], labels[tie]]).astype(np.int64),
            "byte": np.concatenate([byte, np.full(n_g, -1), np.full(n_t, -2)]).astype(np.int64),
            "count": np.concatenate([hist[cls, byte], np.zeros(n_g + n_t, np.int64)]),
            "key": np.concatenate([np.zeros(n_h, np.uint64), keys[g], keys[tie]]),
            "id": pa.concat_arrays([pa.nulls(n_h + n_g, pa.string()), tie_ids]),
        }
    )


def _new_plan(predictions: np.ndarray, passing: np.ndarray, per_class: int, threshold: float, duplicate: bool):
    c = len(passing)
    plan = BalancePlan(
        c, per_class, threshold, np.zeros(c, np.int64), np.zeros(c, np.uint64),
        [None] * c, np.zeros(c, bool), np.zeros(c, bool), predictions, passing,
    )  # fmt: skip
    need = np.zeros(c, np.int64)
    for k, cnt in enumerate(passing):
        if cnt == 0:
            plan.none_top[k] = True
        elif cnt >= per_class:
            need[k] = per_class
            plan.all_top[k] = cnt == per_class
        elif not duplicate:
            plan.all_top[k] = True
        else:
            plan.base[k], need[k] = per_class // cnt, per_class % cnt
            plan.none_top[k] = need[k] == 0
    plan.top_rows = np.where(plan.all_top, passing, np.where(plan.none_top, 0, need))
    return plan, need


Runner = Callable[[Callable, dict], Iterator[dict]]


def ray_runner(ds: ray.data.Dataset) -> Runner:
    """Run each pass as ``map_batches`` over a Ray Dataset; the driver sums the small outputs."""

    def run(fn, kwargs):
        out = ds.map_batches(fn, batch_format="pyarrow", fn_kwargs=kwargs)
        yield from out.iter_batches(batch_format="numpy", batch_size=None)

    return run


def _as_numpy(out: dict | pa.Table) -> dict:
    return out if isinstance(out, dict) else {c: out[c].to_numpy(zero_copy_only=False) for c in out.column_names}


def _stream_file(fs, path: str, fn, kwargs: dict, batch_rows: int, exclusions=None) -> Iterator[dict]:
    """``fn`` on each record batch of one predictions file's :data:`STAT_COLUMNS`
    (:func:`core.storage.iter_tables`: one batch in memory; an empty file gives one empty output),
    without the rows ``exclusions`` (a ``labeler.dedup.Exclusions``) names for the file."""

    excluded = exclusions.ids_for(path) if exclusions is not None else None
    for table in iter_tables(fs, path, batch_rows, STAT_COLUMNS):
        if excluded is not None:
            table = exclusions.drop(table, excluded)
        yield _as_numpy(fn(table, **kwargs))


def _exclusions(folder: str | None, predictions: str):
    """The ``labeler.dedup.Exclusions`` of a dedup run at ``folder`` over ``predictions`` (None: none)."""

    return Exclusions(folder, predictions) if folder else None


def parquet_runner(path: str, batch_rows: int = 1 << 18, exclusions: str | None = None) -> Runner:
    """Run each pass in this process, streaming Parquet files one record batch at a time (no Ray).

    Files are opened one after another without pre-buffering, so memory stays at about one
    row group whatever the number of files. ``exclusions``: a ``labeler.dedup`` output folder whose
    excluded rows the passes skip.
    """

    fs, files = list_files(path, suffix=".parquet")
    excluded = _exclusions(exclusions, path)

    def run(fn, kwargs):
        for f in files:
            yield from _stream_file(fs, f, fn, kwargs, batch_rows, excluded)

    return run


def _pass_on_files(batch: dict, fn, kwargs: dict, predictions: str, batch_rows: int, exclusions=None) -> dict:
    """A :func:`files_runner` task: ``fn`` over each file in ``batch`` (one), its small outputs joined."""

    fs, _ = filesystem_for(predictions)
    excluded = _exclusions(exclusions, predictions)
    outs = [o for f in batch["file"] for o in _stream_file(fs, str(f), fn, kwargs, batch_rows, excluded)]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def files_runner(predictions: str, batch_rows: int = APPLY_BATCH_ROWS, exclusions: str | None = None) -> Runner:
    """Run each pass as a Ray Data job with one task per predictions file, each streaming its file a
    record batch at a time (as the apply pass, :func:`write_balanced`, does); the driver sums the small
    outputs. Ray Data's ``read_parquet`` packs many files into one read task, and the largest worker of
    the counting and refinement passes grew with the corpus: 165 MB at 100k images, 399 MB at 1M
    (``benchmarks/scale_run.py``'s predictions, balancing alone in one Ray session). ``exclusions``: a
    ``labeler.dedup`` output folder whose excluded rows the passes skip."""

    _, files = list_files(predictions, suffix=".parquet")
    if not files:
        raise FileNotFoundError(f"no predictions Parquet files under {predictions}")
    items = [{"file": f} for f in files]

    def run(fn, kwargs):
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        out = ds.map_batches(
            _pass_on_files,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={
                "fn": fn,
                "kwargs": kwargs,
                "predictions": predictions,
                "batch_rows": batch_rows,
                "exclusions": exclusions,
            },
        )
        yield from out.iter_batches(batch_format="numpy", batch_size=None)

    return run


def plan_balance(
    data: ray.data.Dataset | Runner, num_classes: int, per_class: int, threshold: float = 0.3, duplicate: bool = True
) -> BalancePlan:
    """Count, then find each class's exact cut-off with histogram refinement passes.

    ``data``: predictions with ``id`` (str), ``label`` (int, 0..num_classes-1), ``confidence``
    (float32 top probability, 0..1) and ``reject_reason`` (null for a prediction) columns, as a Ray
    Dataset or a :data:`Runner` (:func:`parquet_runner` runs in this process, :func:`files_runner` a
    Ray task per file). ``threshold``: the
    confidence filter (Xie et al. 2020, section 3: 0.3 on ImageNet); ``per_class``: N, the rows
    every non-empty class gets (the paper's 130K on ImageNet); ``duplicate=False`` only trims
    classes above N. The semantics are the module docstring's (exact and deterministic, unlike the
    reference code's per-class confidence histograms and stochastic rounding of copies). Memory: classes x
    (256 + GATHER_LIMIT), never per row.

    Raises:
        ValueError: ``per_class`` < 1, ``threshold`` outside [0, 1], or a label outside 0..num_classes-1.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, not {per_class}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within [0, 1], not {threshold}")
    run = ray_runner(data) if isinstance(data, ray.data.Dataset) else data
    pred, passing, top = _count_pass(run, num_classes, threshold)
    plan, need = _new_plan(pred, passing, per_class, threshold, duplicate)
    plan.max_confidence = top
    todo = ~(plan.all_top | plan.none_top)
    logger.info(f"balancing: counting pass done: {int(pred.sum())} predictions, {int(passing.sum())} pass the "
                f"threshold; {int(todo.sum())} classes need a cut-off")  # fmt: skip
    cut = _CutSearch(num_classes, passing)
    while todo.any():
        started = time.time()
        cut.refine(run, plan, need, todo)
        logger.info(f"balancing: refinement pass {plan.passes} in {time.time() - started:.0f} s, "
                    f"{int(todo.sum())} classes left")  # fmt: skip
    plan.stats = balance_stats(plan)
    return plan


def _count_pass(run: Runner, num_classes: int, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: predictions, predictions passing ``threshold`` (int64) and the top confidence (float64)."""
    pred, passing = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64)
    top = np.zeros(num_classes, np.float64)
    for b in run(_count_batch, {"threshold": threshold, "num_classes": num_classes}):
        pred += b["predictions"].sum(axis=0)
        passing += b["passing"].sum(axis=0)
        top = np.maximum(top, b["max_confidence"].max(axis=0))
    return pred, passing, top


class _CutSearch:
    """The state of the cut-off search across refinement passes, per class: the key prefix chosen so
    far and its length in bytes, the rows still matching it, and whether the class is down to
    breaking a tie of equal keys by id."""

    def __init__(self, num_classes: int, passing: np.ndarray):
        self.num_classes = num_classes
        self.prefix, self.level = np.zeros(num_classes, np.uint64), np.zeros(num_classes, np.int64)
        self.bucket = passing.copy()  # rows of each class that match its current prefix
        self.tying = np.zeros(num_classes, bool)

    def refine(self, run: Runner, plan: BalancePlan, need: np.ndarray, todo: np.ndarray) -> None:
        """One pass over the data: refine, gather or tie-break each class in ``todo``; updates ``plan``,
        ``need`` (rows still to rank at the cut) and ``todo`` (classes whose cut is not found yet)."""
        gathering = todo & ~self.tying & ((self.bucket <= GATHER_LIMIT) | (self.level >= KEY_BYTES))
        refining = todo & ~self.tying & ~gathering
        kwargs = {"threshold": plan.threshold, "num_classes": self.num_classes, "prefix": self.prefix.copy(),
                  "level": self.level.copy(), "refining": refining, "gathering": gathering,
                  "tying": self.tying.copy(), "cut_key": plan.cut_key.copy()}  # fmt: skip
        hist, keys, tie_ids = self._collect(run, kwargs, gathering)
        plan.passes += 1
        for k in np.flatnonzero(refining):
            byte, above, in_bucket = choose_bucket(hist[k], int(need[k]))
            need[k] -= above
            self.prefix[k] = (self.prefix[k] << np.uint64(8)) | np.uint64(byte)
            self.level[k] += 1
            self.bucket[k] = in_bucket
        for k, parts in keys.items():
            ranked = np.sort(np.concatenate(parts))[::-1]
            cut = ranked[need[k] - 1]
            above, tied = int((ranked > cut).sum()), int((ranked == cut).sum())
            plan.cut_key[k] = cut
            if above + tied == need[k]:
                todo[k] = False  # every row with the cut key is in: no id tie-break needed
            else:
                need[k] -= above
                self.tying[k] = True
        for k, ids in tie_ids.items():
            plan.cut_id[k] = sorted(ids)[need[k] - 1]
            todo[k] = self.tying[k] = False

    def _collect(self, run: Runner, kwargs: dict, gathering: np.ndarray) -> tuple[np.ndarray, dict, dict]:
        """Sum one pass's batch outputs: byte histograms (classes, 256), gathered keys and tied ids per class."""
        hist = np.zeros((self.num_classes, 256), np.int64)
        keys: dict[int, list] = {int(k): [] for k in np.flatnonzero(gathering)}
        tie_ids: dict[int, list] = {int(k): [] for k in np.flatnonzero(self.tying)}
        for b in run(_refine_batch, kwargs):
            h = b["byte"] >= 0
            np.add.at(hist, (b["label"][h], b["byte"][h]), b["count"][h])
            g = b["byte"] == -1
            for lab in np.unique(b["label"][g]):
                keys[int(lab)].append(b["key"][g][b["label"][g] == lab])
            t = b["byte"] == -2
            for lab, id_ in zip(b["label"][t], b["id"][t]):
                tie_ids[int(lab)].append(str(id_))
        return hist, keys, tie_ids


def apply_batch(table: pa.Table, plan: BalancePlan) -> pa.Table:
    """The apply pass on one batch: passing rows with their ``copies`` (zero-copy rows dropped)."""
    t = _passing(table, plan.threshold)
    labels = t["label"].to_numpy().astype(np.int64)
    copies = copies_for(labels, sort_keys(t["confidence"].to_numpy(), t["id"]), t["id"], plan)
    t = t.append_column("copies", pa.array(copies, pa.int64()))
    return t.filter(pc.greater(t["copies"], 0))


def apply_balance(ds: ray.data.Dataset, plan: BalancePlan) -> ray.data.Dataset:
    """Stateless streaming pass: each passing row gets its ``copies``; zero-copy rows are dropped."""
    return ds.map_batches(apply_batch, batch_format="pyarrow", fn_kwargs={"plan": plan})


def _apply_files(
    batch: dict, plan: BalancePlan, predictions: str, balanced: str, batch_rows: int, exclusions: str | None = None
) -> dict:
    """Apply-pass task: each predictions file in ``batch`` (usually one) is streamed a record batch at a
    time through :func:`apply_batch` into its own balanced file (``part-<index>.parquet``, one row group
    per batch); nothing of a file is held beyond one batch. Returns the rows written per file."""
    import pyarrow.parquet as pq

    fs, _ = filesystem_for(predictions)
    ofs, opath = filesystem_for(balanced)
    excluded = _exclusions(exclusions, predictions)
    written = []
    for index, path in zip(batch["index"], batch["file"]):
        rows, writer, sink = 0, None, None
        unit = unit_of(str(path))
        ids = excluded.ids_for(str(path)) if excluded is not None else None
        try:
            for table in iter_tables(fs, str(path), batch_rows):
                if ids is not None:
                    table = excluded.drop(table, ids)
                if unit is not None and UNIT_COLUMN not in table.column_names:  # a hive partition column
                    table = table.append_column(UNIT_COLUMN, pa.array([unit] * table.num_rows, pa.string()))
                out = apply_batch(table, plan)
                if out.num_rows == 0:
                    continue
                if writer is None:
                    sink = ofs.open_output_stream(f"{opath}/part-{int(index):06d}.parquet")
                    writer = pq.ParquetWriter(sink, out.schema)
                writer.write_table(out)
                rows += out.num_rows
        finally:
            if writer is not None:
                writer.close()
                sink.close()
        written.append(rows)
    return {"rows": np.array(written, np.int64)}


def write_balanced(
    predictions: str,
    plan: BalancePlan,
    balanced: str,
    batch_rows: int = APPLY_BATCH_ROWS,
    exclusions: str | None = None,
) -> int:
    """The apply pass as a Ray Data job with one task per predictions file, each writing its own balanced
    file: a task holds one record batch, whatever the corpus size (predictions files are one per input
    unit, so bounded by the unit size). Ray Data's ``read_parquet(...).write_parquet`` instead packs
    many files into one fused read->write task whose writer first collects every block of the task
    (``ParquetDatasink.write``: ``list(blocks)``), so its memory grew with the corpus. Returns the rows
    written (rows with copies > 0). ``exclusions``: a ``labeler.dedup`` output folder whose excluded rows
    are left out."""

    _, files = list_files(predictions, suffix=".parquet")
    ofs, opath = filesystem_for(balanced)
    ofs.create_dir(opath, recursive=True)
    items = [{"index": i, "file": f} for i, f in enumerate(files)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    out = ds.map_batches(
        _apply_files,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={
            "plan": plan,
            "predictions": predictions,
            "balanced": balanced,
            "batch_rows": batch_rows,
            "exclusions": exclusions,
        },
    )
    return int(sum(b["rows"].sum() for b in out.iter_batches(batch_format="numpy", batch_size=None)))


def balance_stats(plan: BalancePlan) -> dict:
    """``balance_stats.json``: per class (``classes``, a list indexed by class) the predictions, the
    rows passing the threshold, the rows after balancing (``final``), the cut-off confidence and the top
    confidence; ``empty_classes``, ``total_rows`` (sum of copies) and ``refinement_passes``."""
    classes = []
    for k in range(plan.num_classes):
        cut = None
        if not (plan.all_top[k] or plan.none_top[k]):
            cut = float(np.array([int(plan.cut_key[k]) >> 32], np.uint32).view(np.float32)[0])
        n = int(plan.passing[k])
        final = plan.per_class if plan.base[k] > 0 else min(n, plan.per_class)
        top = float(plan.max_confidence[k]) if plan.predictions[k] else None
        classes.append({
            "class": k, "predictions": int(plan.predictions[k]), "passing": n, "max_confidence": top,
            "cutoff_confidence": cut, "base_copies": int(plan.base[k]), "rows_with_extra_copy": int(plan.top_rows[k]),
            "final": final,
        })  # fmt: skip
    return {
        "threshold": plan.threshold,
        "per_class": plan.per_class,
        "refinement_passes": plan.passes,
        "total_rows": sum(c["final"] for c in classes),
        "empty_classes": [c["class"] for c in classes if c["passing"] == 0],
        "classes": classes,
    }


class NothingPassed(ValueError):
    """No prediction reached the confidence threshold: every class is empty, there is no student to train."""


def check_something_passed(stats: dict) -> None:
    """Raise :class:`NothingPassed`, saying how many passed and what to change, when no row survived."""
    if stats["total_rows"] > 0:
        return
    predictions = sum(c["predictions"] for c in stats["classes"])
    if predictions == 0:
        excluded = stats.get("dedup", {}).get("excluded", 0)
        if excluded:
            raise NothingPassed(
                f"balancing found no labeled prediction left: near-duplicate detection excluded {excluded:,} (see "
                "dedup/dedup_stats.json and the report's pairs); if they are not copies of evaluation images, lower "
                "dedup.max_distance, or set dedup.keep_one_per_group=false"
            )
        raise NothingPassed(
            "balancing found no labeled prediction at all (every image was rejected; see the labeling "
            "manifest's reject_reasons and rejected.parquet), so there is nothing to train a student on"
        )
    top = max(c["max_confidence"] or 0.0 for c in stats["classes"])
    raise NothingPassed(
        f"0 of {predictions:,} pseudo labels reached the confidence threshold {stats['threshold']} "
        f"(the most confident was {top:.3f}), so every class is empty and there is nothing to train a "
        f"student on. Lower balance.threshold below {top:.3f} (`noisy-student balance --threshold`; in a run, "
        "with --overwrite: predictions below the old threshold kept no image bytes, so labeling is redone), or "
        "make the teacher stronger "
        "(more labeled images or teacher.epochs)."
    )


def balance_predictions(
    predictions: str,
    out: str,
    num_classes: int,
    per_class: int,
    threshold: float = 0.3,
    duplicate: bool = True,
    dedup: str | None = None,
) -> dict:
    """Read predictions Parquet, write the balanced set to ``out/balanced`` and ``out/balance_stats.json``.

    ``dedup``: the folder of a ``labeler.dedup.find_duplicates`` run over ``predictions``: the rows it
    excluded (near-duplicates of evaluation images; duplicates inside the corpus) are left out of every
    pass, before the confidence filter, and its ``dedup_stats.json`` is copied into the stats as ``dedup``.

    Raises:
        NothingPassed: (a ValueError) no prediction reached ``threshold``; nothing is written, so a
            run with a lower threshold starts balancing afresh.
        FileNotFoundError: ``predictions`` holds no Parquet file.
        ValueError: ``dedup`` was made over other predictions.
    """

    found = _dedup_stats(dedup, predictions) if dedup else None
    runner = files_runner(predictions, exclusions=dedup)
    plan = plan_balance(runner, num_classes, per_class, threshold, duplicate)
    if found:
        plan.stats["dedup"] = found
    check_something_passed(plan.stats)
    logger.info("balancing: writing the balanced set (apply pass)")
    write_balanced(predictions, plan, join(out, "balanced"), exclusions=dedup)
    write_bytes(join(out, "balance_stats.json"), json.dumps(plan.stats, indent=2).encode())
    write_bytes(join(out, "class_counts.png"), plot_class_counts(plan.stats))
    return plan.stats


def _dedup_stats(dedup: str, predictions: str) -> dict:
    """A near-duplicate run's stats, once it is seen to have been made over ``predictions``.

    Raises:
        FileNotFoundError: ``dedup`` holds no ``dedup_stats.json``. ValueError: it was made over other rows.
    """

    stats = read_json(join(dedup, "dedup_stats.json"))
    if stats.get("predictions") != canonical(predictions):
        raise ValueError(
            f"{dedup} holds the near-duplicates of {stats.get('predictions')}, not of {canonical(predictions)}: its "
            "exclusions name rows of other files. Run labeler dedup with --input set to the labeler output that "
            "holds these predictions"
        )
    return stats


def plot_class_counts(stats: dict) -> bytes:
    """PNG: per-class counts before (predictions, passing the threshold) and after balancing."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = stats["classes"]
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(6, min(16, len(classes) * 0.4)), 3.5))
    style = {"drawstyle": "steps-mid"} if len(classes) > 50 else {"marker": "o"}
    series = (("predictions", "predicted"), ("passing", f"confidence >= {stats['threshold']}"), ("final", "balanced"))
    for key, name in series:
        ax.plot(x, [c[key] for c in classes], label=name, **style)
    ax.set_xlabel("class")
    ax.set_ylabel("images")
    ax.set_title(f"class counts before and after balancing (target {stats['per_class']} per class)")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
