"""What ``label.object_store_mb`` costs: labeling time with and without a limit, in one Ray session.

    python benchmarks/read_ahead_limit.py                 # limits 0 (Ray Data's default), 512, 64 MB
    python benchmarks/read_ahead_limit.py --limits 0 16

Corpus: 160 incompressible 512 px PNGs (768 KB each) in folder units of 4 files, so each read block is
about 3 MB; model: timm's ``test_resnet`` with random weights at 128 px. Prints the seconds per limit and,
per limit, how many blocks it holds. A limit that holds few blocks throttles Ray Data's scheduler.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FILES, SIDE, PER_UNIT = 160, 512, 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limits", type=float, nargs="+", default=[0, 512, 64], help="object_store_mb values")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from PIL import Image

    from core.model import ModelSpec, create_model, save_checkpoint
    from labeler.api import LabelOptions, run_labeling

    work = tempfile.mkdtemp(prefix="read_ahead_")
    corpus = os.path.join(work, "corpus")
    os.makedirs(corpus)
    rng = np.random.default_rng(0)
    for i in range(FILES):
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(f"{corpus}/noise_{i:03d}.png")
    block_mb = PER_UNIT * os.path.getsize(f"{corpus}/noise_000.png") / 2**20
    spec = ModelSpec("test_resnet", [str(i) for i in range(10)], 128)
    save_checkpoint(create_model(spec), spec, os.path.join(work, "ckpt"))
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    for limit in args.limits:
        start = time.perf_counter()
        opts = LabelOptions(files_per_unit=PER_UNIT, object_store_mb=limit)
        manifest = run_labeling(corpus, os.path.join(work, "ckpt"), os.path.join(work, f"out-{limit:g}"), opts)
        assert manifest["rows"] == FILES, manifest
        held = f"{limit / block_mb:.0f} read blocks of {block_mb:.1f} MB" if limit else "Ray Data's default"
        print(f"object_store_mb={limit:g} ({held}): {time.perf_counter() - start:.1f} s", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
