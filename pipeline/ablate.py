"""``noisy-student ablate CONFIG``: the paper's ablations on the same data, seeds and first teacher.

Each variant is the config plus a few overrides, run as its own loop under
``<run_dir>_ablation/<variant>/``. The first teacher is trained once (by the baseline) and
copied into every variant, so differences come from the student side only.
"""

from __future__ import annotations

import logging
import os
import shutil

from omegaconf import DictConfig

from core.storage import join, write_bytes, write_json
from pipeline.config import load_config
from pipeline.loop import format_number, run_loop

logger = logging.getLogger(__name__)

METRICS = ("test_top1", "test_top5", "test_ece", "mce", "flip_rate")


def variants(cfg: DictConfig) -> dict[str, list[str]]:
    """Variant name -> overrides. 'ratio' compares the config's ratio with 1 (or 3 if it is already 1)."""
    ratio = 3 if cfg.student.ratio == 1 else 1
    return {
        "baseline": [],
        "no_student_noise": ["student.randaugment_ops=0", "student.drop_rate=0", "student.drop_path_rate=0"],
        "hard_labels": ["label.hard=true"],
        "no_balancing": ["balance.enabled=false"],
        f"ratio_{ratio}": [f"student.ratio={ratio}"],
    }


def run_ablation(config: str, overrides: list[str] | None = None, only: list[str] | None = None) -> list[dict]:
    """Run every variant (or those in ``only``); writes and returns the comparison rows.

    ``config``: a shipped config's name or a YAML path (``pipeline.config.load_config``).

    Raises:
        ConfigError: for a config (or a variant of it) that cannot run, before any training.
        ValueError: for an ``s3://`` run_dir or an unknown variant name.
    """
    overrides = list(overrides or [])
    cfg = load_config(config, overrides)
    if "://" in cfg.run_dir:
        raise ValueError("ablate writes its variants under a local run_dir; set run_dir to a local path")
    root = os.path.abspath(cfg.run_dir.rstrip("/") + "_ablation")
    todo = variants(cfg)
    unknown = sorted(set(only or []) - set(todo))
    if unknown:
        raise ValueError(f"unknown ablation variants {unknown}; choose from {sorted(todo)}")
    names = ["baseline"] + [n for n in todo if n != "baseline" and (not only or n in only)]
    configs = {n: load_config(config, overrides + todo[n] + [f"run_dir={os.path.join(root, n)}"]) for n in names}
    rows = []
    for name in names:
        run_dir = join(root, name)
        if name != "baseline" and not os.path.exists(join(run_dir, "round_0")):
            shutil.copytree(join(root, "baseline", "round_0"), join(run_dir, "round_0"))
        logger.info(f"=== ablation variant {name}: {' '.join(todo[name]) or '(config as is)'}")
        summary = run_loop(configs[name])
        rows.append({"variant": name, "overrides": todo[name], **{k: summary[-1].get(k) for k in METRICS}})
    write_json(join(root, "ablation.json"), rows)
    table = format_ablation(rows, summary[0])
    write_bytes(join(root, "ablation.md"), (table + "\n").encode())
    logger.info(table)
    return rows


def format_ablation(rows: list[dict], teacher: dict) -> str:
    """Markdown: the last student of each variant; the first teacher's row for reference."""
    head = "| variant | " + " | ".join(METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 1)]
    lines.append("| first teacher | " + " | ".join(format_number(teacher.get(k)) for k in METRICS) + " |")
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(format_number(r[k]) for k in METRICS) + " |")
    return "\n".join(lines)
