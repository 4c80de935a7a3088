"""``labeler`` / ``python -m labeler``: label an image corpus with a teacher checkpoint.

Examples::

    labeler --input s3://bucket/images/ --checkpoint s3://bucket/teacher/ --output s3://bucket/labels/
    labeler --input ./photos --checkpoint resnet50.safetensors --arch resnet50 \\
            --num-classes 1000 --image-size 224 --output ./labels
"""

from __future__ import annotations

import argparse
import sys

from labeler.api import LabelingStalled, LabelOptions, run_labeling
from labeler.model import ModelSpec
from labeler.predict import PRECISIONS
from labeler.sources import FORMATS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="labeler", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--input",
        required=True,
        help="image folder tree, Parquet, WebDataset .tar shards or a manifest of URIs (.txt; local or s3://)",
    )
    p.add_argument("--format", default="auto", choices=list(FORMATS))
    p.add_argument("--image-column", default="image", help="Parquet: column with the image bytes")
    p.add_argument("--id-column", help="Parquet: column with a stable id (default: file + content hash)")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir with model.json, or a .safetensors/.pth file")
    p.add_argument("--output", required=True, help="output folder: predictions/ (Parquet) and manifest.json")
    p.add_argument("--arch", help="timm architecture (bare state-dict files only)")
    p.add_argument("--num-classes", type=int, help="number of classes (bare state-dict files only)")
    p.add_argument("--image-size", type=int, default=224, help="eval input size (bare state-dict files only)")
    p.add_argument("--crop-pct", type=float, default=0.875, help="eval centre-crop fraction (bare files only)")
    p.add_argument("--batch-size", type=int, help="images per inference call (default: 256 on GPU, 16 on CPU)")
    p.add_argument("--num-actors", type=int, default=1, help="inference actors (min of the pool)")
    p.add_argument("--max-actors", type=int, help="max inference actors (autoscaling pool)")
    p.add_argument("--gpus-per-actor", type=float, help="default: 1 when the cluster has GPUs, else 0")
    p.add_argument("--temperature", type=float, default=1.0, help="soft labels are softmax(logits / T)")
    p.add_argument("--hard", action="store_true", help="one-hot labels instead of soft")
    p.add_argument("--topk", type=int, default=0, help="store top-k classes + fp16 probs + rest mass (0: full)")
    p.add_argument(
        "--keep-image-bytes",
        action="store_true",
        help="write each labeled image's bytes into the predictions (column image): a self-contained training set",
    )
    p.add_argument(
        "--image-bytes-min-confidence", type=float, default=0.0, help="keep bytes only at or above this confidence"
    )
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument(
        "--no-optimize", action="store_true", help="run the model as loaded (no batch-norm folding, no channels_last)"
    )
    p.add_argument("--stall-timeout", type=float, default=900.0, help="fail after this many seconds without output")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--verbose", action="store_true", help="show Ray's worker logs and Ray Data's progress too")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import ray

    from labeler.progress import configure_console, ray_init_kwargs

    configure_console(args.verbose)
    spec = None
    if args.checkpoint.endswith((".safetensors", ".pth", ".pt")):
        if not (args.arch and args.num_classes):
            print("labeler: error: a bare state-dict file needs --arch and --num-classes", file=sys.stderr)
            return 2
        spec = ModelSpec(args.arch, [str(i) for i in range(args.num_classes)], args.image_size, crop_pct=args.crop_pct)
    opts = LabelOptions(
        batch_size=args.batch_size, num_actors=args.num_actors, max_actors=args.max_actors,
        num_gpus_per_actor=args.gpus_per_actor, temperature=args.temperature, hard=args.hard,
        format=args.format, image_column=args.image_column, id_column=args.id_column, topk=args.topk,
        stall_timeout_s=args.stall_timeout, optimize=not args.no_optimize, precision=args.precision,
        keep_image_bytes=args.keep_image_bytes, image_bytes_min_confidence=args.image_bytes_min_confidence,
    )  # fmt: skip
    if not ray.is_initialized():
        ray.init(address=args.address, **ray_init_kwargs(args.verbose))
    try:
        run_labeling(args.input, args.checkpoint, args.output, opts, spec)
    except (ValueError, FileNotFoundError, LabelingStalled) as err:
        print(f"labeler: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
