"""``labeler`` / ``python -m labeler``: label an image corpus with a teacher checkpoint.

Examples::

    labeler --input s3://bucket/images/ --checkpoint s3://bucket/teacher/ --output s3://bucket/labels/
    labeler --input ./photos --checkpoint resnet50.safetensors --arch resnet50 \\
            --num-classes 1000 --image-size 224 --output ./labels
    labeler dedup --input ./labels --eval test=./test --output ./dedup   # see `labeler dedup --help`
"""

from __future__ import annotations

import argparse
import sys
import traceback

from core.checkpoint_import import STATE_DICT_SUFFIXES
from core.console import configure_console
from core.model import ModelSpec
from core.ray_runtime import keeps_sigterm_status, start_or_join_ray
from core.settings import add_arguments, from_args
from labeler.api import LabelingStalled, LabelOptions, check_labeling_inputs, run_labeling
from labeler.dedup_cli import main as dedup_main


def build_parser() -> argparse.ArgumentParser:
    """The ``labeler`` parser: the job's inputs, then one option per ``LabelOptions`` field (same names, in
    ``--kebab-case``; ``--name`` / ``--no-name`` for switches), generated from the dataclass."""
    p = argparse.ArgumentParser(
        prog="labeler", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--input",
        required=True,
        help="image folder tree, Parquet, WebDataset .tar shards or a manifest of URIs (.txt; local or s3://)",
    )
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint dir with model.json, or a .safetensors/.pth/.pt/.bin state dict"
    )
    p.add_argument("--output", required=True, help="output folder: predictions/ (Parquet) and manifest.json")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete what an earlier job wrote under --output first (without it, an output made from other inputs "
        "is refused, and one made from the same inputs is resumed)",
    )
    p.add_argument("--arch", help="timm architecture (bare state-dict files only)")
    p.add_argument("--num-classes", type=int, help="number of classes (bare state-dict files only)")
    p.add_argument("--image-size", type=int, default=224, help="eval input size (bare state-dict files only)")
    p.add_argument("--crop-pct", type=float, default=0.875, help="eval centre-crop fraction (bare files only)")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--verbose", action="store_true", help="show Ray's worker logs and Ray Data's progress too")
    options = p.add_argument_group("labeling options (labeler.api.LabelOptions; label.* in a noisy-student config)")
    add_arguments(options, LabelOptions)
    return p


def options_from_args(args: argparse.Namespace) -> LabelOptions:
    """The ``LabelOptions`` the parsed command line asks for.

    Raises:
        ValueError: for a value outside a field's choices.
    """
    return from_args(LabelOptions, args)


@keeps_sigterm_status
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["dedup"]:  # `labeler dedup ...`: near-duplicates of evaluation images (labeler.dedup_cli)
        return dedup_main(argv[1:])
    args = build_parser().parse_args(argv)
    import ray

    configure_console(args.verbose)
    spec = None
    if args.checkpoint.endswith(STATE_DICT_SUFFIXES):
        if not (args.arch and args.num_classes):
            print("labeler: error: a bare state-dict file needs --arch and --num-classes", file=sys.stderr)
            return 2
        spec = ModelSpec(args.arch, [str(i) for i in range(args.num_classes)], args.image_size, crop_pct=args.crop_pct)
    try:
        opts = options_from_args(args)
        # the inputs first, so a wrong one is reported before a Ray cluster is started
        plan = check_labeling_inputs(args.input, args.checkpoint, args.output, opts, spec, args.overwrite)
        if not ray.is_initialized():
            start_or_join_ray(args.address, args.verbose)
        run_labeling(args.input, args.checkpoint, args.output, opts, spec, overwrite=args.overwrite, plan=plan)
    except (ValueError, OSError, LabelingStalled) as err:  # OSError: missing files, permissions, storage access
        # caused by the input (a bug keeps its traceback): one message; --verbose shows the traceback too
        if args.verbose:
            traceback.print_exc()
        print(f"labeler: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
