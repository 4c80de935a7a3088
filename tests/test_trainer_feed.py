"""The streaming feed (feed: ray_data): decode + RandAugment in Ray Data tasks, shards per worker."""

import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.model import ModelSpec
from pipeline.digits import write_digits_corpus
from trainer.api import streaming_datasets, train_model
from trainer.data_check import counts_by_reason, reason_histogram
from trainer.feed import _pseudo_rows, decode_and_augment
from trainer.settings import TrainSettings

SPEC = ModelSpec("test_resnet", [str(i) for i in range(10)], 16, mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("feed")
    paths = write_digits_corpus(str(root / "data"), labels_per_class=4, test_fraction=0.2, seed=0)
    files = sorted(os.listdir(paths["unlabeled"]))[:40]
    probs = np.random.default_rng(0).dirichlet(np.ones(10), size=len(files)).astype(np.float32)
    table = pa.table({
        "id": files, "path": [os.path.join(paths["unlabeled"], f) for f in files],
        "label": probs.argmax(1), "confidence": probs.max(1), "probs": list(probs),
        "copies": np.array([1, 2] * 20, dtype=np.int32),
    })  # fmt: skip
    os.makedirs(root / "balanced")
    pq.write_table(table, root / "balanced" / "part-0.parquet")
    return paths, str(root / "balanced")


SPEC_DICT = {"image_size": 16, "in_chans": 3, "mean": (0.5,) * 3, "std": (0.5,) * 3}


def _run(batch, **kwargs) -> dict:
    """decode_and_augment's output chunks, joined."""
    parts = list(decode_and_augment(batch, SPEC_DICT, **{"ops": 2, "magnitude": 9, "smoothing": 0.0, **kwargs}))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_pseudo_rows_expand_by_their_copies_after_one_decode(corpus):
    _, balanced = corpus
    rows = _pseudo_rows(pq.read_table(balanced), 10, hard=True)
    assert len(rows["path"]) == len(rows["target"]) == 40 and rows["copies"].sum() == 60
    random.seed(0)  # timm's RandAugment draws from Python's RNG: two copies can draw the same no-op ops
    out = _run(rows)
    assert len(out["image"]) == len(out["target"]) == 60 and out["ok"].all()
    assert (out["target"][1] == out["target"][2]).all() and out["target"].sum(axis=1).tolist() == [1.0] * 60
    # rows with copies=2 come out as adjacent pairs (1,2), (4,5), ...: each copy draws its own noise
    pairs = [(i, i + 1) for i in range(1, 60, 3)]
    differ = sum(not np.array_equal(out["image"][a], out["image"][b]) for a, b in pairs)
    assert (out["target"][[a for a, _ in pairs]] == out["target"][[b for _, b in pairs]]).all()
    assert differ >= len(pairs) * 3 // 4, f"only {differ} of {len(pairs)} copy pairs differ"


def test_decode_and_augment_keeps_bad_rows_flagged_and_smooths(corpus, tmp_path):
    paths, _ = corpus
    good = os.path.join(paths["test"], "3", sorted(os.listdir(os.path.join(paths["test"], "3")))[0])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    batch = {"path": np.array([good, str(bad), good, str(tmp_path / "gone.png")], dtype=object),
             "target": np.eye(10, dtype=np.float32)[[3, 1, 3, 2]]}  # fmt: skip
    out = _run(batch, smoothing=0.1)
    assert out["image"].shape == (4, 3, 16, 16) and out["image"].dtype == np.float32
    assert out["ok"].tolist() == [1, 0, 1, 0]
    assert counts_by_reason(reason_histogram(out["reason"])) == {"not_an_image": 1, "unreadable": 1}
    assert out["target"][[0, 2], 3].tolist() == pytest.approx([0.91, 0.91])


def test_bytes_in_the_balanced_set_are_read_instead_of_the_path(corpus, tmp_path):
    """A pseudo row from a .tar shard has the shard as its path: the kept bytes are what the feed reads."""
    paths, _ = corpus
    good = os.path.join(paths["test"], "3", sorted(os.listdir(os.path.join(paths["test"], "3")))[0])
    with open(good, "rb") as f:
        data = f.read()
    batch = {"path": np.array([str(tmp_path / "shard.tar"), good], dtype=object),
             "image": np.array([data, None], dtype=object), "target": np.eye(10, dtype=np.float32)[[3, 3]]}  # fmt: skip
    out = _run(batch, ops=0)
    assert out["ok"].tolist() == [1, 1] and np.array_equal(out["image"][0], out["image"][1])


def test_streaming_training_run(ray_local, corpus, tmp_path):
    paths, balanced = corpus
    s = TrainSettings(epochs=2, batch_size=8, ratio=2, num_workers=1, feed="ray_data", warmup_epochs=0)
    datasets, steps = streaming_datasets(s, SPEC, paths["labeled"], balanced, hard=False)
    assert set(datasets) == {"labeled", "pseudo", "clean"} and steps == 60 // 16
    final = train_model(s, SPEC, paths["labeled"], str(tmp_path / "out"), str(tmp_path / "ray"), "stream",
                        pseudo=balanced, val=paths["test"])  # fmt: skip
    # with a validation split the best epoch is exported, not necessarily the last: both epochs ran
    assert final["last_epoch"] == 2 and final["epoch"] == final["exported_epoch"] in (1, 2)
    assert 0.0 <= final["val_top1"] <= 1.0
    assert final["images_per_s"] > 0 and final["images"] == steps * (8 + 16)  # each step: b labeled + ratio x b
    assert final["unreadable_labeled"] == 0 and final["unreadable_pseudo"] == 0


def test_a_stream_too_small_for_one_step_is_refused_before_training(ray_local, corpus):
    """It used to fail inside every worker ("the pseudo shard holds fewer than ...") and be retried."""
    paths, balanced = corpus
    s = TrainSettings(epochs=1, batch_size=8, ratio=10, num_workers=1, feed="ray_data")
    with pytest.raises(ValueError, match=r"80 \(batch_size 8 x ratio 10\), but the set holds 60"):
        streaming_datasets(s, SPEC, paths["labeled"], balanced, hard=False)


def test_pseudo_stream_decodes_in_short_tasks_whatever_the_file_size(ray_local, tmp_path):
    """A 1M-image balanced set (files of 150k rows) stalled: one task decoded a whole file while
    holding the only CPU left beside the training worker, so the labeled stream never got one.
    Blocks of at most DECODE_BATCH rows free that CPU between batches."""
    from trainer.feed import DECODE_BATCH, pseudo_dataset

    n = 5 * DECODE_BATCH + 7
    probs = np.random.default_rng(0).dirichlet(np.ones(10), size=n).astype(np.float32)
    table = pa.table({"id": [f"x{i}" for i in range(n)], "path": [f"/nowhere/x{i}.png" for i in range(n)],
                      "label": probs.argmax(1), "confidence": probs.max(1), "probs": list(probs),
                      "copies": np.ones(n, dtype=np.int32)})  # fmt: skip
    os.makedirs(tmp_path / "balanced")
    pq.write_table(table, tmp_path / "balanced" / "part-0.parquet")  # one file, one row group
    blocks = [b.num_rows for b in pseudo_dataset(str(tmp_path / "balanced"), 10, hard=False).iter_batches(
        batch_size=None, batch_format="pyarrow")]  # fmt: skip
    assert sum(blocks) == n and max(blocks) <= DECODE_BATCH and len(blocks) >= n // DECODE_BATCH
