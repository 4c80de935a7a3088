"""Device-hours for a Noisy Student iteration, from per-image costs measured here and now.

    python benchmarks/cost_model.py --teacher efficientnet_b0 --student efficientnet_b0 --size 224

It times the teacher's eval forward pass (labeling) and the student's training step
(forward + backward + SGD) on this machine's device (CUDA with bf16 when present, else CPU),
then scales them to the corpus: ``--unlabeled`` images labeled once, and ``--epochs`` passes over
``--pseudo-rows`` + ``--labeled`` images for the student. It ignores data loading (the labeler
and trainer overlap it with compute) and multi-GPU scaling losses, so read the result as a lower
bound. Run it on the GPU type you will rent: CPU figures only show the method.
"""

from __future__ import annotations

import argparse
import time

import torch

from core.model import ModelSpec, count_parameters, create_model


def _timed(fn, batches: int) -> float:
    fn()  # warm-up: allocations, kernels, cudnn autotune
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def per_image_seconds(arch: str, size: int, batch: int, batches: int, train: bool) -> float:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_model(ModelSpec(arch, [str(i) for i in range(1000)], size), 0.2, 0.2).to(device)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        if train:
            with amp:
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.inference_mode(), amp:
                model(x)

    model.train(train)
    return _timed(step, batches) / (batches * batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="efficientnet_b0")
    p.add_argument("--student", default="efficientnet_b0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--unlabeled", type=float, default=300e6)
    p.add_argument("--pseudo-rows", type=float, default=130e6)
    p.add_argument("--labeled", type=float, default=1.28e6)
    p.add_argument("--epochs", type=float, default=350)
    p.add_argument("--ratio", type=float, default=3, help="pseudo-labeled images per labeled image in a step")
    p.add_argument(
        "--epoch-over",
        choices=("labeled", "pseudo"),
        default="labeled",
        help="what an epoch counts: passes over the labeled set (the reference code; imagenet_jft config's "
        "student.steps_per_epoch) or over the pseudo-labeled set (student.steps_per_epoch: 0)",
    )
    a = p.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    label_s = per_image_seconds(a.teacher, a.size, a.batch, a.batches, train=False)
    train_s = per_image_seconds(a.student, a.size, a.batch, a.batches, train=True)
    label_h = label_s * a.unlabeled / 3600
    # images through the student: a step holds 1 labeled + ratio pseudo-labeled images per labeled slot
    per_epoch = a.labeled * (1 + a.ratio) if a.epoch_over == "labeled" else a.pseudo_rows * (1 + 1 / a.ratio)
    train_h = train_s * a.epochs * per_epoch / 3600
    params = [count_parameters(create_model(ModelSpec(m, ["c"] * 1000, a.size))) / 1e6 for m in (a.teacher, a.student)]
    print(f"device: {device}; {a.size}px, batch {a.batch}")
    print(f"teacher {a.teacher} ({params[0]:.1f}M): {1 / label_s:,.1f} images/s labeling")
    print(f"student {a.student} ({params[1]:.1f}M): {1 / train_s:,.1f} images/s training")
    print(f"label {a.unlabeled:,.0f} images: {label_h:,.0f} device-hours")
    print(f"train {a.epochs:g} epochs over the {a.epoch_over} set ({a.epochs * per_epoch:,.0f} images at ratio "
          f"{a.ratio:g}): {train_h:,.0f} device-hours")  # fmt: skip


if __name__ == "__main__":
    main()
