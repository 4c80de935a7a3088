"""Evaluation streams: labeled sets read batch by batch, metrics as running sums (no Ray needed)."""

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core.model import load_checkpoint
from pipeline.corruptions import CORRUPTIONS, PERTURBATIONS, SEVERITIES, corrupt, perturbation_frames
from pipeline.model_eval import evaluate_model
from tests.helpers import png_bytes, random_checkpoint
from trainer.data import LabeledBatches, load_labeled
from trainer.evaluate import accuracy_metrics, evaluate, predict_logits
from trainer.loop import evaluate_test

SIZE = 16
CLASSES = [str(i) for i in range(10)]  # the model's classes; the sets below hold 0-3 (a subset, as allowed)


def _write_folders(root, per_class=(10, 11, 9, 10)) -> int:
    """Class folders 0..3 of RGB PNGs (not square, so the centre crop matters), one broken file and one
    hidden file; returns the number of good images."""
    seed = 0
    for c, n in enumerate(per_class):
        os.makedirs(root / str(c), exist_ok=True)
        for i in range(n):
            (root / str(c) / f"{i:02d}.png").write_bytes(png_bytes((20, 14), "RGB", seed=seed))
            seed += 1
    (root / "1" / "broken.png").write_bytes(b"not an image")
    (root / "0" / ".hidden.png").write_bytes(png_bytes((20, 14), "RGB", seed=999))
    return sum(per_class)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream") / "test"
    return root, _write_folders(root)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    directory = str(tmp_path_factory.mktemp("model"))
    random_checkpoint(directory, num_classes=len(CLASSES), image_size=SIZE)
    return directory


def _ece_whole_array(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """The whole-array ECE evaluation computed before it streamed (independent of CalibrationSums)."""
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    which = np.minimum((conf * bins).astype(int), bins - 1)
    return float(sum((which == b).mean() * abs(correct[which == b].mean() - conf[which == b].mean())
                     for b in range(bins) if (which == b).any()))  # fmt: skip


def _concat(stream):
    batches = list(stream)
    return batches, np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def test_class_folders_stream_in_batches_equal_to_the_whole_set(folders):
    root, good = folders
    stream = LabeledBatches(str(root), CLASSES, SIZE, batch=7)
    batches, images, labels = _concat(stream)
    assert [len(b[1]) for b in batches] == [7] * (good // 7) + [good % 7]  # full batches, then the rest
    assert all(b[0].dtype == np.uint8 and b[0].shape[1:] == (SIZE, SIZE, 3) and b[1].dtype == np.int64 for b in batches)
    whole = load_labeled(str(root), CLASSES, SIZE)
    assert np.array_equal(images, whole.images) and np.array_equal(labels, whole.targets.argmax(1))
    assert stream.rejected == {"not_an_image": 1}
    again = _concat(stream)[1]  # a second pass reads the set again, and counts afresh
    assert np.array_equal(again, images) and stream.rejected == {"not_an_image": 1}


def test_a_file_gone_since_the_listing_is_counted_unreadable(tmp_path):
    _write_folders(tmp_path, per_class=(3, 3))
    stream = LabeledBatches(str(tmp_path), CLASSES, SIZE, batch=4)
    os.remove(tmp_path / "0" / "01.png")
    assert len(_concat(stream)[2]) == 5 and stream.rejected == {"unreadable": 1, "not_an_image": 1}


def test_stream_rejects_unknown_classes_and_empty_batches(folders):
    root, _ = folders
    with pytest.raises(ValueError, match="does not know"):
        LabeledBatches(str(root), ["0", "1"], SIZE)
    with pytest.raises(ValueError, match="at least one image"):
        LabeledBatches(str(root), CLASSES, SIZE, batch=0)


def test_parquet_streams_record_batches_never_whole_tables(tmp_path, monkeypatch):
    blobs = [png_bytes((20, 14), "RGB", seed=i) for i in range(23)] + [b"broken"]
    labels = [i % 4 for i in range(24)]
    for part in range(2):  # two files, small row groups
        rows = slice(part * 12, (part + 1) * 12)
        table = pa.table({"image": blobs[rows], "label": labels[rows]})
        pq.write_table(table, tmp_path / f"part-{part}.parquet", row_group_size=5)
    whole = load_labeled(str(tmp_path), CLASSES, SIZE)

    def whole_table(*args, **kwargs):
        raise AssertionError("a whole Parquet table was read")

    monkeypatch.setattr(pq, "read_table", whole_table)
    monkeypatch.setattr(pq.ParquetFile, "read", whole_table)
    stream = LabeledBatches(str(tmp_path), CLASSES, SIZE, batch=7)
    batches, images, got = _concat(stream)
    assert [len(b[1]) for b in batches] == [7, 7, 7, 2]
    assert np.array_equal(images, whole.images) and np.array_equal(got, whole.targets.argmax(1))
    assert stream.rejected == {"not_an_image": 1}
    pq.write_table(pa.table({"image": blobs[:1], "label": [42]}), tmp_path / "part-2.parquet")
    with pytest.raises(ValueError, match="does not know"):  # found before any image is decoded
        LabeledBatches(str(tmp_path), CLASSES, SIZE)


def test_stream_memory_is_bounded_by_the_batch(tmp_path):
    """tracemalloc sees numpy's buffers: streaming peaks near two batches, the whole-set load at the set."""
    n, size = 120, 64
    _write_folders(tmp_path, per_class=(n // 2, n // 2))
    set_bytes = n * size * size * 3
    tracemalloc.start()
    try:
        for _ in LabeledBatches(str(tmp_path), CLASSES, size, batch=8):
            pass
        streamed = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        held = load_labeled(str(tmp_path), CLASSES, size)
        whole = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(held) == n and whole > set_bytes  # the measurement sees decoded images
    assert streamed < set_bytes / 4, (streamed, set_bytes)


def test_corruptions_and_perturbations_do_not_depend_on_the_batching():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 16, 16, 3)).astype(np.uint8)
    for name in CORRUPTIONS:
        for s in SEVERITIES:
            whole = corrupt(images, name, s, seed=3)
            parts = np.concatenate([corrupt(images[i : i + 5], name, s, seed=3, first_index=i) for i in (0, 5, 10)])
            assert np.array_equal(whole, parts), (name, s)
    for name in PERTURBATIONS:
        whole = list(perturbation_frames(images, name, frames=3, seed=3))
        tail = list(perturbation_frames(images[5:], name, frames=3, seed=3, first_index=5))
        assert all(np.array_equal(w[5:], t) for w, t in zip(whole, tail)), name
    noisy = corrupt(images, "gaussian_noise", 3, seed=3)
    assert not np.array_equal(noisy, corrupt(images, "gaussian_noise", 3, seed=4))
    assert not np.array_equal(noisy[0], corrupt(images[:1], "gaussian_noise", 3, seed=3, first_index=1)[0])


def test_streamed_evaluation_equals_the_whole_array_one(folders, checkpoint):
    """Batch 7 over 40 images (batches cross class boundaries, the last is partial) against the
    whole set decoded at once: top-1/5, loss and ECE as before; corruptions and flips as with one batch."""
    root, good = folders
    streamed = evaluate_model(checkpoint, str(root), extra={"again": str(root)}, seed=0, batch=7)
    model, spec = load_checkpoint(checkpoint)
    whole = load_labeled(str(root), spec.classes, spec.image_size)
    labels = whole.targets.argmax(1)
    logits = predict_logits(model, whole.images, spec, "cpu")
    expected = accuracy_metrics(logits, labels)
    assert streamed["test_top1"] == expected["test_top1"] and streamed["test_top5"] == expected["test_top5"]
    assert 0 < expected["test_top1"] < expected["test_top5"] < 1  # a set where the metrics can be wrong
    assert streamed["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-5)
    ece = _ece_whole_array(logits.softmax(dim=1).numpy(), labels)
    assert ece > 0 and streamed["test_ece"] == pytest.approx(ece, rel=1e-5)
    assert streamed["test_images"] == good and streamed["test_unreadable"] == 1
    assert streamed["test_reject_reasons"] == {"not_an_image": 1}
    assert streamed["extra"]["again"]["again_top1"] == expected["test_top1"]
    assert streamed["extra"]["again"]["again_unreadable"] == 1
    one_batch = evaluate_model(checkpoint, str(root), seed=0, batch=1000)
    assert streamed["corruption_errors"] == one_batch["corruption_errors"]
    assert streamed["flip_rates"] == pytest.approx(one_batch["flip_rates"])
    assert set(streamed["corruption_errors"]) == set(CORRUPTIONS)
    assert evaluate_model(checkpoint, str(root), seed=1, batch=7)["flip_rates"] != streamed["flip_rates"]


class _Events:
    """A progress sink with ProgressChannel's send(); the events land in a list."""

    def __init__(self):
        self.events = []

    def send(self, event, force=False):
        self.events.append(dict(event))


def test_evaluation_reports_its_progress_over_the_whole_set(folders, checkpoint):
    root, good = folders
    sink = _Events()
    evaluate_model(checkpoint, str(root), seed=0, batch=7, progress=sink)
    done = [e["done"] for e in sink.events]
    assert len(done) > 2 and done == sorted(done)  # one event a batch, growing
    assert done[-1] == sink.events[-1]["total"] == good + 1  # every image, the unreadable one counted


def test_a_set_knows_its_size_before_decoding(folders, tmp_path):
    root, good = folders
    assert len(LabeledBatches(str(root), CLASSES, SIZE, batch=4)) == good + 1
    table = pa.table({"image": [png_bytes(seed=i) for i in range(5)], "label": ["0", "1", "0", "1", "1"]})
    pq.write_table(table, tmp_path / "set.parquet", row_group_size=2)
    assert len(LabeledBatches(str(tmp_path / "set.parquet"), CLASSES, SIZE, batch=4)) == 5


def test_per_epoch_evaluation_streams_the_test_split(folders, checkpoint, tmp_path):
    root, good = folders
    model, spec = load_checkpoint(checkpoint)
    stream = LabeledBatches(str(root), spec.classes, spec.image_size, batch=7)
    held = evaluate(model, load_labeled(str(root), spec.classes, spec.image_size), spec, "cpu")
    got = evaluate(model, stream, spec, "cpu", batch=7)
    assert got["test_top1"] == held["test_top1"] and got["test_loss"] == pytest.approx(held["test_loss"], rel=1e-5)
    assert got["test_unreadable"] == 1
    model.train()
    both = evaluate_test(model, model, stream, spec, "cpu", batch=7)
    assert model.training  # the mode is restored
    assert both["raw_test_top1"] == both["test_top1"] == held["test_top1"]
    assert set(evaluate_test(model, None, stream, spec, "cpu")) == {
        f"test_{k}" for k in ("top1", "top5", "loss", "unreadable")
    }


def test_class_folders_stream_from_s3(s3, folders):
    """The same set uploaded to (moto's) S3 streams the same batches; reads go through a thread pool."""
    root, good = folders
    s3.client().create_bucket(Bucket="evalstream")
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            key = "test/" + os.path.relpath(path, root)
            s3.client().put_object(Bucket="evalstream", Key=key, Body=Path(path).read_bytes())
    stream = LabeledBatches("s3://evalstream/test", CLASSES, SIZE, batch=7)
    _, images, labels = _concat(stream)
    local = _concat(LabeledBatches(str(root), CLASSES, SIZE, batch=7))
    assert len(labels) == good and np.array_equal(images, local[1]) and np.array_equal(labels, local[2])
    assert stream.rejected == {"not_an_image": 1}  # the hidden file is skipped, not counted
