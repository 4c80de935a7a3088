"""The loop's near-duplicate step: a round's predictions against its evaluation sets, before balancing.

The evaluation sets are the validation split (``data.val``, or the one carved from the labeled set), the
test split (``data.test``) and every ``eval.extra`` set; the labeled set is compared too, for the count
of exact duplicates. Each is hashed with a Ray Data job (:func:`labeler.dedup.collect_hashes`: an
evaluation set is small next to the corpus), then :func:`labeler.dedup.find_duplicates` compares every
prediction with them and writes ``round_<i>/dedup/``, whose exclusions balancing applies.
"""

from __future__ import annotations

import logging

import pyarrow as pa
from omegaconf import DictConfig

from labeler.api import LabelOptions
from labeler.dedup import collect_hashes, find_duplicates
from labeler.storage import absolute, join, list_files, uri_of
from trainer.data import parquet_source_column

logger = logging.getLogger(__name__)

__all__ = ["eval_sets", "hash_labeled_set", "run_dedup"]


def eval_sets(cfg: DictConfig, data: dict) -> dict[str, str]:
    """The evaluation sets a round's predictions are compared with, by name: ``val``, ``test`` and
    ``extra/<name>`` (``data``: ``pipeline.loop.prepare_data``'s splits, the carved validation included)."""
    sets = {name: data[name] for name in ("val", "test") if data.get(name)}
    sets.update({f"extra/{name}": absolute(uri) for name, uri in cfg.eval.extra.items()})
    return sets


def hash_labeled_set(root: str) -> pa.Table:
    """The (id, path, phash, reject_reason) rows of a labeled set: class folders, Parquet files with image
    bytes, or Parquet file lists (``path`` column, as the carved validation split is written)."""
    fs, files = list_files(root, suffix=".parquet")
    if not files:
        return collect_hashes(root, LabelOptions(format="folder"))
    if parquet_source_column(root) == "image":
        return collect_hashes(root, LabelOptions(format="parquet"))
    tables = [collect_hashes(uri_of(fs, f), LabelOptions(format="manifest")) for f in files]
    return pa.concat_tables(tables)


def run_dedup(cfg: DictConfig, data: dict, predictions: str, folder: str) -> dict:
    """Compare ``predictions`` with the evaluation sets and the labeled set; write ``folder`` (the exclusions,
    ``dedup_stats.json``, ``pairs.json``) and return the stats (``labeler.dedup.find_duplicates``)."""
    sets = eval_sets(cfg, data)
    logger.info(f"dedup: hashing the evaluation sets ({', '.join(sets) or 'none'}) and the labeled set")
    hashed = {name: hash_labeled_set(uri) for name, uri in sets.items()}
    labeled = hash_labeled_set(data["labeled"]).select(["phash"])  # what models train on (less a carved split)
    _, files = list_files(predictions, suffix=".parquet")
    logger.info(f"dedup: comparing {len(files)} predictions files with {sum(t.num_rows for t in hashed.values())} "
                f"evaluation images (max distance {cfg.dedup.max_distance} bits)")  # fmt: skip
    stats = find_duplicates(predictions, hashed, folder, labeled, cfg.dedup.max_distance, cfg.dedup.keep_one_per_group)
    return stats


def dedup_folder(round_dir: str) -> str:
    """Where a round's dedup output is written."""
    return join(round_dir, "dedup")
