"""The streaming feed (feed: ray_data): decode + RandAugment in Ray Data tasks, shards per worker."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from labeler.model import ModelSpec
from pipeline.digits import write_digits_corpus
from trainer.api import streaming_datasets, train_model
from trainer.feed import _expand, decode_and_augment
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


def test_expand_repeats_rows_by_their_copies(corpus):
    _, balanced = corpus
    out = _expand(pq.read_table(balanced), 10, hard=True, balanced=balanced)
    assert len(out["path"]) == len(out["target"]) == 60
    assert out["path"][1] == out["path"][2] and out["target"].sum(axis=1).tolist() == [1.0] * 60


def test_decode_and_augment_drops_bad_images_and_smooths(corpus, tmp_path):
    paths, _ = corpus
    good = os.path.join(paths["test"], "3", sorted(os.listdir(os.path.join(paths["test"], "3")))[0])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    batch = {"path": np.array([good, str(bad), good], dtype=object), "target": np.eye(10, dtype=np.float32)[[3, 1, 3]]}
    spec = {"image_size": 16, "in_chans": 3, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    out = decode_and_augment(batch, spec, ops=2, magnitude=9, smoothing=0.1)
    assert out["image"].shape == (2, 3, 16, 16) and out["image"].dtype == np.float32
    assert out["target"][:, 3].tolist() == pytest.approx([0.91, 0.91])


def test_streaming_training_run(ray_local, corpus, tmp_path):
    paths, balanced = corpus
    s = TrainSettings(epochs=2, batch_size=8, ratio=2, num_workers=1, feed="ray_data", warmup_epochs=0)
    datasets, steps = streaming_datasets(s, SPEC, paths["labeled"], balanced, hard=False)
    assert set(datasets) == {"labeled", "pseudo", "clean"} and steps == 60 // 16
    final = train_model(s, SPEC, paths["labeled"], str(tmp_path / "out"), str(tmp_path / "ray"), "stream",
                        pseudo=balanced, test=paths["test"])  # fmt: skip
    assert final["final"] and final["epoch"] == 2 and 0.0 <= final["test_top1"] <= 1.0
    assert final["images_per_s"] > 0 and final["images"] == steps * (8 + 16)  # each step: b labeled + ratio x b
