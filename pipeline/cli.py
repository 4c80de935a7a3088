"""``noisy-student``: run the loop, balance predictions, report on a run, or ablate."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from core.console import configure_console
from core.fingerprint import OutputMismatch
from core.ray_runtime import keeps_sigterm_status, start_or_join_ray
from core.settings import add_arguments
from core.storage import absolute
from pipeline.balance import balance_predictions
from pipeline.checks import CheckReport, InputError
from pipeline.config import BalanceConfig, load_config

logger = logging.getLogger("pipeline.cli")
CONFIG_HELP = "a shipped config's name (digits, imagenet_jft) or a YAML file, which may extend one with `base: digits`"


# The commands' modules are imported on use: the loop, the report and ablations import torch and timm (seconds),
# which `noisy-student --help`, a mistyped argument and `noisy-student balance` do not need.


def _run(args) -> int:
    from pipeline.loop import run_loop

    cfg = load_config(args.config, args.overrides)
    run_loop(cfg, overwrite=args.overwrite)
    return 0


def _check(args) -> int:
    """Every check the loop makes before it starts, and nothing else: no Ray, no model built, nothing written
    (except the embedded digits corpus when the config uses it)."""
    from pipeline.loop import preflight

    cfg = load_config(args.config, args.overrides)
    cfg.run_dir = absolute(cfg.run_dir)
    report = CheckReport()
    try:
        _, report, _ = preflight(cfg, report=report, dry_run=True)
    except (InputError, OutputMismatch) as err:
        print("\n".join(report.found))
        print(f"noisy-student check: {err}")
        return 2
    print("\n".join(report.found))
    print(f"noisy-student check: inputs ok ({len(report.warnings)} warnings)")
    return 0


def _report(args) -> int:
    from pipeline.report import write_report

    logger.info(f"report: {write_report(args.run_dir)}")
    return 0


def _ablate(args) -> int:
    from pipeline.ablate import run_ablation

    run_ablation(args.config, args.overrides, args.only)
    return 0


def _balance(args) -> int:
    import ray

    if not ray.is_initialized():
        start_or_join_ray(None, args.verbose)
    stats = balance_predictions(
        args.predictions, args.out, args.num_classes, args.per_class, args.threshold, args.duplicate, args.dedup
    )
    logger.info(f"balanced: {stats['total_rows']} rows, empty classes {stats['empty_classes']}, "
          f"{stats['refinement_passes']} refinement passes")  # fmt: skip
    return 0


@keeps_sigterm_status
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="noisy-student", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose", action="store_true", help="show everything: Ray's worker logs, Ray Data's progress, debug lines"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common], help="run the Noisy Student loop from a YAML config")
    run.add_argument("config", help=CONFIG_HELP)
    run.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. teacher.epochs=5 run_dir=runs/x runlocal=true"
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the stages of run_dir that were made from other inputs, and make them again (without it, "
        "such stages stop the run before anything is computed)",
    )
    run.set_defaults(func=_run)
    chk = sub.add_parser(
        "check",
        parents=[common],
        help="check a config's inputs without computing anything: class sets, schemas, counts per split, formats, "
        "which stages of run_dir would be reused",
    )
    chk.add_argument("config", help=CONFIG_HELP)
    chk.add_argument("overrides", nargs="*", help="key=value overrides, as for run")
    chk.set_defaults(func=_check)
    rep = sub.add_parser("report", parents=[common], help="write RUN_DIR/report.html from a finished (or partial) run")
    rep.add_argument("run_dir", help="the run_dir of a noisy-student run")
    rep.set_defaults(func=_report)
    abl = sub.add_parser("ablate", parents=[common], help="run the ablation variants of a config and compare them")
    abl.add_argument("config", help=CONFIG_HELP)
    abl.add_argument("overrides", nargs="*", help="key=value overrides applied to every variant")
    abl.add_argument("--only", nargs="+", help="variants to run besides the baseline (default: all)")
    abl.set_defaults(func=_ablate)
    bal = sub.add_parser("balance", parents=[common], help="confidence-filter and balance a predictions table")
    bal.add_argument("--predictions", required=True, help="Parquet predictions (folder or s3:// URI)")
    bal.add_argument("--out", required=True, help="output folder: balanced/ and balance_stats.json")
    bal.add_argument("--num-classes", type=int, required=True)
    bal.add_argument("--per-class", type=int, required=True, help="target rows per class")
    add_arguments(bal, BalanceConfig, only=("threshold", "duplicate"))  # the names of the config's balance: section
    bal.add_argument(
        "--dedup",
        help="a labeler dedup --output over these predictions: the rows it excluded (near-duplicates of evaluation "
        "images) are left out before balancing",
    )
    bal.set_defaults(func=_balance)
    args = parser.parse_args(argv)

    configure_console(args.verbose)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # OSError: missing files, permissions, storage refusing access
        # what a user can fix (config errors name their key path): one message, the traceback with --verbose;
        # anything else is a bug and keeps its traceback
        if args.verbose:
            traceback.print_exc()
        print(f"noisy-student: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
