"""Storage that fails for a moment: S3 behind a proxy that injects faults (tests/fault_proxy.py).

The driver's S3 requests go through a proxy in front of the session's moto server while a test sets its
schedule; the tests' own boto3 client talks to moto directly. Each kind of fault is
retried, counted and survived by the project's storage operations; a fault that persists must end the run,
naming the bucket, the key and the HTTP status, after a bounded number of attempts. The tiny loop with
everything in S3 runs twice, as a user runs it (its own process and local Ray cluster), once straight to
the S3 server and once through a schedule of every kind of fault, and gives the same results.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from core.storage import (
    S3_MAX_ATTEMPTS,
    S3RequestFailed,
    filesystem_for,
    read_bytes,
    read_json,
    retry_counts,
    write_bytes,
    write_json,
)
from labeler.listing import iter_files
from pipeline.cli import main
from tests.fault_proxy import FaultProxy, request_kind
from tests.s3_server import free_port

BUCKET = "noisy-student-faults"

# Every kind of fault, often enough to hit the tiny loop several times each, bounded so it stays quick.
# Not on CompleteMultipartUpload: pyarrow 26 reports one the AWS SDK retried after a 503 as failed even when
# the retry succeeded (the whole-object writes of core.storage survive it; Ray Data's Parquet writes would not).
SCHEDULE = [
    {"fault": "503", "kind": "put_part", "every": 7, "limit": 12},
    {"fault": "reset_part", "kind": "put_part", "every": 9, "limit": 12},
    {"fault": "500", "kind": "get", "every": 11, "limit": 12},
    {"fault": "reset_get", "kind": "get", "every": 13, "limit": 12},
    {"fault": "503", "kind": "head", "every": 23, "limit": 12},
    {"fault": "503", "kind": "list", "every": 5, "limit": 6},
    {"fault": "slow", "kind": "any", "every": 200, "limit": 3, "delay_s": 2.0},
]
LOOP_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def proxy(s3):
    """A fault proxy in front of the session's moto server, for this module only: every S3 request of the
    suite through it (pass-through) made the tiny S3 loop 4x slower."""
    running = FaultProxy(s3.endpoint, free_port())
    yield running
    running.stop()


@pytest.fixture
def faults(proxy, monkeypatch):
    """The driver's S3 requests go through ``proxy`` during the test; its schedule is emptied after it.
    (Ray's workers keep the endpoint they started with: the faults tested here are the driver's.)"""
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    yield proxy
    proxy.set_schedule([])


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


def _loop(name: str, endpoint: str, cwd, *extra: str) -> dict:
    """The tiny loop, corpus and outputs under ``s3://BUCKET/name``, in a process of its own (which starts
    its own local Ray cluster) whose S3 endpoint is ``endpoint``; what the comparison needs. A run still
    going after ``LOOP_TIMEOUT_S`` is sent SIGABRT, so that the failure shows every thread's stack."""
    run = f"s3://{BUCKET}/{name}/run"
    args = ["run", "digits", "runlocal=true", f"run_dir={run}", f"data.root=s3://{BUCKET}/{name}/data", *extra]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout, installed or not
    env.update(AWS_ENDPOINT_URL=endpoint, PYTHONFAULTHANDLER="1", PYTHONPATH=root)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=LOOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        output, _ = proc.communicate(timeout=60)
        pytest.fail(f"the {name} loop did not end within {LOOP_TIMEOUT_S} s; its threads:\n{output[-12000:]}")
    assert proc.returncode == 0, output[-4000:]
    restarts = [line for line in output.splitlines() if "restarted the training workers" in line]
    retries = [line for line in output.splitlines() if "retry" in line]
    print(f"{name}: {len(restarts)} training restarts, {len(retries)} retry lines", *restarts, *retries[:40],
          sep="\n")  # shown with -rP  # fmt: skip
    fs, path = filesystem_for(f"{run}/round_1/labels/predictions")
    predictions = pq.read_table(path, filesystem=fs).to_pandas()
    summary = read_json(f"{run}/summary.json")
    return {
        "pseudo_rows": [e["pseudo_rows"] for e in summary],
        # the same text for both runs: the stats name the run's own paths
        "balance_stats": json.dumps(read_json(f"{run}/round_1/balance_stats.json")).replace(f"/{name}/", "/RUN/"),
        "predictions": predictions.drop(columns=["path"]).sort_values("id").reset_index(drop=True),
        "manifest": read_json(f"{run}/round_1/labels/manifest.json"),
        "log": read_bytes(f"{run}/run.log").decode(),
        "summary": summary,
    }


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.cluster
def test_the_tiny_loop_through_storage_faults_gives_the_same_results(s3, proxy, tmp_path):
    """Every S3 request of the faulty run (the driver's and every Ray worker's) goes through the proxy, from
    the corpus's upload through the teacher's training to the student's evaluation. A fault that outlasts the
    AWS SDK's retries inside a training worker (a checkpoint upload) makes Ray Train restart the workers from
    the last checkpoint; a resumed run trains the epochs it redoes as the unbroken run did, so even then the
    teacher, its labels and the balanced rows come out the same. Whether a restart happens depends on where the
    faults land (the run's output lists any); the replay itself is checked directly by
    ``test_a_resumed_run_trains_the_epochs_an_unbroken_run_trains``."""
    s3.client().create_bucket(Bucket=BUCKET)
    clean = _loop("clean", s3.endpoint, tmp_path)
    proxy.set_schedule(SCHEDULE)
    try:
        faulty = _loop("faulty", proxy.endpoint, tmp_path)
        counts = proxy.counts()
    finally:
        proxy.set_schedule([])
    assert set(counts["injected"]) == {"503", "500", "reset_get", "reset_part", "slow"}, counts  # all happened
    for key in ("rows", "labeled", "rejected", "reject_reasons"):  # no fault became a rejected image
        assert faulty["manifest"][key] == clean["manifest"][key], (key, faulty["manifest"], clean["manifest"])
    for entry in faulty["summary"]:  # nor an image training or evaluation could not read
        unread = {k: v for k, v in entry.items() if "unreadable" in k and v}
        assert unread == {}, (entry["model"], unread)
    assert faulty["pseudo_rows"] == clean["pseudo_rows"] and clean["pseudo_rows"][-1] > 0
    assert faulty["balance_stats"] == clean["balance_stats"]
    assert len(faulty["predictions"]) == len(clean["predictions"]) > 0
    assert faulty["predictions"].equals(clean["predictions"])  # ids, labels, probabilities: every column
    assert clean["manifest"]["storage_retries"] == 0 and "storage: the driver retried 0 S3 requests" in clean["log"]
    retried = re.search(r"storage: the driver retried (\d+) S3 requests", faulty["log"])
    assert retried and int(retried.group(1)) > 0, faulty["log"][-2000:]  # counted, and shown in the run log
    assert list(os.listdir(tmp_path)) == [], "the runs wrote local files; every output should be in S3"
