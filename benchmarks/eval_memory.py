"""Peak memory of evaluating one checkpoint on a generated class-folder set, at several set sizes.

    python benchmarks/eval_memory.py                              # 512 and 2,048 images at 64 px, batch 64
    python benchmarks/eval_memory.py --images 1000 8000 --size 128 --accuracy-only

Writes ``--images`` JPEGs (10 classes, ``--source-size`` px) and a random-weight checkpoint
(``--arch`` at ``--size``), then runs each evaluation in a fresh Python process and prints its peak
resident memory (``ru_maxrss``) and time. ``evaluate_model`` (the default) computes every metric:
accuracy, ECE, 9 corruptions x 5 severities and 3 perturbation sequences of 10 frames;
``--accuracy-only`` runs the trainer's per-epoch pass (top-1/top-5/loss). Streamed evaluation holds
one batch of ``--batch`` images, so its peak should not grow with ``--images``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

CHILD = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from core.model import load_checkpoint
from pipeline.model_eval import evaluate_model
from trainer.data import LabeledBatches
from trainer.evaluate import evaluate
model_dir, root, batch, accuracy_only = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
start = time.perf_counter()
if accuracy_only:
    model, spec = load_checkpoint(model_dir)
    out = evaluate(model, LabeledBatches(root, spec.classes, spec.image_size, spec.in_chans, batch), spec, "cpu", batch)
else:
    out = evaluate_model(model_dir, root, batch=batch)
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_rss_mb": peak_mb, "seconds": time.perf_counter() - start, "top1": out["test_top1"]}))
"""


def write_set(root: str, images: int, size: int, seed: int = 0) -> None:
    """``images`` JPEGs of ``size`` px in 10 class folders (smooth gradients plus noise)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)[None, :, None]
    for i in range(images):
        folder = os.path.join(root, str(i % 10))
        os.makedirs(folder, exist_ok=True)
        arr = np.clip(ramp * rng.random(3) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        with open(os.path.join(folder, f"{i:07d}.jpg"), "wb") as f:
            f.write(buf.getvalue())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--size", type=int, default=64, help="model input size (px)")
    p.add_argument("--source-size", type=int, default=128, help="size of the generated JPEGs (px)")
    p.add_argument("--batch", type=int, default=64, help="evaluation batch (images)")
    p.add_argument("--arch", default="test_resnet")
    p.add_argument("--accuracy-only", action="store_true")
    args = p.parse_args()

    import torch

    from core.model import ModelSpec, create_model, save_checkpoint

    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        spec = ModelSpec(args.arch, [str(c) for c in range(10)], args.size, mean=(0.5,) * 3, std=(0.5,) * 3)
        save_checkpoint(create_model(spec), spec, os.path.join(tmp, "model"))
        for n in args.images:
            root = os.path.join(tmp, f"set_{n}")
            write_set(root, n, args.source_size)
            cmd = [sys.executable, "-c", CHILD, os.path.join(tmp, "model"), root, str(args.batch)]
            out = subprocess.run(cmd + ["1" if args.accuracy_only else "0"], capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            decoded_mb = n * args.size * args.size * 3 / 2**20
            print(f"images {n:>7}  decoded set {decoded_mb:8.1f} MB  peak RSS {result['peak_rss_mb']:8.1f} MB  "
                  f"{result['seconds']:7.1f} s  (batch {args.batch}, {args.size} px, "
                  f"{'accuracy only' if args.accuracy_only else 'every metric'})")  # fmt: skip


if __name__ == "__main__":
    main()
