"""Run by tests/test_multinode.py in its own process: a simulated 3-node cluster, then labeling
and training on it. Prints one ``RESULT {json}`` line with the node ids; the placement lines
come from the labeler's and the trainer's own start-up messages."""

import json
import os
import sys

import ray
from ray.cluster_utils import Cluster

from core.model import load_spec
from labeler.api import LabelOptions, run_labeling
from pipeline.digits import write_digits_corpus
from tests.helpers import random_checkpoint
from trainer.api import train_model
from trainer.settings import TrainSettings

MB = 1 << 20


def main(out: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 * MB})
    gpu_nodes = [cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=100 * MB) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=True)
    try:
        paths = write_digits_corpus(os.path.join(out, "data"), labels_per_class=2, test_fraction=0.1, seed=0)
        ckpt = os.path.join(out, "teacher")
        random_checkpoint(ckpt, image_size=16)
        manifest = run_labeling(paths["unlabeled"], ckpt, os.path.join(out, "labels"),
                                LabelOptions(batch_size=64, num_actors=2))  # fmt: skip
        settings = TrainSettings(epochs=1, batch_size=8, num_workers=2, use_gpu=True, checkpoint_every=1)
        train_model(settings, load_spec(ckpt), paths["labeled"], os.path.join(out, "student"),
                    os.path.join(out, "ray_train"), "multinode", label="multinode")  # fmt: skip
        result = {"gpu_nodes": [n.node_id for n in gpu_nodes], "head": cluster.head_node.node_id,
                  "labeled": manifest["labeled"]}  # fmt: skip
        print("RESULT " + json.dumps(result), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
