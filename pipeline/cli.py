"""``noisy-student``: run the loop, or balance predictions on their own."""

from __future__ import annotations

import argparse
import sys


def _run(args) -> int:
    from pipeline.config import load_config
    from pipeline.loop import run_loop

    cfg = load_config(args.config, args.overrides)
    run_loop(cfg)
    return 0


def _balance(args) -> int:
    import ray

    from pipeline.balance import balance_predictions

    if not ray.is_initialized():
        ray.init()
    stats = balance_predictions(
        args.predictions, args.out, args.num_classes, args.per_class, args.threshold, not args.trim_only
    )
    print(f"balanced: {stats['total_rows']} rows, empty classes {stats['empty_classes']}, "
          f"{stats['refinement_passes']} refinement passes")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="noisy-student", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the Noisy Student loop from a YAML config")
    run.add_argument("config", help="YAML config, e.g. configs/digits.yaml")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. teacher.epochs=5 run_dir=runs/x")
    run.set_defaults(func=_run)
    bal = sub.add_parser("balance", help="confidence-filter and balance a predictions table")
    bal.add_argument("--predictions", required=True, help="Parquet predictions (folder or s3:// URI)")
    bal.add_argument("--out", required=True, help="output folder: balanced/ and balance_stats.json")
    bal.add_argument("--num-classes", type=int, required=True)
    bal.add_argument("--per-class", type=int, required=True, help="target rows per class")
    bal.add_argument("--threshold", type=float, default=0.3)
    bal.add_argument("--trim-only", action="store_true", help="do not duplicate rows of small classes")
    bal.set_defaults(func=_balance)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as err:
        print(f"noisy-student: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
