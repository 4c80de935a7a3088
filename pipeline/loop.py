"""The Noisy Student loop: teacher -> pseudo labels -> balanced set -> student -> repeat.

Every stage writes its outputs under ``run_dir/round_<i>/`` and a marker of completion;
running the same command again skips finished stages and resumes training runs from
their last checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import ray

from labeler.api import LabelOptions, run_labeling
from labeler.model import SPEC_FILE, ModelSpec, count_parameters, create_model, load_spec
from pipeline.balance import balance_predictions
from pipeline.digits import write_digits_corpus
from trainer.api import train_model
from trainer.data import list_class_folders
from trainer.settings import TrainSettings

RUNLOCAL = {
    "teacher.epochs": 4, "teacher.checkpoint_every": 2, "student.epochs": 2, "student.checkpoint_every": 1,
    "balance.per_class": 16, "iterations": 1,
}  # fmt: skip


def apply_runlocal(cfg: dict) -> dict:
    """big_vision-style switch: the same config, shrunk to a quick CPU plumbing check."""
    if cfg.get("runlocal"):
        for key, value in RUNLOCAL.items():
            node = cfg
            *path, last = key.split(".")
            for p in path:
                node = node[p]
            node[last] = value
    return cfg


def init_ray(cfg: dict) -> None:
    if ray.is_initialized():
        return
    address = cfg.get("ray", {}).get("address") or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=cfg.get("ray", {}).get("num_cpus"), include_dashboard=False)


def prepare_data(cfg: dict) -> dict:
    """The three splits; writes the embedded digits corpus when none is configured."""
    d = cfg["data"]
    if d["labeled"] and d["unlabeled"]:
        paths = {"labeled": d["labeled"], "unlabeled": d["unlabeled"], "test": d["test"]}
    elif d["labeled"] or d["unlabeled"]:
        raise ValueError("set both data.labeled and data.unlabeled, or neither (to use the embedded digits corpus)")
    else:
        paths = write_digits_corpus(d["root"], d["labels_per_class"], d["test_fraction"], cfg["seed"])
        paths["test"] = d["test"] or paths["test"]
    # absolute: Ray Train workers run in their own working directory
    return {k: _absolute(v) for k, v in paths.items()}


def _absolute(uri: str | None) -> str | None:
    return uri if uri is None or "://" in uri else os.path.abspath(uri)


def _train_settings(section: dict, seed: int, arch: str | None = None) -> TrainSettings:
    keys = {k: v for k, v in section.items() if k not in ("archs", "init_from_teacher")}
    if arch:
        keys["arch"] = arch
    return TrainSettings.from_dict({**keys, "seed": seed})


def _check_student_size(student: ModelSpec, teacher_dir: str, allow_smaller: bool) -> None:
    teacher = load_spec(teacher_dir)
    n_s, n_t = count_parameters(create_model(student)), count_parameters(create_model(teacher))
    if n_s < n_t and not allow_smaller:
        raise ValueError(
            f"student {student.arch} has {n_s:,} parameters, fewer than its teacher {teacher.arch} ({n_t:,}); "
            "Noisy Student needs an equal-or-larger student. Choose a larger student.archs entry, "
            "or set allow_smaller_student=true to override."
        )


def _train(cfg, settings, spec, data, out_dir, name, pseudo=None, init_from=None) -> dict:
    if os.path.exists(os.path.join(out_dir, SPEC_FILE)) and os.path.exists(os.path.join(out_dir, "final.json")):
        with open(os.path.join(out_dir, "final.json")) as f:
            print(f"[{name}] already trained, skipping")
            return json.load(f)
    start = time.time()
    metrics = train_model(
        settings, spec, data["labeled"], out_dir, os.path.join(cfg["run_dir"], "ray_train"), name,
        pseudo=pseudo, test=data["test"], hard=not cfg["label"]["soft"], init_from=init_from, label=name,
    )  # fmt: skip
    metrics["train_seconds"] = round(time.time() - start, 1)
    with open(os.path.join(out_dir, "final.json"), "w") as f:
        json.dump(metrics, f)
    return metrics


def _label_and_balance(cfg: dict, data: dict, teacher_dir: str, round_dir: str, num_classes: int) -> dict:
    labels_dir = os.path.join(round_dir, "labels")
    if not os.path.exists(os.path.join(labels_dir, "manifest.json")):  # absent: not run, or interrupted (resumes)
        lab = cfg["label"]
        opts = LabelOptions(
            batch_size=lab["batch_size"], num_actors=lab["num_actors"], num_gpus_per_actor=lab["num_gpus_per_actor"],
            temperature=lab["temperature"], hard=not lab["soft"], topk=lab["topk"],
        )  # fmt: skip
        run_labeling(data["unlabeled"], teacher_dir, labels_dir, opts)
    stats_path = os.path.join(round_dir, "balance_stats.json")
    if os.path.exists(stats_path):
        with open(stats_path) as f:
            return json.load(f)
    shutil.rmtree(os.path.join(round_dir, "balanced"), ignore_errors=True)
    b = cfg["balance"]
    per_class = b["per_class"] or _auto_per_class(labels_dir, num_classes, b["threshold"])
    return balance_predictions(
        os.path.join(labels_dir, "predictions"), round_dir, num_classes, per_class, b["threshold"], b["duplicate"]
    )


def _auto_per_class(labels_dir: str, num_classes: int, threshold: float) -> int:
    """per_class=0: the mean number of predictions per class (what the corpus supports on average)."""
    with open(os.path.join(labels_dir, "manifest.json")) as f:
        labeled = json.load(f)["labeled"]
    return max(1, labeled // num_classes)


def run_loop(cfg: dict) -> list[dict]:
    """Run all iterations; returns (and writes) the summary, one entry per trained model."""
    cfg = apply_runlocal(cfg)
    init_ray(cfg)
    run_dir = os.path.abspath(cfg["run_dir"])
    cfg["run_dir"] = run_dir
    os.makedirs(run_dir, exist_ok=True)
    data = prepare_data(cfg)
    classes, _ = list_class_folders(data["labeled"])
    d = cfg["data"]
    spec = ModelSpec(cfg["teacher"]["arch"], classes, d["image_size"], mean=tuple(d["mean"]), std=tuple(d["std"]))
    teacher_dir = os.path.join(run_dir, "round_0", "teacher")
    metrics = _train(cfg, _train_settings(cfg["teacher"], cfg["seed"]), spec, data, teacher_dir, "round_0_teacher")
    summary = [_entry(0, "teacher", spec.arch, teacher_dir, metrics)]
    archs = cfg["student"]["archs"]
    for it in range(1, cfg["iterations"] + 1):
        round_dir = os.path.join(run_dir, f"round_{it}")
        stats = _label_and_balance(cfg, data, teacher_dir, round_dir, len(classes))
        arch = archs[min(it - 1, len(archs) - 1)]
        student = ModelSpec(arch, classes, d["image_size"], mean=tuple(d["mean"]), std=tuple(d["std"]))
        _check_student_size(student, teacher_dir, cfg["allow_smaller_student"])
        student_dir = os.path.join(round_dir, "student")
        init = teacher_dir if cfg["student"]["init_from_teacher"] else None
        settings = _train_settings(cfg["student"], cfg["seed"] + it, arch)
        balanced = os.path.join(round_dir, "balanced")
        metrics = _train(cfg, settings, student, data, student_dir, f"round_{it}_student", balanced, init)
        summary.append(_entry(it, "student", arch, student_dir, metrics, stats["total_rows"]))
        teacher_dir = student_dir
    write_summary(run_dir, summary)
    return summary


def _entry(iteration: int, role: str, arch: str, directory: str, metrics: dict, pseudo_rows: int = 0) -> dict:
    return {
        "iteration": iteration,
        "role": role,
        "model": arch,
        "test_top1": metrics.get("test_top1"),
        "test_top5": metrics.get("test_top5"),
        "test_loss": metrics.get("test_loss"),
        "pseudo_rows": pseudo_rows,
        "train_seconds": metrics.get("train_seconds"),
        "checkpoint": directory,
    }


def format_table(summary: list[dict]) -> str:
    head = f"{'iteration':>9}  {'role':<8} {'model':<20} {'test_top1':>9} {'test_top5':>9} {'pseudo_rows':>11}"
    lines = [head, "-" * len(head)]
    for e in summary:
        t1 = "n/a" if e["test_top1"] is None else f"{e['test_top1']:.4f}"
        t5 = "n/a" if e["test_top5"] is None else f"{e['test_top5']:.4f}"
        lines.append(f"{e['iteration']:>9}  {e['role']:<8} {e['model']:<20} {t1:>9} {t5:>9} {e['pseudo_rows']:>11}")
    return "\n".join(lines)


def write_summary(run_dir: str, summary: list[dict]) -> None:
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(format_table(summary))
