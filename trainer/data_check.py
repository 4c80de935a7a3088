"""Training images that cannot be read: counted, and a mostly unreadable set stops the run at once.

A data error is not a lost node: retrying it (Ray Train's ``FailureConfig``) only repeats it,
so it is caught before the trainer starts (:func:`preflight`, a sample of each set read in the
driver) or, found by the workers, written to a file that the driver turns into
:class:`TrainingDataError` after a clean stop (:func:`record_data_error`), never an exception
in a worker.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.images import READ_REASONS
from core.storage import delete_file, exists, list_files, read_bytes, write_bytes
from trainer.data import LabeledBatches, _decode_many, _rejections, list_class_folders, parquet_files, pseudo_sources

# stop when more than this share of a set's rows cannot be read or decoded
MAX_UNREADABLE_FRACTION = 0.5
SAMPLE_ROWS = 256  # rows of each set read by the driver before training starts


class TrainingDataError(ValueError):
    """A training set that is mostly unreadable; the message names the set, a file and the reason."""


def check_unreadable(name: str, unreadable: dict[str, int], rows: int, first: str) -> None:
    """Raise :class:`TrainingDataError` when more than MAX_UNREADABLE_FRACTION of ``rows`` failed.

    ``unreadable``: count per reject reason; ``first``: ``"<id>: <reason>"`` of one failure.
    """
    bad = sum(unreadable.values())
    if rows and bad / rows > MAX_UNREADABLE_FRACTION:
        hint = {
            "pseudo": "a balanced set must carry the image bytes (the loop labels with keep_image_bytes) or "
            "point at loose image files; re-run labeling and balancing with this version",
            "labeled": "check data.labeled: every file under a class folder must be an image",
        }.get(name, "check the input")
        raise TrainingDataError(
            f"the {name} set is mostly unreadable: {bad} of {rows} images could not be read or decoded "
            f"({unreadable}); for example {first}. This is a data error, so training stops instead of "
            f"retrying: {hint}."
        )


def check_image_set(name: str, data) -> None:
    """:func:`check_unreadable` of a decoded ``trainer.data.ImageSet`` (its rows plus those left out)."""
    check_unreadable(name, data.unreadable, len(data) + sum(data.unreadable.values()), data.first_unreadable)


def _sample_pseudo(balanced: str) -> pa.Table:
    """The first SAMPLE_ROWS rows of the balanced Parquet files, streamed (id, path, copies[, image])."""
    fs, files = list_files(balanced, suffix=".parquet")
    parts, n = [], 0
    for f in files:
        pf = pq.ParquetFile(f, filesystem=fs)
        cols = [c for c in ("id", "path", "copies", "image") if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=SAMPLE_ROWS, columns=cols):
            parts.append(pa.Table.from_batches([batch]).slice(0, SAMPLE_ROWS - n))
            n += parts[-1].num_rows
            break
        if n >= SAMPLE_ROWS:
            break
    return pa.concat_tables(parts) if parts else pa.table({"id": [], "path": [], "copies": []})


def preflight(labeled: str, pseudo: str | None, classes: list[str], image_size: int, in_chans: int) -> None:
    """Decode a sample of each training set in the driver; raise TrainingDataError before any
    worker starts when a sample is mostly unreadable (the first rows: files in sorted order)."""

    if not parquet_files(labeled):
        pairs = list_class_folders(labeled)[1][:SAMPLE_ROWS]
        _, reasons = _decode_many([u for u, _ in pairs], image_size, in_chans)
        check_unreadable("labeled", *_counts(reasons, [u for u, _ in pairs]))
    if pseudo:
        table = _sample_pseudo(pseudo)
        _, reasons = _decode_many(pseudo_sources(table), image_size, in_chans)
        check_unreadable("pseudo", *_counts(reasons, table.column("id").to_pylist()))


def preflight_val(val: str, classes: list[str], image_size: int, in_chans: int, label_column: str = "label") -> None:
    """The validation split's first rows must decode: an empty or unreadable split scores every epoch
    0 and would select a checkpoint at random.

    Raises:
        TrainingDataError: no image of the first SAMPLE_ROWS decodes (naming the reasons).
    """

    data = LabeledBatches(val, classes, image_size, in_chans, SAMPLE_ROWS, label_column=label_column)
    _, labels = next(iter(data), (None, []))
    if len(labels) == 0:
        reasons = dict(data.rejected) or "it holds no images"
        raise TrainingDataError(
            f"no image of the validation split {val} decodes ({reasons}), so checkpoints would be selected on "
            "nothing; fix the images, or point data.val elsewhere (or set data.val_fraction, or export: last)"
        )


def _counts(reasons: list, ids: list[str]) -> tuple[dict[str, int], int, str]:

    unreadable, first = _rejections(reasons, ids)
    return unreadable, len(reasons), first


def record_data_error(path: str, err: TrainingDataError) -> None:
    """Written by rank 0 of a training run that must stop for bad data (the workers then return)."""
    write_bytes(path, json.dumps({"error": str(err)}).encode())


def raise_recorded_error(path: str) -> None:
    """In the driver after ``fit()``: raise the error a worker recorded, if any."""
    if exists(path):
        raise TrainingDataError(json.loads(read_bytes(path))["error"])


def clear_recorded_error(path: str) -> None:
    """Remove an error recorded by an earlier run (:func:`record_data_error`), so it is not raised again."""
    if exists(path):
        delete_file(path)


def reason_codes() -> tuple[str, ...]:
    """Reject reasons as small integers, for tensors that carry them out of Ray Data tasks."""

    return ("", *READ_REASONS, "empty", "too_large", "not_an_image", "truncated", "undecodable", "unsupported_mode")


def reason_histogram(codes: np.ndarray) -> np.ndarray:
    """int64 (len(reason_codes()),) count of each :func:`reason_codes` index in ``codes``."""
    return np.bincount(np.asarray(codes, dtype=np.int64), minlength=len(reason_codes()))


def counts_by_reason(hist: np.ndarray) -> dict[str, int]:
    """``{reject reason: count}`` of a :func:`reason_histogram` (index 0, decoded rows, left out)."""
    names = reason_codes()
    return {names[i]: int(c) for i, c in enumerate(hist) if i and c}
