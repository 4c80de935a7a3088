"""The demo (``noisy-student run digits``) over several seeds: the README's results table.

    python benchmarks/demo_seeds.py                       # seeds 0 1 2: about 20 min on 2 CPU cores
    python benchmarks/demo_seeds.py --seeds 0 1 2 3 4

Each seed is the demo as a user runs it, ``noisy-student run digits seed=S``, in its own process, with
its own ``run_dir`` and corpus (``runs/demo_seeds/seed_S``, ``runs/demo_seeds/data_S``: the seed also draws
which digits are labeled, validation, unlabeled and test). A single seed's table does not reproduce
from one install to another to the last digit (tiny numeric differences change which equally confident
images balancing keeps), so the table printed is each model's mean over the seeds, with the lowest and
highest value beside it. Exit status 1 when a run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

COLUMNS = ("val_top1", "test_top1", "test_ece", "mce", "flip_rate")


def run_seed(seed: int, root: str, extra: list[str]) -> list[dict]:
    """One demo run in its own process; its ``summary.json`` (one entry per model)."""
    run_dir = os.path.join(root, f"seed_{seed}")
    cmd = [sys.executable, "-m", "pipeline", "run", "digits", f"seed={seed}", f"run_dir={run_dir}",
           f"data.root={os.path.join(root, f'data_{seed}')}", *extra]  # fmt: skip
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def spread_table(runs: list[list[dict]]) -> str:
    """A Markdown table: per model (iteration, role, architecture), each column's mean over the runs
    and its range (lowest-highest)."""
    lines = ["| iteration | role | model | " + " | ".join(COLUMNS) + " |", "|---" * (3 + len(COLUMNS)) + "|"]
    for i, entry in enumerate(runs[0]):
        cells = []
        for column in COLUMNS:
            values = [run[i].get(column) for run in runs if run[i].get(column) is not None]
            if not values:
                cells.append("n/a")
                continue
            cells.append(f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})")
        lines.append(f"| {entry['iteration']} | {entry['role']} | {entry['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default="runs/demo_seeds", help="where the runs and the corpus go")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args(argv)
    runs = []
    for seed in args.seeds:
        try:
            runs.append(run_seed(seed, args.root, args.overrides))
        except subprocess.CalledProcessError as err:
            print(f"seed {seed} failed with exit status {err.returncode}", file=sys.stderr)
            return 1
    print(f"\n{len(runs)} seeds ({', '.join(map(str, args.seeds))}): mean (lowest-highest)\n")
    print(spread_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
