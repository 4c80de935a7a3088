"""A pool that can never be scheduled fails loudly instead of hanging: on a 2-CPU cluster, inference actors
that take every CPU leave the read tasks none, and Ray Data waits forever without an error (docs/labeler.md, on
`stall_timeout_s`)."""

import subprocess
import sys

import pytest


@pytest.mark.cluster
def test_stalled_labeling_raises_with_a_fix(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tests.stall_check", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 3, log[-3000:]
    assert "STALLED labeling made no progress" in log and "cpus_per_actor" in log
