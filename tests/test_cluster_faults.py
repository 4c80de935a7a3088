"""What a real cluster does to a job, on simulated clusters (``ray.cluster_utils``): nodes lost mid-stage,
inference actors killed, pools larger than the nodes left. Each scenario runs in its own process
(tests/cluster_faults.py); the pool-sizing rules are checked directly first."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from core.cluster import fit_pool


def test_the_pool_starts_at_num_actors_when_they_fit():
    size = fit_pool(2, 4, 1.0, None, 0.5, {"CPU": 8.0})
    assert (size.gpus_per_actor, size.initial, size.maximum) == (0, 2, 4)


def test_a_pool_too_large_for_the_cluster_is_cut_to_fit_beside_reading(project_caplog):
    caplog = project_caplog
    # two 1-CPU actors on the one 2-CPU node a lost node left: reads would get no CPU
    size = fit_pool(2, None, 1.0, None, 0.5, {"CPU": 2.0}, fixed=True)
    assert (size.initial, size.maximum) == (1, 1)
    assert "the pool starts with 1 and grows to at most 1" in caplog.text
    # a cluster this process did not start may grow: only the start is cut
    size = fit_pool(2, 4, 1.0, None, 0.5, {"CPU": 2.0})
    assert (size.initial, size.maximum) == (1, 4)
    assert "the pool starts with 1 and grows to 4 as nodes join" in caplog.text


def test_gpu_actors_on_an_autoscaling_cluster_count_the_gpus_it_may_add():
    # the cluster.yaml shape: a CPU-only head, GPU workers that start at zero
    size = fit_pool(1, 4, 1.0, None, 0.5, {"CPU": 0.0}, most={"CPU": 8.0, "GPU": 4.0})
    assert (size.gpus_per_actor, size.initial, size.maximum) == (1, 1, 4)
    size = fit_pool(1, 8, 1.0, None, 0.5, {"CPU": 0.0}, most={"CPU": 16.0, "GPU": 4.0}, fixed=True)
    assert size.maximum == 4  # one GPU each


def test_no_room_for_one_actor_is_an_error_that_says_what_to_change():
    with pytest.raises(ValueError, match="lower cpus_per_actor or decode_cpus"):
        fit_pool(1, None, 2.0, None, 0.5, {"CPU": 2.0})
    with pytest.raises(ValueError, match="1 GPU"):
        fit_pool(1, None, 1.0, 2.0, 0.5, {"CPU": 4.0, "GPU": 1.0})  # 2 GPUs an actor, one there


def test_a_cluster_with_nothing_for_the_pool_yet_is_waited_for(project_caplog):
    caplog = project_caplog
    # Ray's default autoscaler does not say what it may add: a CPU-less head and GPU actors asked for
    size = fit_pool(4, 8, 1.0, 1.0, 0.5, {"CPU": 0.0})
    assert (size.gpus_per_actor, size.initial, size.maximum) == (1.0, 8, 8)  # all asked for: nodes for each
    assert "waiting for its autoscaler to add nodes" in caplog.text


def _scenario(tmp_path, *args: str, timeout: int = 600) -> tuple[dict, str]:
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-m", "tests.cluster_faults", args[0], str(tmp_path), *args[1:]],
                          env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    log = done.stdout + done.stderr
    found = re.search(r"^RESULT (.*)$", log, re.M)
    assert done.returncode == 0 and found, log[-4000:]
    return json.loads(found.group(1)), log


def _every_image_once(result: dict, log: str) -> None:
    assert result["finished"], result.get("error", log[-4000:])
    assert result["rows"] == result["distinct"] == result["manifest_rows"] == result["images"], result


@pytest.mark.ray
@pytest.mark.cluster
def test_labeling_finishes_on_the_node_left_when_one_is_lost(tmp_path):
    """Two 2-CPU nodes, two 1-CPU inference actors; one node is removed with units in flight. With the
    pool's minimum at two, the actor restarted for the lost one took the last CPU and reads never ran."""
    result, log = _scenario(tmp_path, "labeling", "6000", "2", "2", "remove_node")
    assert result["injected"], "the node was never removed"
    _every_image_once(result, log)


@pytest.mark.ray
@pytest.mark.cluster
def test_a_killed_inference_actor_is_replaced_and_its_batches_redone(tmp_path):
    result, log = _scenario(tmp_path, "labeling", "4000", "2", "2", "kill_actor")
    assert result["injected"], "no actor was killed"
    _every_image_once(result, log)


@pytest.mark.ray
@pytest.mark.cluster
def test_a_pool_larger_than_the_cluster_starts_cut_to_fit(tmp_path):
    """The same command run again on the node a loss left: two 1-CPU actors on one 2-CPU node."""
    result, log = _scenario(tmp_path, "labeling", "1000", "2", "1", "none")
    _every_image_once(result, log)
    assert "the pool starts with 1 and grows to 2 as nodes join" in log


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.2)


def _stop_with_sigterm(proc: subprocess.Popen) -> tuple[float, str]:
    """SIGTERM to the driver, as `ray job stop` or a spot notice does; seconds until it exited, its output."""
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    try:
        log, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return time.time() - sent, log


SIGTERM_INSIDE_RAY_GET = """
import os, signal, sys, time
import ray
from core.ray_runtime import keeps_sigterm_status, start_or_join_ray

@ray.remote
def send_sigterm(driver: int) -> None:
    time.sleep(1.0)  # the driver is blocked in ray.get by now, as it is throughout a training run's fit()
    os.kill(driver, signal.SIGTERM)
    time.sleep(60)

@keeps_sigterm_status
def main() -> None:
    start_or_join_ray(None, num_cpus=1, include_dashboard=False)
    ray.get(send_sigterm.remote(os.getpid()))

main()
"""


@pytest.mark.ray
@pytest.mark.cluster
def test_sigterm_inside_ray_get_exits_with_143(tmp_path):
    """Ray's ``ray.get`` turns the exception the SIGTERM handler raises into ``SystemExit(1)``; a command's
    entry point (``keeps_sigterm_status``) still exits with 143, so a stopped job does not look failed."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    job = subprocess.run([sys.executable, "-c", SIGTERM_INSIDE_RAY_GET], env=env, cwd=root, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    log = job.stdout + job.stderr
    assert "stopped by SIGTERM" in log, log[-3000:]
    assert job.returncode == 143, log[-3000:]


@pytest.mark.ray
@pytest.mark.cluster
def test_a_labeling_job_told_to_stop_keeps_its_units_and_resumes(tmp_path):
    from tests.cluster_faults import predictions_summary, write_pngs
    from tests.helpers import random_checkpoint

    corpus, labels, teacher = tmp_path / "images", tmp_path / "labels", tmp_path / "teacher"
    write_pngs(str(corpus), 4000)
    random_checkpoint(str(teacher))
    cmd = [sys.executable, "-m", "labeler", "--input", str(corpus), "--checkpoint", str(teacher), "--output",
           str(labels), "--files-per-unit", "250"]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)  # fmt: skip
    written = labels / "predictions"
    _wait_for(lambda: written.is_dir() and len(list(written.iterdir())) >= 2, 300, "two units written")
    seconds, log = _stop_with_sigterm(job)
    assert seconds < 20, f"the job took {seconds:.0f} s to stop:\n{log[-3000:]}"
    assert job.returncode == 143 and "SIGTERM received" not in log, log[-3000:]  # an exit, not a crash dump
    assert "stopped by SIGTERM" in log, log[-3000:]
    assert job.returncode != 0 and not (labels / "manifest.json").exists(), log[-3000:]
    kept = len(list(written.iterdir()))
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    resumed = re.search(r"resuming, (\d+) of 16 input units", out)
    assert resumed and int(resumed.group(1)) >= min(kept, 2), out[-3000:]  # the finished units were kept
    summary = predictions_summary(str(labels))
    assert summary["rows"] == summary["distinct"] == 4000


@pytest.mark.ray
@pytest.mark.cluster
def test_a_training_job_told_to_stop_resumes_from_its_last_checkpoint(tmp_path):
    from pipeline.digits import write_digits_corpus
    from tests.test_trainer_faults import EPOCHS, _check_finished, _history, _wait_for_checkpoint

    data, storage, out = str(tmp_path / "digits"), str(tmp_path / "storage"), str(tmp_path / "model")
    write_digits_corpus(data, labels_per_class=5, test_fraction=0.3, seed=0, val_per_class=3)
    cmd = [sys.executable, "-m", "tests.train_job", data, storage, out]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)  # fmt: skip
    _wait_for_checkpoint(storage)
    seconds, log = _stop_with_sigterm(job)
    assert seconds < 20, f"the job took {seconds:.0f} s to stop:\n{log[-3000:]}"
    # an exit, not a crash dump (the signal lands inside Ray Train's fit(): test_sigterm_inside_ray_get_...)
    assert job.returncode == 143 and "SIGTERM received" not in log, log[-3000:]
    assert "stopped by SIGTERM" in log, log[-3000:]
    assert job.returncode != 0 and not os.path.exists(os.path.join(out, "metrics.jsonl")), log[-3000:]
    again = subprocess.run(cmd + ["--print-final"], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    final = json.loads(re.search(r"^FINAL (.*)$", again.stdout, re.M).group(1))
    _check_finished(final, out)
    resumed = _history(out)[-1]["resumed_from"]
    assert len(resumed) == 1 and 1 <= resumed[0] < EPOCHS


@pytest.mark.ray
@pytest.mark.cluster
def test_training_waits_for_a_lost_nodes_replacement_and_resumes_from_its_checkpoint(tmp_path):
    """The node of one of two training workers is removed after the first checkpoint; a replacement joins
    45 s later. Ray Train restarts the workers from the last checkpoint; the driver says what it waits for
    meanwhile, and that the workers were restarted, with why and from which epoch."""
    from tests.test_trainer_faults import EPOCHS

    result, log = _scenario(tmp_path, "training_node_loss")
    assert result["removed"] and result["replaced"], result
    assert result["finished"], result.get("error", log[-4000:])
    final = result["final"]
    history = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    resumed = history[-1]["resumed_from"]
    assert len(resumed) == 1 and 1 <= resumed[0] < EPOCHS
    assert final["val_top1"] == max(h["val_top1"] for h in history)  # selected by validation as usual
    waiting = r"waiting for 2 training workers \(1 CPU each\) to be placed: the cluster has \d of \d CPUs free"
    assert re.search(waiting, log), log[-4000:]
    restarts = re.findall(r"Ray Train restarted the training workers \((.*)\); training resumes from epoch (\d+)", log)
    assert len(restarts) == 1 and int(restarts[0][1]) == resumed[0], restarts


@pytest.mark.ray
@pytest.mark.cluster
def test_the_cluster_yaml_shape_grows_gpu_nodes_for_labeling_and_training(tmp_path):
    """A head with no CPU and GPU workers from zero (Ray's fake autoscaler): labeling asks for GPU actors,
    the autoscaler adds nodes, the pool runs on every GPU node (up to max_actors 2), and training's two
    GPU workers wait for theirs."""
    result, log = _scenario(tmp_path, "autoscaling")
    assert result.get("trained"), result.get("error", log[-4000:])
    assert result["gpus_at_start"] == 0
    assert result["rows"] == result["distinct"] == result["labeled"] == 4000
    nodes = set(re.findall(r"labeler: predictor for \S+ on node (\w+)", log))
    assert len(nodes) == 2 and nodes <= set(result["gpu_nodes"]), (nodes, result["gpu_nodes"])
    trainers = dict(re.findall(r"\[autoscaling\] worker (\d)/2 on node (\w+)", log))
    assert set(trainers) == {"0", "1"} and set(trainers.values()) <= set(result["gpu_nodes"]), trainers
