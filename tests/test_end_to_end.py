"""The whole loop on a shrunk digits config: real Ray Data, real TorchTrainer with 2 workers."""

import base64
import io
import json
import os
import shutil
from html.parser import HTMLParser

import pyarrow.parquet as pq
import pytest
from PIL import Image

from labeler.model import ModelSpec, load_checkpoint
from pipeline.cli import main
from pipeline.corruptions import CORRUPTIONS
from pipeline.loop import _check_student_size
from tests.helpers import random_checkpoint


@pytest.fixture(scope="module")
def tiny_run(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    from pipeline.digits import write_digits_corpus

    paths = write_digits_corpus(str(tmp / "data"), labels_per_class=5, test_fraction=0.3, seed=0)
    unlabeled = tmp / "unlabeled"
    shutil.copytree(paths["unlabeled"], unlabeled)
    (unlabeled / "corrupt.png").write_bytes(b"\x89PNG not really")
    config = os.path.abspath("configs/digits.yaml")
    args = [
        "run", config, "run_dir=run", "runlocal=true",  # relative paths, as users type them
        "data.labeled=data/labeled", "data.unlabeled=unlabeled", "data.test=data/test",
        "eval.extra={test_again: data/test}",
    ]  # fmt: skip
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        assert main(args) == 0
    finally:
        os.chdir(cwd)
    return tmp / "run", args


def test_summary_lists_every_model(tiny_run):
    run_dir, _ = tiny_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(e["iteration"], e["role"]) for e in summary] == [(0, "teacher"), (1, "student")]
    for e in summary:
        assert 0.0 <= e["test_top1"] <= 1.0 and e["model"] == "test_resnet"


def test_summary_carries_the_robustness_metrics(tiny_run):
    run_dir, _ = tiny_run
    teacher, student = json.loads((run_dir / "summary.json").read_text())
    assert teacher["mce"] == pytest.approx(1.0) and teacher["mfr"] == pytest.approx(1.0)
    for e in (teacher, student):
        assert 0.0 <= e["test_ece"] <= 1.0 and 0.0 <= e["flip_rate"] <= 1.0 and e["mce"] > 0
        assert set(e["corruption_errors"]) == set(CORRUPTIONS)
        assert all(len(v) == 5 and all(0.0 <= x <= 1.0 for x in v) for v in e["corruption_errors"].values())
        assert set(e["flip_rates"]) == {"gaussian_noise", "translate", "brightness"}
        # the extra set is the test split again: the same numbers, through the extra-set path
        assert e["extra"]["test_again"]["test_again_top1"] == pytest.approx(e["test_top1"])


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images = {}

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            a = dict(attrs)
            self.images[a["id"]] = a["src"]


def test_report_shows_every_plot(tiny_run):
    run_dir, _ = tiny_run
    parser = _Images()
    parser.feed((run_dir / "report.html").read_text())
    assert set(parser.images) == {"accuracy", "confidence", "class_counts_round_1", "corruptions"}
    for src in parser.images.values():
        assert src.startswith("data:image/png;base64,")  # self-contained: no file next to it needed
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        img.load()
        assert img.format == "PNG" and img.width >= 300 and img.height >= 200
    assert main(["report", str(run_dir)]) == 0  # the command alone rewrites it


def test_checkpoints_load_through_the_labeler(tiny_run):
    run_dir, _ = tiny_run
    for d in ("round_0/teacher", "round_1/student"):
        model, spec = load_checkpoint(str(run_dir / d))
        assert spec.classes == [str(i) for i in range(10)] and not model.training
        assert (run_dir / d / "metrics.jsonl").read_text().count("\n") >= 1


def test_every_unlabeled_image_is_accounted_for(tiny_run):
    run_dir, _ = tiny_run
    manifest = json.loads((run_dir / "round_1" / "labels" / "manifest.json").read_text())
    n_files = len(os.listdir(run_dir.parent / "unlabeled"))
    assert manifest["rows"] == n_files and manifest["rejected"] == 1
    assert manifest["reject_reasons"] == {"not_an_image": 1}


def test_balanced_set_has_exactly_per_class_rows(tiny_run):
    run_dir, _ = tiny_run
    stats = json.loads((run_dir / "round_1" / "balance_stats.json").read_text())
    table = pq.read_table(run_dir / "round_1" / "balanced").to_pandas()
    per_label = table.groupby("label")["copies"].sum()
    nonempty = [c["class"] for c in stats["classes"] if c["passing"] > 0]
    assert sorted(per_label.index) == nonempty
    assert (per_label == stats["per_class"]).all()
    assert (table["confidence"] >= stats["threshold"]).all()


def test_rerun_skips_finished_stages(tiny_run, capsys):
    run_dir, args = tiny_run
    before = (run_dir / "summary.json").read_text()
    cwd = os.getcwd()
    os.chdir(run_dir.parent)
    try:
        assert main(args) == 0
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "already trained, skipping" in out and "test_top1" in out
    assert (run_dir / "summary.json").read_text() == before


def test_smaller_student_is_refused(tmp_path):
    random_checkpoint(str(tmp_path / "teacher"), arch="test_resnet")
    small = ModelSpec("test_efficientnet", [str(i) for i in range(10)], 16)
    with pytest.raises(ValueError, match="equal-or-larger"):
        _check_student_size(small, str(tmp_path / "teacher"), allow_smaller=False)
    _check_student_size(small, str(tmp_path / "teacher"), allow_smaller=True)


def test_bad_override_is_a_clear_error(capsys):
    assert main(["run", "configs/digits.yaml", "teacher.epoch=3"]) == 2
    assert "did you mean teacher.epochs" in capsys.readouterr().err
