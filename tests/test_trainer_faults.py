"""Ray Train fault tolerance for real: a training worker is SIGKILLed mid-run, and a driver is
interrupted and run again. Both runs must finish every epoch from their last checkpoint."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import ray
import torch

from core.model import ModelSpec
from pipeline.digits import write_digits_corpus
from trainer.api import train_model
from trainer.settings import TrainSettings

EPOCHS = 30
NAME = "long_run"


def long_run(data: str, storage: str, out: str) -> dict:
    """Long enough (many short epochs, a checkpoint each) that a fault lands mid-run; validated on the
    digits' val split (30 images) and exporting the best checkpoint, so resuming meets model selection."""
    settings = TrainSettings(epochs=EPOCHS, batch_size=16, num_workers=2, checkpoint_every=1, warmup_epochs=1,
                             min_steps_per_epoch=3, randaugment_ops=0, eval_every=5)  # fmt: skip
    spec = ModelSpec("test_resnet", [str(i) for i in range(10)], 16, mean=(0.5,) * 3, std=(0.5,) * 3)
    return train_model(settings, spec, f"{data}/labeled", out, storage, NAME, val=f"{data}/val", max_failures=2)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    write_digits_corpus(str(root), labels_per_class=5, test_fraction=0.3, seed=0, val_per_class=3)
    return str(root)


def _registered_checkpoints(storage: str) -> int:
    """Checkpoints Ray Train has registered (a directory on disk may still be in flight)."""
    try:
        with open(os.path.join(storage, NAME, "checkpoint_manager_snapshot.json")) as f:
            return len(json.load(f)["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


def _wait_for_checkpoint(storage: str, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while not _registered_checkpoints(storage):
        if time.time() > deadline:
            raise TimeoutError("no checkpoint was registered")
        time.sleep(0.05)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _train_worker_pids() -> list[int]:
    """RayTrainWorker processes of this test session's own Ray cluster (children of its raylet)."""
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for pid in _descendants(raylet):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::RayTrainWorker"):
                    pids.append(pid)
        except OSError:
            pass
    return pids


def _history(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _check_finished(final: dict, out: str) -> None:
    """Every epoch ran once, in order, and the exported epoch has the best val_top1 of the run (Ray
    Train kept a best checkpoint through the fault, beside the latest one it resumed from; among equal
    scores it keeps the later ones)."""
    history = _history(out)
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))  # each epoch once, in order
    assert final["last_epoch"] == EPOCHS and history[-1]["final"]
    best = max(h["val_top1"] for h in history)
    exported = history[final["exported_epoch"] - 1]
    assert exported["val_top1"] == final["val_top1"] == best and final["epoch"] == final["exported_epoch"]


@pytest.mark.cluster
def test_killed_worker_run_finishes_from_its_last_checkpoint(ray_local, digits, tmp_path, project_caplog):
    caplog = project_caplog
    storage, out, killed = str(tmp_path / "storage"), str(tmp_path / "model"), []
    caplog.set_level(logging.WARNING, logger="trainer.api")

    def kill_a_worker():
        _wait_for_checkpoint(storage)
        pids = _train_worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    final = long_run(digits, storage, out)
    killer.join(timeout=5)
    assert killed, "the fault was never injected"
    _check_finished(final, out)
    resumed = _history(out)[-1]["resumed_from"]
    assert len(resumed) == 1 and 1 <= resumed[0] < EPOCHS
    # the driver says so once, with the worker's failure and the epoch it resumed from
    notices = [r.getMessage() for r in caplog.records if "restarted the training workers" in r.getMessage()]
    assert len(notices) == 1, notices
    assert f"resumes from epoch {resumed[0]} of {EPOCHS}" in notices[0], notices
    assert any(kind in notices[0] for kind in ("WorkerHealthCheckFailedError", "ActorDiedError")), notices


@pytest.mark.cluster
def test_second_invocation_resumes_the_interrupted_run(ray_local, digits, tmp_path):
    storage, out = str(tmp_path / "storage"), str(tmp_path / "model")
    job = subprocess.Popen([sys.executable, "-m", "tests.train_job", digits, storage, out],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    _wait_for_checkpoint(storage)
    job.send_signal(signal.SIGINT)  # Ctrl-C: Ray Train aborts the run gracefully
    log, _ = job.communicate(timeout=120)
    assert job.returncode != 0, log[-3000:]
    assert not os.path.exists(os.path.join(out, "metrics.jsonl")), "an interrupted run must not look finished"
    final = long_run(digits, storage, out)  # the second invocation, same storage and name
    _check_finished(final, out)
    resumed = _history(out)[-1]["resumed_from"]
    assert len(resumed) == 1 and resumed[0] >= 1


def test_init_from_is_read_by_the_workers_from_its_path(ray_local, digits, tmp_path):
    """``init_from`` travels as a path (not a state dict in the config); with lr 0 the trained
    model's parameters are exactly the initial checkpoint's."""
    from core.model import load_checkpoint
    from tests.helpers import random_checkpoint

    spec = random_checkpoint(str(tmp_path / "init"), seed=3)
    settings = TrainSettings(epochs=1, batch_size=16, num_workers=1, lr=0.0, weight_decay=0.0, randaugment_ops=0,
                             drop_rate=0.0, drop_path_rate=0.0, recalibrate_bn=False)  # fmt: skip
    train_model(settings, spec, f"{digits}/labeled", str(tmp_path / "out"), str(tmp_path / "ray"), "init_run",
                init_from=str(tmp_path / "init"), progress=False)  # fmt: skip
    init = dict(load_checkpoint(str(tmp_path / "init"))[0].named_parameters())
    trained = dict(load_checkpoint(str(tmp_path / "out"))[0].named_parameters())
    assert init.keys() == trained.keys()
    for name, value in init.items():
        assert torch.equal(value, trained[name]), name


def test_init_from_without_a_checkpoint_fails_in_the_driver(ray_local, digits, tmp_path):
    spec = ModelSpec("test_resnet", [str(i) for i in range(10)], 16)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train_model(TrainSettings(epochs=1, num_workers=1), spec, f"{digits}/labeled", str(tmp_path / "out"),
                    str(tmp_path / "ray"), "no_init", init_from=str(tmp_path / "nowhere"), progress=False)  # fmt: skip


OTHER_CLUSTER = """
import ray, sys, time, urllib.request
ray.init(address="local", num_cpus=1)  # with its dashboard, as a `labeler` run in another shell starts it
urllib.request.urlopen("http://127.0.0.1:8265/api/version", timeout=10)  # served where Ray looks by default
print("UP", flush=True)
time.sleep(float(sys.argv[1]))
ray.shutdown()
"""


@pytest.mark.cluster
def test_another_ray_cluster_on_the_machine_does_not_restart_training(ray_local, digits, tmp_path, project_caplog):
    """Another Ray cluster started on the same machine mid-run (the newest cluster is what Ray's State API
    finds without an address) must not look like the death of this run's Ray Train controller."""
    caplog = project_caplog
    storage, out = str(tmp_path / "storage"), str(tmp_path / "model")
    caplog.set_level(logging.WARNING, logger="trainer.api")
    other = []

    def start_another_cluster():
        _wait_for_checkpoint(storage)
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        other.append(subprocess.Popen([sys.executable, "-c", OTHER_CLUSTER, "600"], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))  # fmt: skip

    starter = threading.Thread(target=start_another_cluster, daemon=True)
    starter.start()
    try:
        final = long_run(digits, storage, out)
        up_during_training = bool(other) and other[0].poll() is None  # still serving while training ran
    finally:
        starter.join(timeout=5)
        for proc in other:
            proc.terminate()  # SIGTERM: Ray's handler shuts its cluster down
        logs = [proc.communicate(timeout=120)[0] for proc in other]
    assert logs and "UP" in logs[0], f"the other cluster never started its dashboard on 8265: {logs}"
    assert up_during_training, "the other cluster was gone before training ended"
    _check_finished(final, out)
    assert _history(out)[-1]["resumed_from"] == []  # trained straight through, never restarted
    assert not [r for r in caplog.records if "restarted the training workers" in r.getMessage()]
