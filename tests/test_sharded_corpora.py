"""The JFT-shaped path: unlabeled corpora as WebDataset shards or Parquet, through the loop and
both training feeds. Before, a student failed in every worker: pseudo-labeled rows
carried the shard's path, which the trainer read as one image.

The teacher here is a random-weight checkpoint (training one adds nothing to these checks), so
the threshold is 0: every pseudo label passes and balancing decides the row count.
"""

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from core.model import load_spec
from pipeline.config import load_config
from pipeline.digits import write_digits_corpus
from pipeline.loop import run_loop
from tests.helpers import plant_teacher, random_checkpoint
from trainer.api import train_model
from trainer.data_check import TrainingDataError
from trainer.feed import augmented, pseudo_dataset
from trainer.settings import TrainSettings


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    paths = write_digits_corpus(str(root / "data"), labels_per_class=3, test_fraction=0.1, seed=0)
    names = sorted(os.listdir(paths["unlabeled"]))[:300]
    blobs = {n: open(os.path.join(paths["unlabeled"], n), "rb").read() for n in names}
    wds = root / "wds"
    wds.mkdir()
    for shard in range(3):
        with tarfile.open(wds / f"shard-{shard:04d}.tar", "w") as tar:
            for n in names[shard::3]:
                info = tarfile.TarInfo(n.replace(".png", ".image.png"))  # key digit_0123, extension image.png
                info.size = len(blobs[n])
                tar.addfile(info, io.BytesIO(blobs[n]))
    parquet = root / "parquet"
    parquet.mkdir()
    for part in range(2):
        chunk = names[part::2]
        pq.write_table(pa.table({"key": chunk, "image": [blobs[n] for n in chunk]}), parquet / f"part-{part}.parquet")
    return root, paths, {"webdataset": str(wds), "parquet": str(parquet)}, len(names)


def _loop(root, paths, unlabeled: str, name: str, extra=()) -> tuple:
    run = root / name
    overrides = [
        f"run_dir={run}", "runlocal=true", "balance.threshold=0.0", "student.epochs=1",
        f"data.labeled={paths['labeled']}", f"data.unlabeled={unlabeled}", "data.test=null", *extra,
    ]  # fmt: skip
    cfg = load_config("digits", overrides)
    spec = plant_teacher(cfg)  # a random teacher, as if trained: the loop starts from it
    summary = run_loop(cfg)
    return run, spec, summary


@pytest.fixture(scope="module")
def sharded_run(ray_local, digits):
    """``sharded_run(fmt)``: the loop on the corpus in that format, run once per module."""
    root, paths, corpora, _ = digits
    runs = {}

    def run(fmt: str) -> tuple:
        if fmt not in runs:
            runs[fmt] = _loop(root, paths, corpora[fmt], f"run_{fmt}")
        return runs[fmt]

    return run


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_students_train_from_shards(digits, sharded_run, fmt):
    images = digits[3]
    run, _, summary = sharded_run(fmt)
    manifest = json.loads((run / "round_1" / "labels" / "manifest.json").read_text())
    assert manifest["rows"] == manifest["labeled"] == images and manifest["rejected"] == 0
    stats = json.loads((run / "round_1" / "balance_stats.json").read_text())
    total = stats["total_rows"]  # a random teacher predicts few classes; each is filled or trimmed exactly
    assert total == stats["per_class"] * (10 - len(stats["empty_classes"])) >= 16
    table = pq.read_table(run / "round_1" / "balanced")
    assert pc.sum(table["copies"]).as_py() == total and table["image"].null_count == 0  # the images travel along

    # feed: memory, inside the loop: the student held exactly the balanced rows, none unreadable
    student = json.loads((run / "round_1" / "student" / "final.json").read_text())
    assert student["pseudo_rows"] == total and student["unreadable_pseudo"] == 0 == student["unreadable_labeled"]
    assert summary[1]["pseudo_rows"] == total and summary[1]["unreadable_pseudo"] == 0


def test_the_stream_feed_trains_on_a_balanced_set_from_shards(digits, sharded_run):
    """feed: ray_data on the balanced set of the WebDataset run (either format's is the same shape): the
    stream yields exactly the balanced rows, all decoded."""
    paths = digits[1]
    run, _, _ = sharded_run("webdataset")
    total = json.loads((run / "round_1" / "balance_stats.json").read_text())["total_rows"]
    balanced = str(run / "round_1" / "balanced")
    spec = load_spec(str(run / "round_1" / "student"))
    stream = augmented(pseudo_dataset(balanced, spec.num_classes, hard=False), vars(spec), 2, 9, 0.0)
    ok = np.concatenate([b["ok"] for b in stream.iter_batches(batch_format="numpy", batch_size=None)])
    assert len(ok) == total and ok.all()
    s = TrainSettings(epochs=1, batch_size=8, ratio=2, num_workers=1, feed="ray_data", warmup_epochs=0)
    out, storage = str(run / "stream"), str(run / "ray_train")
    final = train_model(s, spec, paths["labeled"], out, storage, "stream", pseudo=balanced)
    assert final["final"] and final["unreadable_pseudo"] == 0 and final["images"] == total // 16 * (8 + 16)


def test_a_mostly_unreadable_pseudo_set_fails_at_once_naming_file_and_reason(ray_local, digits, tmp_path):
    """Rows that point at a shard and carry no bytes (as labeling did before): a data error,
    raised in the driver before any worker starts, with the file and the reason."""
    _, paths, corpora, _ = digits
    shard = os.path.join(corpora["webdataset"], "shard-0000.tar")
    (tmp_path / "balanced").mkdir()
    pq.write_table(
        pa.table({"id": [f"shard-0000.tar/k{i}" for i in range(20)], "path": [shard] * 20, "label": [1] * 20,
                  "confidence": [0.9] * 20, "probs": [[0.1] * 10] * 20, "copies": [1] * 20}),
        tmp_path / "balanced" / "part-0.parquet",
    )  # fmt: skip
    spec = random_checkpoint(str(tmp_path / "ckpt"), image_size=16)
    s = TrainSettings(epochs=1, batch_size=8, ratio=1, num_workers=1)
    with pytest.raises(TrainingDataError, match=r"pseudo set is mostly unreadable: 20 of 20 .*shard-0000.tar/k0: "):
        train_model(s, spec, paths["labeled"], str(tmp_path / "out"), str(tmp_path / "ray"), "bad",
                    pseudo=str(tmp_path / "balanced"))  # fmt: skip
    assert not (tmp_path / "ray" / "bad").exists()  # no Ray Train run was started, so nothing was retried


def test_a_stream_feed_that_leaves_no_cpu_for_decoding_is_refused_up_front():
    """On a local cluster that cannot grow, workers holding every CPU leave decoding waiting forever."""
    from pipeline.loop import check_stream_cpus

    with pytest.raises(ValueError, match="2 CPUs and 2 workers x cpus_per_worker 1 take 2 of them"):
        check_stream_cpus(TrainSettings(feed="ray_data", num_workers=2, cpus_per_worker=1.0), 2.0)
    check_stream_cpus(TrainSettings(feed="ray_data", num_workers=2, cpus_per_worker=0.5), 2.0)
    check_stream_cpus(TrainSettings(feed="memory", num_workers=2, cpus_per_worker=1.0), 2.0)
