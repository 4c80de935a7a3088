"""Simulated-cluster fault scenarios, each run by tests/test_cluster_faults.py in its own process (a
``ray.cluster_utils`` cluster lives and dies with the process that made it). Each prints one
``RESULT {json}`` line; the logs are the labeler's and the trainer's own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster

from core.console import configure_console
from core.ray_runtime import worker_runtime_env
from labeler.api import LabelOptions, run_labeling
from tests.helpers import png_bytes, random_checkpoint

MB = 1 << 20
# A lost training node's replacement joins this long after the loss. The driver says what it waits for
# WAIT_NOTICE_S after Ray Train reports the failure, and that report waits for Ray's health check: with a
# 30 s gap, one CI run on a loaded machine placed the workers before the notice was due.
REPLACEMENT_AFTER_S = 45


def write_pngs(root: str, n: int) -> None:
    """``n`` distinct 8x8 PNGs in folders of 1,000 (written once; a rerun finds them)."""
    for i in range(n):
        path = os.path.join(root, f"{i // 1000:03d}", f"{i:06d}.png")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(png_bytes(seed=i))


def predictions_summary(out: str) -> dict:
    ids = pq.read_table(os.path.join(out, "predictions"), columns=["id"])["id"].to_pylist()
    return {"rows": len(ids), "distinct": len(set(ids))}


def _when(ready, act, done: list) -> None:
    """Run ``act()`` as soon as ``ready()`` holds (polled every 0.2 s); record the time."""
    while not ready():
        time.sleep(0.2)
    act()
    done.append(time.time())


def _predictor_pids() -> list[int]:
    """The processes of the labeler's inference actors (every node of a simulated cluster is local)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::MapWorker(MapBatches(Predictor))"):
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def labeling_fault(out: str, images: int, num_actors: int, nodes: int, fault: str) -> dict:
    """Labeling on ``nodes`` 2-CPU worker nodes (the head has no CPU) with ``num_actors`` 1-CPU actors.
    ``fault``, once the first two units are written: ``remove_node`` removes the last node (its raylet,
    workers and object store), ``kill_actor`` SIGKILLs one inference actor; ``none`` does nothing."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 * MB})
    added = [cluster.add_node(num_cpus=2, object_store_memory=150 * MB) for _ in range(nodes)]
    ray.init(address=cluster.address, runtime_env=worker_runtime_env(), log_to_driver=False, logging_level="WARNING")
    corpus, labels = os.path.join(out, "images"), os.path.join(out, "labels")
    write_pngs(corpus, images)
    random_checkpoint(os.path.join(out, "teacher"))
    written = os.path.join(labels, "predictions")
    ready = lambda: os.path.isdir(written) and len(os.listdir(written)) >= 2  # noqa: E731
    acts = {
        "remove_node": lambda: cluster.remove_node(added[-1], allow_graceful=False),
        "kill_actor": lambda: [os.kill(pid, signal.SIGKILL) or killed.append(pid) for pid in _predictor_pids()[:1]],
    }
    injected: list = []
    killed: list = []
    if fault in acts:
        threading.Thread(target=_when, args=(ready, acts[fault], injected), daemon=True).start()
    opts = LabelOptions(num_actors=num_actors, files_per_unit=500, stall_timeout_s=90)
    result: dict = {"fault": fault, "images": images}
    start = time.time()
    try:
        manifest = run_labeling(corpus, os.path.join(out, "teacher"), labels, opts)
        result.update(finished=True, manifest_rows=manifest["rows"], resumed_from=manifest["resumed_from"])
    except Exception as err:  # noqa: BLE001 - reported to the test
        result.update(finished=False, error=f"{type(err).__name__}: {err}")
    injected = injected and (fault != "kill_actor" or killed)  # an actor was really killed
    result.update(seconds=round(time.time() - start, 1), injected=bool(injected))
    if result["finished"]:
        result.update(predictions_summary(labels))
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # a stuck dataset cannot be shut down; the cluster dies with this process


def training_node_loss(out: str) -> dict:
    """Two 1-CPU worker nodes hold the two training workers; the second is removed after the first
    checkpoint, and a replacement joins ``REPLACEMENT_AFTER_S`` later. The head (the driver's node) has no CPU."""
    from pipeline.digits import write_digits_corpus
    from tests.test_trainer_faults import _wait_for_checkpoint, long_run

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 * MB})
    added = [cluster.add_node(num_cpus=1, object_store_memory=100 * MB) for _ in range(2)]
    ray.init(address=cluster.address, runtime_env=worker_runtime_env(), log_to_driver=False, logging_level="WARNING")
    data, storage, model = (os.path.join(out, d) for d in ("digits", "storage", "model"))
    write_digits_corpus(data, labels_per_class=5, test_fraction=0.3, seed=0, val_per_class=3)
    events: dict = {}
    result: dict = {}

    def train() -> None:
        try:
            result.update(finished=True, final=long_run(data, storage, model))
        except Exception as err:  # noqa: BLE001 - reported to the test
            result.update(finished=False, error=f"{type(err).__name__}: {err}")

    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()  # the faults from the main thread: Cluster.add_node does not work from another one
    _wait_for_checkpoint(storage)
    cluster.remove_node(added[-1], allow_graceful=False)
    events["removed"] = time.time()
    time.sleep(REPLACEMENT_AFTER_S)
    cluster.add_node(num_cpus=1, object_store_memory=100 * MB)
    events["replaced"] = time.time()
    trainer.join()
    result.update(removed="removed" in events, replaced="replaced" in events)
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)


def autoscaling_head(root: str, gpu_nodes: int) -> tuple[subprocess.Popen, str]:
    """The ``cluster.yaml`` shape on this machine: a head with no CPU started with Ray's fake autoscaler,
    which adds worker nodes of 2 CPUs and 1 (fake) GPU, from 0 up to ``gpu_nodes``, as demand appears.

    Ray's own ``AutoscalingCluster`` runs ``ray stop --force`` (every Ray process on the machine); this
    head runs in its own process group, and :func:`stop_head` ends exactly that group."""
    from tests.s3_server import free_port

    port = free_port()
    config = {
        "cluster_name": "fake", "max_workers": gpu_nodes, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{port}", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"}, "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": 150 * MB},
                           "node_config": {},
                           "min_workers": 0, "max_workers": gpu_nodes},
        },
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }  # fmt: skip
    path = os.path.join(root, "autoscaling.json")
    with open(path, "w") as f:
        json.dump(config, f)
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    args = ["ray", "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
            f"--autoscaling-config={path}", f"--temp-dir={tempfile.mkdtemp(prefix='rasc', dir='/tmp')}",
            "--disable-usage-stats", "--include-dashboard=false", "--object-store-memory", str(100 * MB)]  # fmt: skip
    log = open(os.path.join(root, "head.log"), "w")  # noqa: SIM115 - the head's output, for a failing test
    head = subprocess.Popen(args, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    return head, f"127.0.0.1:{port}"


def stop_head(head: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            return
        time.sleep(3)


def autoscaling(out: str) -> dict:
    """Labeling with GPU actors (1 to start, up to 2), then training on 2 GPU workers, on a cluster that
    starts with no worker node at all."""
    from core.model import load_spec
    from pipeline.digits import write_digits_corpus
    from trainer.api import train_model
    from trainer.settings import TrainSettings

    head, address = autoscaling_head(out, gpu_nodes=2)
    result: dict = {}
    try:
        for _ in range(60):  # the head's GCS
            try:
                ray.init(address=address, runtime_env=worker_runtime_env(), log_to_driver=True, logging_level="WARNING")
                break
            except ConnectionError:
                time.sleep(1)
        result["gpus_at_start"] = ray.cluster_resources().get("GPU", 0)
        paths = write_digits_corpus(os.path.join(out, "data"), labels_per_class=2, test_fraction=0.1, seed=0)
        corpus = os.path.join(out, "images")
        write_pngs(corpus, 4000)
        ckpt = os.path.join(out, "teacher")
        random_checkpoint(ckpt, image_size=16)
        opts = LabelOptions(num_actors=1, max_actors=2, num_gpus_per_actor=1, files_per_unit=250)
        manifest = run_labeling(corpus, ckpt, os.path.join(out, "labels"), opts)
        result.update(labeled=manifest["rows"], **predictions_summary(os.path.join(out, "labels")))
        settings = TrainSettings(epochs=1, batch_size=8, num_workers=2, use_gpu=True, checkpoint_every=1)
        train_model(settings, load_spec(ckpt), paths["labeled"], os.path.join(out, "student"),
                    os.path.join(out, "ray_train"), "autoscaling", label="autoscaling")  # fmt: skip
        result.update(trained=True, gpu_nodes=[n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU")])
    except Exception as err:  # noqa: BLE001 - reported to the test
        result.update(error=f"{type(err).__name__}: {err}")
    print("RESULT " + json.dumps(result), flush=True)
    time.sleep(2)  # the workers' last log lines
    ray.shutdown()
    stop_head(head)
    os._exit(0)


if __name__ == "__main__":
    configure_console()
    scenario, out, *args = sys.argv[1:]
    if scenario == "labeling":
        labeling_fault(out, int(args[0]), int(args[1]), int(args[2]), args[3])
    elif scenario == "training_node_loss":
        training_node_loss(out)
    elif scenario == "autoscaling":
        autoscaling(out)
