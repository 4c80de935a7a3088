"""A loop run whose first teacher is supplied (teacher.checkpoint): a state dict made outside the project."""

import io
import json

import pytest
import timm
import torch

from core.model import load_checkpoint
from core.storage import write_bytes
from pipeline.cli import main

BUCKET = "noisy-student-supplied"


@pytest.fixture(scope="module")
def supplied_run(ray_local, s3, tmp_path_factory):
    """runlocal-sized: digits corpus, one round; the teacher is a timm model saved the way DDP training
    scripts save it (``module.`` keys nested under ``state_dict``), read from S3."""
    from pipeline.digits import write_digits_corpus

    tmp = tmp_path_factory.mktemp("supplied")
    paths = write_digits_corpus(str(tmp / "data"), labels_per_class=5, test_fraction=0.3, seed=0, val_per_class=3)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)  # plain timm: nothing from this project
    blob = io.BytesIO()
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 90}, blob)
    s3.client().create_bucket(Bucket=BUCKET)
    uri = f"s3://{BUCKET}/elsewhere/teacher.pth"
    write_bytes(uri, blob.getvalue())
    args = [
        "run", "digits", f"run_dir={tmp / 'run'}", "runlocal=true",
        f"data.labeled={paths['labeled']}", f"data.unlabeled={paths['unlabeled']}", f"data.test={paths['test']}",
        f"data.val={paths['val']}",
        f"teacher.checkpoint={uri}", "teacher.arch=test_resnet",
        "balance.threshold=0.0",  # an untrained teacher is never 30% sure: keep its labels anyway
    ]  # fmt: skip
    assert main(args) == 0
    return tmp / "run", model.state_dict(), uri


def test_the_supplied_teacher_is_round_0_and_every_round_completes(supplied_run):
    run_dir, _, uri = supplied_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(e["iteration"], e["role"]) for e in summary] == [(0, "teacher"), (1, "student")]
    assert summary[0]["supplied"] == uri and "supplied" not in summary[1]
    for e in summary:  # evaluated like any other model, on validation too
        assert 0.0 <= e["test_top1"] <= 1.0 and e["mce"] > 0 and 0.0 <= e["val_top1"] <= 1.0
    assert summary[1]["worse_than_teacher"] in (True, False)  # so a worse student can be marked
    assert json.loads((run_dir / "run_config.json").read_text())["teacher_supplied"] == uri
    assert not (run_dir / "ray_train" / "round_0_teacher").exists()  # not trained
    assert "supplied" in (run_dir / "report.html").read_text()


def test_round_0_holds_the_supplied_weights_in_the_project_format(supplied_run):
    run_dir, weights, _ = supplied_run
    model, spec = load_checkpoint(str(run_dir / "round_0" / "teacher"))
    state = model.state_dict()
    assert spec.arch == "test_resnet" and spec.num_classes == 10
    assert all(torch.equal(state[k], v) for k, v in weights.items())


def test_the_table_shows_supplied(supplied_run):
    from pipeline.loop import format_table

    run_dir, _, _ = supplied_run
    lines = format_table(json.loads((run_dir / "summary.json").read_text())).splitlines()
    assert lines[2].split()[:2] == ["0", "supplied"] and lines[3].split()[:2] == ["1", "student"]
