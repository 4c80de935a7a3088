"""Placement on a simulated cluster: a CPU-0 head plus two worker nodes with one fake GPU each.

The fake GPUs have no CUDA behind them, so this also checks the CPU fallbacks: the labeler's
actors run on the CPU and Ray Train uses gloo.
"""

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cluster  # a simulated multi-node cluster: with the fault tests, out of the default run


@pytest.fixture(scope="module")
def placement(tmp_path_factory):
    out = tmp_path_factory.mktemp("multinode")
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-m", "tests.multinode_check", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    result = json.loads(re.search(r"^RESULT (.*)$", log, re.M).group(1))
    return result, log


def test_labeling_actors_spread_over_both_gpu_nodes(placement):
    result, log = placement
    nodes = set(re.findall(r"labeler: predictor for \S+ on node (\w+), device cpu", log))
    assert nodes == set(result["gpu_nodes"]), log[-4000:]
    assert result["labeled"] > 0


def test_training_workers_run_on_the_gpu_nodes(placement):
    result, log = placement
    workers = dict(re.findall(r"\[multinode\] worker (\d)/2 on node (\w+), device cpu", log))
    assert set(workers) == {"0", "1"}, log[-4000:]
    assert set(workers.values()) == set(result["gpu_nodes"])  # one per GPU node, none on the head
