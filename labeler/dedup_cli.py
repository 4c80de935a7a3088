"""``labeler dedup``: which images of a corpus are near-duplicates of evaluation images, without a model.

Examples::

    labeler dedup --input s3://bucket/images/ --eval test=s3://bucket/imagenet/val/ --output s3://bucket/dedup/
    labeler dedup --input ./labels --eval val=./val --eval test=./test --labeled ./train --output ./dedup

``--input`` is a corpus (any format the labeler reads; its images are decoded and hashed into
``OUTPUT/hashes/``) or the output folder of a ``labeler`` job (its predictions carry the hashes already).
Writes ``OUTPUT/dedup_stats.json`` (the counts), ``OUTPUT/excluded/`` (the rows within
``--max-distance`` of an evaluation image, with the evaluation image each is nearest to),
``OUTPUT/pairs.json`` and ``OUTPUT/report.html`` (the closest pairs and the farthest still within reach, side
by side). With ``--keep-one-per-group``, the rows excluded as duplicates inside the corpus are in
``OUTPUT/corpus_groups/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from core.console import configure_console
from core.ray_runtime import start_or_join_ray
from core.settings import add_arguments, from_args
from core.storage import absolute, delete_tree, exists, filesystem_for, join, list_files
from labeler.api import LabelOptions
from labeler.dedup import DedupOptions, check_hashed, check_readable, collect_hashes, find_duplicates, hash_dataset
from labeler.dedup_report import write_dedup_report

READ_OPTIONS = ("format", "image_column", "id_column", "files_per_unit", "decode_cpus", "max_pixels")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="labeler dedup", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", required=True, help="a corpus (local or s3://), or a labeler job's output folder")
    p.add_argument(
        "--eval",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an evaluation set (image folder tree, Parquet or manifest), repeatable",
    )
    p.add_argument("--labeled", help="the labeled set: rows equal to one of its images are counted")
    p.add_argument("--output", required=True, help="output folder (local or s3://)")
    p.add_argument("--overwrite", action="store_true", help="delete what an earlier run wrote under --output first")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--verbose", action="store_true", help="show Ray's worker logs and Ray Data's progress too")
    near = p.add_argument_group("near-duplicate options (dedup.* in a noisy-student config)")
    add_arguments(near, DedupOptions, only=("max_distance", "keep_one_per_group"))
    reading = p.add_argument_group("reading the corpus (labeler options)")
    add_arguments(reading, LabelOptions, only=READ_OPTIONS)
    return p


def _eval_sets(specs: list[str]) -> dict[str, str]:
    sets = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--eval takes NAME=PATH (e.g. --eval test=./test), not {spec!r}")
        if name in sets:
            raise ValueError(f"--eval names {name!r} twice; give each evaluation set its own name")
        sets[name] = path
    if not sets:
        raise ValueError("give at least one evaluation set: --eval NAME=PATH")
    return sets


def _labeler_output(path: str) -> bool:
    return exists(join(path, "inputs.json")) and exists(join(path, "predictions"))


def _check_output(out: str, overwrite: bool) -> None:
    if not list_files(out)[1]:
        return
    if not overwrite:
        raise ValueError(f"{out} is not empty; choose a new --output, or pass --overwrite to delete what is there")
    delete_tree(out)


def _hashes(option: str, path: str):
    """``collect_hashes`` of a set given by ``option``, whose errors name the option.

    Raises:
        ValueError: the set holds no file the labeler reads, or no image that decodes.
    """
    try:
        table = collect_hashes(path)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"{option}: {err}") from err
    check_readable(table, f"{option} {path}")
    return table


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import ray

    configure_console(args.verbose)
    try:
        options = from_args(DedupOptions, args)
        reading = LabelOptions(**{name: getattr(args, name) for name in READ_OPTIONS})
        # absolute: Ray's workers run in their own working directory
        sets = {name: absolute(path) for name, path in _eval_sets(args.eval).items()}
        source, out = absolute(args.input), absolute(args.output)
        labeled_set = absolute(args.labeled) if args.labeled else None
        named = {**{f"--eval {name}": path for name, path in sets.items()}, "--input": source, "--labeled": labeled_set}
        for name, path in named.items():
            if path and not exists(path):
                raise FileNotFoundError(f"{name}: {path} does not exist")
        labeled_already = _labeler_output(source)  # its predictions carry the hashes
        root = join(source, "predictions") if labeled_already else join(out, "hashes")
        if labeled_already:
            check_hashed(root)
        _check_output(out, args.overwrite)
        if not ray.is_initialized():
            start_or_join_ray(args.address, args.verbose)
        # the evaluation and labeled sets first (small): a problem with one shows before the corpus is hashed
        hashed = {name: _hashes(f"--eval {name}", path) for name, path in sets.items()}
        labeled = _hashes("--labeled", labeled_set).select(["phash"]) if labeled_set else None
        if not labeled_already:
            fs, path = filesystem_for(root)
            hash_dataset(source, reading).write_parquet(path, filesystem=fs)
        stats = find_duplicates(root, hashed, out, labeled, options.max_distance, options.keep_one_per_group)
        report = write_dedup_report(out, source)
    except (ValueError, OSError) as err:
        if args.verbose:
            traceback.print_exc()
        print(f"labeler dedup: error: {err}", file=sys.stderr)
        return 2
    shown = ("hashed", "unhashed", "near_duplicates_of_eval", "corpus_duplicates", "excluded")
    print(json.dumps({k: stats[k] for k in shown}))
    print(f"report: {report}")
    return 0
