"""Labeler throughput against what a user would write instead, on the same images and model.

    python benchmarks/labeler_throughput.py                     # 3,000 PNGs, resnet18 at 64x64, CPU
    python benchmarks/labeler_throughput.py --images 500 --arch test_resnet   # quick

Three measurements in one run, each over the same image folder and the same checkpoint:
  labeler   - ``labeler.api.run_labeling`` on a local Ray cluster (read, decode tasks, actor pool,
              Parquet write), cluster start-up excluded, actor start-up included;
  dataloader- a plain PyTorch ``DataLoader(num_workers=N)`` decoding the same files with the same
              decode + resize code, the model in the main process, predictions written to one
              Parquet file (model loading and the write included, as in the labeler);
  compute   - the model's forward pass alone on pre-decoded tensors (the compute limit).
Prints images/s of each and the ratios labeler/dataloader and labeler/compute. The machine
is shared and noisy: compare ratios from one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from labeler.images import decode_image, normalize, resize_center_crop
from labeler.model import ModelSpec, create_model, load_checkpoint, save_checkpoint


def make_corpus(root: str, n: int, size: int) -> list[str]:
    """Real digits (scikit-learn), upscaled to ``size`` RGB with a little noise, as PNG files."""
    from sklearn.datasets import load_digits

    digits = load_digits().images
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    paths = []
    for i in range(n):
        base = Image.fromarray((digits[i % len(digits)] * 16).clip(0, 255).astype(np.uint8)).resize((size, size))
        arr = np.repeat(np.asarray(base)[:, :, None], 3, axis=2).astype(np.int16) + rng.integers(-8, 8, (size, size, 3))
        path = os.path.join(root, f"img_{i:06d}.png")
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


class Files(torch.utils.data.Dataset):
    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with open(self.paths[i], "rb") as f:
            return resize_center_crop(decode_image(f.read()), self.size)


def run_dataloader(paths, ckpt, batch, workers, out) -> float:
    """The loop a user would write instead: same decode, same model, predictions to one Parquet file.

    Timed like the labeler: model loading, decoding, inference and writing the output.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    start = time.perf_counter()
    model, spec = load_checkpoint(ckpt)
    loader = torch.utils.data.DataLoader(Files(paths, spec.image_size), batch_size=batch, num_workers=workers)
    labels, confidence, probs = [], [], []
    with torch.inference_mode():
        for imgs in loader:
            p = model(normalize(imgs.numpy(), spec.mean, spec.std)).softmax(-1)
            conf, label = p.max(-1)
            labels.append(label.numpy())
            confidence.append(conf.numpy())
            probs.extend(p.numpy())
    table = pa.table({"id": [os.path.basename(x) for x in paths], "path": paths, "label": np.concatenate(labels),
                      "confidence": np.concatenate(confidence), "probs": probs})  # fmt: skip
    os.makedirs(out, exist_ok=True)
    pq.write_table(table, os.path.join(out, "predictions.parquet"))
    return len(paths) / (time.perf_counter() - start)


def run_compute(paths, ckpt, batch) -> float:
    model, spec = load_checkpoint(ckpt)
    x = np.stack([Files(paths, spec.image_size)[i] for i in range(len(paths))])
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            model(normalize(x[i : i + batch], spec.mean, spec.std)).softmax(-1).max(-1)
    return len(x) / (time.perf_counter() - start)


def run_labeler(root, ckpt, out, batch, actors, cpus_per_actor, threads) -> float:
    import ray

    from labeler.api import LabelOptions, run_labeling

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        start = time.perf_counter()
        opts = LabelOptions(
            batch_size=batch, num_actors=actors, cpus_per_actor=cpus_per_actor, threads_per_actor=threads
        )
        m = run_labeling(root, ckpt, out, opts)
        return m["rows"] / (time.perf_counter() - start)
    finally:
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers")
    p.add_argument("--actors", type=int, default=1, help="labeler inference actors")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--threads", type=int, help="torch threads per actor (default: the node's cores)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_corpus(os.path.join(tmp, "images"), args.images, args.size)
        spec = ModelSpec(args.arch, [str(i) for i in range(10)], args.size)
        torch.manual_seed(0)
        save_checkpoint(create_model(spec).eval(), spec, os.path.join(tmp, "ckpt"))
        ckpt = os.path.join(tmp, "ckpt")
        out = os.path.join(tmp, "out")
        labeler = run_labeler(
            os.path.join(tmp, "images"), ckpt, out, args.batch, args.actors, args.cpus_per_actor, args.threads
        )
        loader = run_dataloader(paths, ckpt, args.batch, args.workers, os.path.join(tmp, "loader_out"))
        compute = run_compute(paths, ckpt, args.batch)
    print(f"{args.images} images, {args.arch} at {args.size}x{args.size}, batch {args.batch}, {os.cpu_count()} CPUs")
    print(f"labeler:                         {labeler:8.1f} images/s")
    print(f"DataLoader(num_workers={args.workers}) loop:  {loader:8.1f} images/s")
    print(f"forward pass on decoded tensors: {compute:8.1f} images/s")
    print(f"labeler / DataLoader = {labeler / loader:.2f}   labeler / compute = {labeler / compute:.2f}")


if __name__ == "__main__":
    main()
