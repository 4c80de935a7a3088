"""Storage that fails for a moment: S3 behind a proxy that injects faults (tests/fault_proxy.py).

The driver's S3 requests go through a proxy in front of the session's moto server while a test sets its
schedule; the tests' own boto3 client talks to moto directly. Each kind of fault is
retried, counted and survived by the project's storage operations; a fault that persists must end the run,
naming the bucket, the key and the HTTP status, after a bounded number of attempts. (The tiny loop through
the whole schedule hung inside pyarrow's S3 output stream after injected connection resets, cause unknown:
that comparison is not part of the suite yet.)
"""

import os
import time

import pytest

from labeler.listing import iter_files
from labeler.storage import (
    S3_MAX_ATTEMPTS,
    S3RequestFailed,
    filesystem_for,
    read_bytes,
    retry_counts,
    write_bytes,
    write_json,
)
from pipeline.cli import main
from tests.fault_proxy import FaultProxy, request_kind
from tests.s3_server import free_port

BUCKET = "noisy-student-faults"


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
