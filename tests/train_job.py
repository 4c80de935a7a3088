"""A training job in its own process (with its own local Ray), for the resume-across-invocations test."""

import json
import sys

from core.ray_runtime import keeps_sigterm_status, start_or_join_ray
from tests.test_trainer_faults import long_run


@keeps_sigterm_status
def main(data: str, storage: str, out: str, print_final: bool = False) -> None:
    start_or_join_ray(None, num_cpus=2, include_dashboard=False)  # as the project's commands start Ray
    final = long_run(data, storage, out)
    if print_final:
        print("FINAL " + json.dumps(final), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4], print_final="--print-final" in sys.argv)
