"""The loop's near-duplicate step: a round's predictions against its evaluation sets, before balancing.

The evaluation sets are the validation split (``data.val``, or the one carved from the labeled set), the
test split (``data.test``) and every ``eval.extra`` set; the labeled set is compared too, for the count
of exact duplicates. Each is hashed with a Ray Data job (:func:`labeler.dedup.collect_hashes`) once per run
and kept in ``run_dir/hashes/`` under its fingerprint (:func:`cached_hashes`); then
:func:`labeler.dedup.find_duplicates` compares every prediction with them and writes ``round_<i>/dedup/``,
whose exclusions balancing applies.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig

from core.fingerprint import record_digest, tree_fingerprint
from core.storage import absolute, canonical, exists, filesystem_for, join, list_files, uri_of
from labeler.api import LabelOptions
from labeler.dedup import DedupOptions, collect_hashes, find_duplicates
from pipeline.split import Splits
from trainer.data import parquet_source_column

logger = logging.getLogger(__name__)

__all__ = ["cached_hashes", "dedup_folder", "dedup_line", "eval_sets", "hash_labeled_set", "run_dedup"]


def eval_sets(cfg: DictConfig, data: Splits) -> dict[str, str]:
    """The evaluation sets a round's predictions are compared with, by name: ``val``, ``test`` and
    ``extra/<name>`` (``data``: ``pipeline.loop.prepare_data``'s splits, the carved validation included)."""
    sets = {name: getattr(data, name) for name in ("val", "test") if getattr(data, name)}
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


HASHES = "hashes"  # in run_dir: each compared set's hashes, named by its fingerprint, shared by every round


def cached_hashes(root: str, run_dir: str) -> pa.Table:
    """:func:`hash_labeled_set` of ``root``, read from ``run_dir/hashes/`` when a set with the same files (paths,
    sizes, modification times: ``core.fingerprint.tree_fingerprint``) was hashed before, else hashed and
    kept there: an ImageNet-sized labeled set is decoded once per run, not once per round."""
    key = {"uri": canonical(root), "hash": "phash-64", **tree_fingerprint(root)}
    path = join(run_dir, HASHES, f"{record_digest(key)}.parquet")
    if exists(path):
        fs, p = filesystem_for(path)
        return pq.read_table(p, filesystem=fs)
    table = hash_labeled_set(root)
    fs, p = filesystem_for(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, p, filesystem=fs)
    return table


def run_dedup(cfg: DictConfig, data: Splits, predictions: str, folder: str) -> dict:
    """Compare ``predictions`` with the evaluation sets and the labeled set (hashed once per run:
    :func:`cached_hashes`); write ``folder`` (the exclusions, ``dedup_stats.json``, ``pairs.json``) and return
    the stats (``labeler.dedup.find_duplicates``)."""
    sets = eval_sets(cfg, data)
    logger.info(f"dedup: hashing the evaluation sets ({', '.join(sets) or 'none'}) and the labeled set")
    hashed = {name: cached_hashes(uri, cfg.run_dir) for name, uri in sets.items()}
    labeled = cached_hashes(data.labeled, cfg.run_dir).select(["phash"])  # what models train on
    _, files = list_files(predictions, suffix=".parquet")
    logger.info(f"dedup: comparing {len(files)} predictions files with {sum(t.num_rows for t in hashed.values())} "
                f"evaluation images (max distance {cfg.dedup.max_distance} bits)")  # fmt: skip
    stats = find_duplicates(predictions, hashed, folder, labeled, cfg.dedup.max_distance, cfg.dedup.keep_one_per_group)
    return stats


def dedup_line(cfg: DictConfig) -> str:
    """What ``noisy-student check`` and the run's log say of the near-duplicate step's settings."""
    if not cfg.dedup.enabled:
        return "dedup: off (dedup.enabled=false): near-duplicates of evaluation images are not excluded"
    default = DedupOptions().max_distance
    note = "the default" if cfg.dedup.max_distance == default else f"the default is {default}, for photos"
    return f"dedup: unlabeled images within {cfg.dedup.max_distance} bits of an evaluation image are excluded ({note})"


def dedup_folder(round_dir: str) -> str:
    """Where a round's dedup output is written."""
    return join(round_dir, "dedup")
