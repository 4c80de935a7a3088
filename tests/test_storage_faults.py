"""Storage that fails for a moment: S3 behind a proxy that injects faults (tests/fault_proxy.py).

Every S3 request of the project goes through the session's proxy (tests/s3_server.py), in pass-through
until a test sets a schedule; the tests' own boto3 client talks to moto directly. The tiny loop with
everything in S3 runs twice, without faults and through a schedule of every kind of fault, and must give
the same pseudo-row counts and the same predictions; a fault that persists must end the run, naming the
bucket, the key and the HTTP status, after a bounded number of attempts.
"""

import os
import time

import pyarrow.parquet as pq
import pytest

from labeler.listing import iter_files
from labeler.storage import (
    S3_MAX_ATTEMPTS,
    S3RequestFailed,
    filesystem_for,
    read_bytes,
    read_json,
    retry_counts,
    write_bytes,
    write_json,
)
from pipeline.cli import main
from tests.fault_proxy import request_kind

BUCKET = "noisy-student-faults"

# Every kind of fault, often enough to hit the tiny loop several times each, bounded so it stays quick.
# Not on CompleteMultipartUpload: pyarrow 26 reports one retried by the AWS SDK after a 503 as failed even when
# the retry succeeded (the whole-object writes of labeler.storage survive it; Ray Data's Parquet would not).
SCHEDULE = [
    {"fault": "503", "kind": "put_part", "every": 7, "limit": 12},
    {"fault": "reset_part", "kind": "put_part", "every": 9, "limit": 12},
    {"fault": "500", "kind": "get", "every": 11, "limit": 12},
    {"fault": "reset_get", "kind": "get", "every": 13, "limit": 12},
    {"fault": "503", "kind": "head", "every": 23, "limit": 12},
    {"fault": "503", "kind": "list", "every": 5, "limit": 6},
    {"fault": "slow", "kind": "any", "every": 200, "limit": 3, "delay_s": 2.0},
]


@pytest.fixture
def faults(s3):
    """The session's proxy; its schedule is emptied again after the test."""
    yield s3.proxy
    s3.proxy.set_schedule([])


def test_request_kinds():
    assert request_kind("GET", "/b/k/x.png") == "get"
    assert request_kind("HEAD", "/b/k/x.png") == "head"
    assert request_kind("GET", "/b?list-type=2&prefix=k%2F&delimiter=%2F") == "list"
    assert request_kind("PUT", "/b/k?partNumber=2&uploadId=abc") == "put_part"
    assert request_kind("PUT", "/b/k") == "put"
    assert request_kind("POST", "/b/k?uploadId=abc") == "complete"
    assert request_kind("POST", "/b/k?uploads") == "other"


def test_transient_faults_are_retried_and_counted(s3, faults):
    s3.client().create_bucket(Bucket=BUCKET)
    uri = f"s3://{BUCKET}/unit/object.bin"
    data = os.urandom(1 << 16)
    before = sum(retry_counts().values())
    kinds = [("503", "put_part"), ("reset_part", "put_part"), ("500", "get"), ("reset_get", "get")]
    faults.set_schedule([{"fault": f, "kind": k, "every": 1, "limit": 1} for f, k in kinds])
    write_bytes(uri, data)
    assert read_bytes(uri) == data
    injected = faults.counts()["injected"]
    assert injected == {"503": 1, "reset_part": 1, "500": 1, "reset_get": 1}
    assert sum(retry_counts().values()) - before == 4  # each fault cost one retry, counted


def test_listing_retries_are_counted(s3, faults):
    s3.client().create_bucket(Bucket=BUCKET)
    for i in range(3):
        s3.client().put_object(Bucket=BUCKET, Key=f"listed/{i}.png", Body=b"x")
    before = retry_counts().get("LIST", 0)
    faults.set_schedule([{"fault": "503", "kind": "list", "every": 1, "limit": 2}])
    fs, root = filesystem_for(f"s3://{BUCKET}/listed")
    assert [p.rsplit("/", 1)[1] for p in iter_files(fs, root)] == ["0.png", "1.png", "2.png"]
    assert retry_counts()["LIST"] - before == 2


def test_a_persistent_fault_fails_in_bounded_time_naming_bucket_key_and_status(s3, faults):
    s3.client().create_bucket(Bucket=BUCKET)
    faults.set_schedule([{"fault": "500", "key": "/stuck.json"}])
    start = time.monotonic()
    with pytest.raises(S3RequestFailed) as err:
        write_json(f"s3://{BUCKET}/unit/stuck.json", {"a": 1})
    assert time.monotonic() - start < 30
    assert f"bucket '{BUCKET}'" in str(err.value) and "key 'unit/stuck.json'" in str(err.value)
    assert "HTTP 500" in str(err.value)
    assert faults.counts()["injected"] == {"500": S3_MAX_ATTEMPTS}  # bounded: no retry beyond the attempts


def _run(name: str) -> dict:
    """The tiny loop with its corpus and outputs under ``s3://BUCKET/name``; what the comparison needs."""
    args = [
        "run",
        "digits",
        "runlocal=true",
        f"run_dir=s3://{BUCKET}/{name}/run",
        f"data.root=s3://{BUCKET}/{name}/data",
    ]
    assert main(args) == 0
    run = f"s3://{BUCKET}/{name}/run"
    fs, path = filesystem_for(f"{run}/round_1/labels/predictions")
    predictions = pq.read_table(path, filesystem=fs).to_pandas()
    predictions = predictions.drop(columns=["path"]).sort_values("id").reset_index(drop=True)
    return {
        "pseudo_rows": [e["pseudo_rows"] for e in read_json(f"{run}/summary.json")],
        "balance_stats": read_json(f"{run}/round_1/balance_stats.json"),
        "predictions": predictions,
        "manifest": read_json(f"{run}/round_1/labels/manifest.json"),
        "log": read_bytes(f"{run}/run.log").decode(),
    }


@pytest.fixture(scope="module")
def loops(ray_local, s3, tmp_path_factory):
    s3.client().create_bucket(Bucket=BUCKET)
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("faultcwd"))
    try:
        s3.proxy.set_schedule([])
        clean = _run("clean")
        before = sum(retry_counts().values())
        s3.proxy.set_schedule(SCHEDULE)
        faulty = _run("faulty")
        counts = s3.proxy.counts()
        retried = sum(retry_counts().values()) - before
    finally:
        s3.proxy.set_schedule([])
        os.chdir(cwd)
    return clean, faulty, counts, retried


@pytest.mark.slow
@pytest.mark.ray
def test_faults_change_nothing_in_the_results(loops):
    clean, faulty, counts, _ = loops
    assert faulty["pseudo_rows"] == clean["pseudo_rows"] and clean["pseudo_rows"][-1] > 0
    assert faulty["balance_stats"] == clean["balance_stats"]
    assert len(faulty["predictions"]) == len(clean["predictions"]) > 0
    assert faulty["predictions"].equals(clean["predictions"])  # ids, labels, probabilities, all columns
    # every kind of fault really happened during the run
    assert set(counts["injected"]) == {"503", "500", "reset_get", "reset_part", "slow"}, counts


@pytest.mark.slow
@pytest.mark.ray
def test_retries_are_counted_and_visible(loops):
    clean, faulty, _, retried = loops
    assert retried > 0
    assert f"storage: the driver retried {retried} S3 requests" in faulty["log"]
    assert "storage: the driver retried 0 S3 requests" in clean["log"]
    assert "storage_retries" in faulty["manifest"] and clean["manifest"]["storage_retries"] == 0


@pytest.mark.slow
@pytest.mark.ray
def test_a_persistent_fault_ends_the_run_naming_bucket_key_and_status(ray_local, s3, faults, capsys):
    s3.client().create_bucket(Bucket=BUCKET)
    faults.set_schedule([{"fault": "503", "key": "/stuck/data/corpus.json"}])
    start = time.monotonic()
    code = main(
        ["run", "digits", "runlocal=true", f"run_dir=s3://{BUCKET}/stuck/run", f"data.root=s3://{BUCKET}/stuck/data"]
    )
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - start < 120
    assert f"bucket '{BUCKET}'" in err and "key 'stuck/data/corpus.json'" in err and "HTTP 503" in err, err[-2000:]
    assert faults.counts()["injected"] == {"503": S3_MAX_ATTEMPTS}
