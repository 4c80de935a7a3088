"""Run by tests/test_labeler_stall.py in its own process (a stuck dataset can only be stopped by
shutting its cluster down): another job's actor holds one of the cluster's two CPUs and the labeler's
actor the other, so reads never run. (A pool too large for the cluster itself is cut to fit before
the job starts, core.cluster; a CPU taken by someone else is not known then.)"""

import os
import sys

import ray

from labeler.api import LabelingStalled, LabelOptions, run_labeling
from tests.helpers import png_bytes, random_checkpoint


class Holder:
    def ready(self) -> bool:
        return True


def main(out: str) -> None:
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    os.makedirs(os.path.join(out, "images"))
    for i in range(20):
        with open(os.path.join(out, "images", f"{i}.png"), "wb") as f:
            f.write(png_bytes(seed=i))
    random_checkpoint(os.path.join(out, "teacher"))
    other_job = ray.remote(num_cpus=1)(Holder).remote()
    ray.get(other_job.ready.remote())
    opts = LabelOptions(num_actors=1, cpus_per_actor=1.0, decode_cpus=1.0, stall_timeout_s=20, wait_for_actors_s=300)
    try:
        run_labeling(os.path.join(out, "images"), os.path.join(out, "teacher"), os.path.join(out, "labels"), opts)
    except LabelingStalled as err:
        print(f"STALLED {err}", flush=True)
        os._exit(3)  # skip the stuck executor's cleanup; the cluster dies with this process
    print("FINISHED", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
