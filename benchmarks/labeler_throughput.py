"""Labeler throughput against what a user would write instead, on the same images and model.

    python benchmarks/labeler_throughput.py              # 2,000 JPEGs (288 px), efficientnet_b0 at 224, CPU
    python benchmarks/labeler_throughput.py --arch resnet18 --image-size 64 --source-size 64 --images 20000
    python benchmarks/labeler_throughput.py --images 300 --arch test_resnet --image-size 32   # quick

Measurements, each over the same image folder and the same checkpoint:
  labeler    - ``labeler.api.run_labeling`` on a local Ray cluster (read and decode tasks, the inference
               actor pool, Parquet write). Cluster start-up is excluded: the cluster is started and has run
               one trivial Ray Data job first (which creates Ray Data's cluster-lifetime actors, as on any
               cluster that has run a Ray Data job; its time is printed). Everything the labeling job
               itself does is included: its worker processes, the actor importing torch and timm, loading
               and optimising the model, and summarising the output.
  dataloader - a plain PyTorch ``DataLoader(num_workers=N)`` decoding the same files with the same decode
               and resize code, the checkpoint's model (fp32, as loaded) in the main process, predictions
               written to one Parquet file. Model loading and the write are included; the imports of torch
               and timm are not (they are already loaded in this process), which favours the baseline.
  compute    - the forward pass alone on pre-decoded tensors, as the labeler runs it (batch norms folded,
               channels_last, the chosen precision, the actors' malloc settings; in a fresh process): the
               compute limit. The plain model's forward pass is printed too.
With ``--repeats R`` the labeler and the DataLoader loop alternate R times and the median ratio is printed.
The machine is shared and noisy: compare ratios from one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from core.images import decode_image, normalize, resize_center_crop
from core.model import ModelSpec, create_model, load_checkpoint, save_checkpoint
from labeler.inference import optimize_for_inference
from labeler.predict import PRECISIONS, autocast_dtype


def make_corpus(root: str, n: int, size: int) -> list[str]:
    """Real digits (scikit-learn), upscaled to ``size`` RGB with a little noise, as JPEG files."""
    from sklearn.datasets import load_digits

    digits = load_digits().images
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    paths = []
    for i in range(n):
        base = Image.fromarray((digits[i % len(digits)] * 16).clip(0, 255).astype(np.uint8)).resize((size, size))
        arr = np.repeat(np.asarray(base)[:, :, None], 3, axis=2).astype(np.int16) + rng.integers(-8, 8, (size, size, 3))
        path = os.path.join(root, f"img_{i:06d}.jpg")
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


class Files(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], size: int, crop_pct: float):
        self.paths, self.size, self.crop_pct = paths, size, crop_pct

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        with open(self.paths[i], "rb") as f:
            return resize_center_crop(decode_image(f.read()), self.size, self.crop_pct)


def run_dataloader(paths: list[str], ckpt: str, batch: int, workers: int, out: str) -> float:
    """The loop a user would write instead: same decode, same model, predictions to one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    start = time.perf_counter()
    model, spec = load_checkpoint(ckpt)
    files = Files(paths, spec.image_size, spec.crop_pct)
    loader = torch.utils.data.DataLoader(files, batch_size=batch, num_workers=workers)
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


def run_compute_process(paths_root: str, ckpt: str, batch: int, as_labeler: bool, precision: str) -> float:
    """``run_compute`` in a fresh process; as the labeler runs it: with the inference actors' malloc settings."""
    import subprocess
    import sys

    from labeler.api import CPU_INFERENCE_ENV

    env = {**os.environ, **(CPU_INFERENCE_ENV if as_labeler else {})}
    cmd = [sys.executable, __file__, "--compute-only", paths_root, ckpt, str(batch), str(as_labeler), precision]
    return float(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.split()[-1])


def run_compute(paths: list[str], ckpt: str, batch: int, as_labeler: bool, precision: str) -> float:
    """Forward passes on pre-decoded tensors: the plain model, or the model as the labeler runs it."""
    model, spec = load_checkpoint(ckpt)
    dtype = None
    if as_labeler:
        model, _ = optimize_for_inference(model)
        dtype = autocast_dtype(precision, "cpu")
    files = Files(paths[:1024], spec.image_size, spec.crop_pct)
    # normalize() returns channels-last strides (from NHWC), the layout both loops feed the model
    x = normalize(np.stack([files[i] for i in range(len(files))]), spec.mean, spec.std)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        model(x[:batch])  # warm-up: oneDNN builds its kernels on the first call
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            model(x[i : i + batch]).float().softmax(-1).max(-1)
    return len(x) / (time.perf_counter() - start)


def start_cluster() -> float:
    """A local Ray cluster that has run one trivial Ray Data job; returns that job's seconds."""
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    ray.data.range(4, override_num_blocks=2).map_batches(lambda b: b, num_cpus=0.5).materialize()
    return time.perf_counter() - start


def run_labeler(root: str, ckpt: str, out: str, args: argparse.Namespace) -> float:
    from labeler.api import LabelOptions, run_labeling

    opts = LabelOptions(
        batch_size=args.batch, num_actors=args.actors, cpus_per_actor=args.cpus_per_actor,
        threads_per_actor=args.threads, precision=args.precision, optimize=not args.no_optimize,
    )  # fmt: skip
    start = time.perf_counter()
    m = run_labeling(root, ckpt, out, opts)
    return m["rows"] / (time.perf_counter() - start)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--arch", default="efficientnet_b0")
    p.add_argument("--image-size", type=int, default=224, help="the model's input size")
    p.add_argument("--crop-pct", type=float, default=0.875, help="eval centre crop (resize to size / crop_pct)")
    p.add_argument("--source-size", type=int, default=288, help="side of the JPEG files")
    p.add_argument("--batch", type=int, default=16, help="images per forward pass, both loops")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers")
    p.add_argument("--actors", type=int, default=1, help="labeler inference actors")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--threads", type=int, help="torch threads per actor (default: the node's cores)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="the labeler's (auto: fp32 on CPU)")
    p.add_argument("--no-optimize", action="store_true", help="labeler runs the model as loaded")
    p.add_argument("--repeats", type=int, default=1, help="alternate labeler and DataLoader runs this often")
    return p.parse_args()


def main() -> None:
    import ray

    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "images")
        paths = make_corpus(root, args.images, args.source_size)
        spec = ModelSpec(args.arch, [str(i) for i in range(10)], args.image_size, crop_pct=args.crop_pct)
        torch.manual_seed(0)
        ckpt = os.path.join(tmp, "ckpt")
        save_checkpoint(create_model(spec).eval(), spec, ckpt)
        warmup = start_cluster()
        labeler, loader = [], []
        try:
            for r in range(args.repeats):
                labeler.append(run_labeler(root, ckpt, os.path.join(tmp, f"out{r}"), args))
                loader.append(run_dataloader(paths, ckpt, args.batch, args.workers, os.path.join(tmp, f"dl{r}")))
        finally:
            ray.shutdown()
        plain = run_compute_process(root, ckpt, args.batch, as_labeler=False, precision="fp32")
        compute = run_compute_process(root, ckpt, args.batch, as_labeler=True, precision=args.precision)
    print(
        f"{args.images} JPEGs at {args.source_size} px, {args.arch} at {args.image_size}, batch {args.batch}, "
        f"{os.cpu_count()} CPUs, labeler precision {args.precision}{', not optimised' if args.no_optimize else ''}"
    )
    print(f"Ray Data first use on the new cluster (excluded): {warmup:.1f} s")
    for r, (lab, dl) in enumerate(zip(labeler, loader)):
        print(f"run {r + 1}: labeler {lab:8.1f}   DataLoader(num_workers={args.workers}) loop {dl:8.1f} images/s")
    print(f"forward pass, plain model:               {plain:8.1f} images/s")
    print(f"forward pass, as the labeler runs it:    {compute:8.1f} images/s")
    ratio = statistics.median(lab / dl for lab, dl in zip(labeler, loader))
    print(f"labeler / DataLoader = {ratio:.2f}   labeler / compute = {statistics.median(labeler) / compute:.2f}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--compute-only"]:  # the child process of run_compute_process
        root, ckpt, batch, as_labeler, precision = sys.argv[2:]
        files = sorted(os.path.join(root, f) for f in os.listdir(root))
        print(run_compute(files, ckpt, int(batch), as_labeler == "True", precision))
    else:
        main()
