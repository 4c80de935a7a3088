"""`ray job submit` end to end against a head this test starts (and stops) itself.

The head listens on 127.0.0.1 with its own temp dir and free ports; it runs in its own
process group, so stopping it kills exactly its processes and no other Ray cluster on the machine.
"""

import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.request

import pytest

from tests.s3_server import free_port


@pytest.fixture(scope="module")
def head():
    temp = tempfile.mkdtemp(prefix="rjob", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    dash = free_port()
    ports = {f"--{name}": str(free_port()) for name in (
        "port", "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")}  # fmt: skip
    args = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--temp-dir={temp}", "--disable-usage-stats"] + [f"{k}={v}" for k, v in ports.items()]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for(address + "/api/version", proc)
        yield address, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)  # `ray start --block` took the whole 30 s it was once given; the group is killed below
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
        except ProcessLookupError:
            pass


def _wait_for(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the job server did not answer on {url} within {timeout} s")


def test_submit_the_tiny_config(head, tmp_path):
    address, env = head
    out = tmp_path / "job"
    cmd = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
           "python", "-m", "pipeline", "run", "digits", "runlocal=true",
           f"run_dir={out}/run", f"data.root={out}/data"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "succeeded" in log, log[-3000:]
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert [(e["iteration"], e["role"]) for e in summary] == [(0, "teacher"), (1, "student")]
    assert (out / "run" / "report.html").exists()
    assert "test_top1" in log  # the job's own printout reached the submitter
    _check_console(log)


# Ray's own output that once drowned the progress: the PlacementGroupCleaner's failed State API
# polls, Ray Train's worker-group chatter, Ray Data's execution logs, and the workers' epoch lines
NOISE = (
    "Failed to query Ray Train Controller actor state", "Reporting training result", "Checkpoint successfully created",
    "Attempting to start training worker group", "Setting up process group", "logging_progress.py",
    "Execution plan of Dataset", "Progress bars disabled", "RayTrainWorker", "epoch=",
)  # fmt: skip


def _check_console(log: str) -> None:
    """The default console of the tiny loop, as a log: every stage's progress, no noise, no redraws."""
    lines = log.splitlines()
    assert "\r" not in log  # a log, not a terminal: no carriage-return redraws
    for noise in NOISE:
        assert noise not in log, f"{noise!r} in the default output:\n{log[-3000:]}"
    for stage in ("training round_0_teacher", "round_0_teacher: 100% 4/4", "labeling: 100% 1108/1108",
                  "balanced in", "round_1_student: 100% 2/2", "evaluated in", "pseudo_rows", "report: "):  # fmt: skip
        assert stage in log, f"{stage!r} missing from the output:\n{log[-3000:]}"
    job = [line for line in lines if line.strip() and not line.startswith(("20", "-", "Job ", "Next steps", "  "))]
    assert len(set(job)) == len(job), "a line printed twice"
    # the job's own lines; the submitter's CLI adds its own (packaging notes grow with the cache folders
    # a checkout holds: .ruff_cache, .pytest_cache, .hypothesis), which are not the job's output
    assert len(job) < 40, f"{len(job)} lines from the job:\n{log}"
    assert len(lines) < 100, f"{len(lines)} lines:\n{log}"
