"""The tiny loop with everything in S3: corpus, predictions, balanced set, checkpoints, report.

S3 is moto's standalone server on loopback (tests/s3_server.py), reached through the same
pyarrow/boto3 code paths and AWS settings a real bucket uses.
"""

import os

import pyarrow.parquet as pq
import pytest

from core.model import load_checkpoint
from core.storage import filesystem_for, read_json
from pipeline.cli import main

BUCKET = "noisy-student-e2e"


@pytest.fixture(scope="module")
def s3_run(ray_local, s3, tmp_path_factory, run_output):
    s3.client().create_bucket(Bucket=BUCKET)
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("s3cwd"))  # anything written locally by mistake would land here
    try:
        args = ["run", "digits", "runlocal=true",
                f"run_dir=s3://{BUCKET}/run", f"data.root=s3://{BUCKET}/data"]  # fmt: skip
        code = main(args)
        local = sorted(os.listdir("."))
    finally:
        os.chdir(cwd)
        output = run_output.readouterr()  # restores the streams even when the run failed
    assert code == 0, output[-3000:]
    return f"s3://{BUCKET}/run", local, output


@pytest.fixture(scope="module")
def run_output():
    """What the driver printed (file descriptors 1 and 2) during the module's run."""
    import sys
    import tempfile

    class Capture:
        """Python's streams and file descriptors 1 and 2 both go to one file until read back."""

        def __init__(self):
            self.file = tempfile.TemporaryFile(mode="w+")
            sys.stdout.flush()
            sys.stderr.flush()
            self.saved = os.dup(1), os.dup(2), sys.stdout, sys.stderr
            os.dup2(self.file.fileno(), 1)
            os.dup2(self.file.fileno(), 2)
            sys.stdout = sys.stderr = self.file

        def readouterr(self) -> str:
            self.file.flush()
            os.dup2(self.saved[0], 1)
            os.dup2(self.saved[1], 2)
            sys.stdout, sys.stderr = self.saved[2], self.saved[3]
            self.file.seek(0)
            return self.file.read()

    return Capture()


def test_every_stage_wrote_to_s3(s3_run, s3):
    run, local, _ = s3_run
    keys = s3.keys(BUCKET, "run/")
    for expected in ("run/summary.json", "run/report.html", "run/round_1/labels/manifest.json",
                     "run/round_1/balance_stats.json", "run/round_1/student/model.safetensors",
                     "run/round_0/teacher/model.json", "run/round_0/teacher/eval.json"):  # fmt: skip
        assert expected in keys, expected
    assert any(k.startswith("run/round_1/balanced/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith("run/ray_train/round_1_student/checkpoint_") for k in keys)
    assert any(k.startswith("data/unlabeled/") and k.endswith(".png") for k in s3.keys(BUCKET, "data/"))
    assert local == [], f"the run wrote local files {local}; every output should be in S3"


def test_s3_outputs_are_usable(s3_run):
    run, _, _ = s3_run
    summary = read_json(f"{run}/summary.json")
    assert [(e["iteration"], e["role"]) for e in summary] == [(0, "teacher"), (1, "student")]
    model, spec = load_checkpoint(f"{run}/round_1/student")
    assert spec.num_classes == 10 and not model.training
    fs, path = filesystem_for(f"{run}/round_1/balanced")
    stats = read_json(f"{run}/round_1/balance_stats.json")
    assert pq.read_table(path, filesystem=fs).column("copies").to_numpy().sum() == stats["total_rows"]
    manifest = read_json(f"{run}/round_1/labels/manifest.json")
    assert manifest["rows"] == manifest["labeled"] + manifest["rejected"] > 0


def test_credentials_are_never_logged(s3_run, s3):
    _, _, output = s3_run
    assert "test_top1" in output and "report:" in output  # the capture did see the run's printout
    assert s3.SECRET not in output
