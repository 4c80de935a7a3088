"""A Ray head with a job server, started (and stopped) by the tests themselves, for ``ray job submit``.

The head listens on 127.0.0.1 with its own temp dir and free ports; it runs in its own process group, so
stopping it kills exactly its processes and no other Ray cluster on the machine.
"""

import contextlib
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator

from tests.s3_server import free_port


@contextlib.contextmanager
def job_server() -> Iterator[tuple[str, dict]]:
    """``(dashboard address, environment)`` of a running head; ``ray job submit --address`` takes the address."""
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
