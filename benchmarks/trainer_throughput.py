"""Training images/s of the TorchTrainer path against a plain single-process PyTorch loop.

    python benchmarks/trainer_throughput.py                       # resnet10t at 32x32, batch 64
    python benchmarks/trainer_throughput.py --arch test_resnet --epochs 3   # quick

Same model, batch, augmentation (timm RandAugment 2 ops at magnitude 9), loss and optimizer in
all three; the data is the digits corpus decoded once into memory, as the trainer does:
  plain       - the loop a user would write: Python process, all cores as torch threads;
  trainer x1  - ``trainer.api.train_model`` with 1 worker owning every core;
  trainer x2  - 2 workers (DDP on gloo), one core each;
  stream x1   - 1 worker with ``feed: ray_data`` (decode + RandAugment in Ray Data tasks), one
                core for the worker and the rest for the tasks.
Trainer figures are the workers' own per-epoch images/s (start-up, data loading and the first
epoch excluded); the plain loop is timed the same way. Prints the ratios to the plain loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from core.model import ModelSpec, create_model
from pipeline.digits import write_digits_corpus
from trainer.data import load_labeled
from trainer.loop import Cycler, build_optimizer, seed_everything, steps_per_epoch
from trainer.noise import augment_batch, randaugment, smooth, soft_cross_entropy
from trainer.settings import TrainSettings


def plain_loop(s: TrainSettings, spec: ModelSpec, labeled: str, steps: int, epochs: int) -> float:
    """Median images/s over epochs 2.. of the loop a user would write by hand."""
    seed_everything(s.seed)
    data = load_labeled(labeled, spec.classes, spec.image_size)
    model = create_model(spec, s.drop_rate, s.drop_path_rate).train()
    opt = build_optimizer(model, s)
    transform = randaugment(s.randaugment_ops, s.randaugment_magnitude, spec.image_size)
    batches = Cycler(len(data), s.batch_size, 0, 1, s.seed)
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        for _ in range(steps):
            idx = batches.next()
            x = augment_batch(data.images[idx], transform, spec.mean, spec.std)
            loss = soft_cross_entropy(model(x), smooth(torch.from_numpy(data.targets[idx]), s.label_smoothing))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates.append(steps * s.batch_size / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def trainer_path(s: TrainSettings, spec: ModelSpec, labeled: str, tmp: str, name: str) -> float:
    from trainer.api import train_model

    out = os.path.join(tmp, name)
    train_model(s, spec, labeled, out, os.path.join(tmp, "ray_train"), name)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rates = [json.loads(line)["images_per_s"] for line in f]
    return statistics.median(rates[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet10t")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    a = p.parse_args()
    import ray

    tmp = tempfile.mkdtemp(prefix="trainer_bench_")
    paths = write_digits_corpus(os.path.join(tmp, "data"), labels_per_class=60, test_fraction=0.1, seed=0)
    spec = ModelSpec(a.arch, [str(i) for i in range(10)], 32, mean=(0.5,) * 3, std=(0.5,) * 3)
    base = dict(arch=a.arch, epochs=a.epochs, batch_size=a.batch, warmup_epochs=0, checkpoint_every=a.epochs,
                eval_every=a.epochs, recalibrate_bn=False, use_gpu=False)  # fmt: skip
    steps = steps_per_epoch(600, None, TrainSettings(**base))  # one epoch over the 600 labeled images
    torch.set_num_threads(a.cpus)
    plain = plain_loop(TrainSettings(**base, num_workers=1), spec, paths["labeled"], steps, a.epochs)
    ray.init(address="local", num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
    one = trainer_path(TrainSettings(**base, num_workers=1, cpus_per_worker=a.cpus), spec, paths["labeled"], tmp, "x1")
    two = trainer_path(TrainSettings(**base, num_workers=2, cpus_per_worker=a.cpus / 2), spec, paths["labeled"], tmp,
                       "x2")  # fmt: skip
    stream = trainer_path(TrainSettings(**base, num_workers=1, cpus_per_worker=1, feed="ray_data"), spec,
                          paths["labeled"], tmp, "stream")  # fmt: skip
    ray.shutdown()
    print(f"{a.arch} 32x32, batch {a.batch}, RandAugment 2x9, {a.cpus} CPUs, {a.epochs} epochs of {steps} steps")
    print(f"plain loop:      {plain:8.1f} images/s")
    print(f"TorchTrainer x1: {one:8.1f} images/s  ratio {one / plain:.2f}")
    print(f"TorchTrainer x2: {two:8.1f} images/s  ratio {two / plain:.2f}")
    print(f"ray_data feed x1:{stream:8.1f} images/s  ratio {stream / plain:.2f}")


if __name__ == "__main__":
    main()
