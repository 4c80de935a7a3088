"""The Noisy Student loop: teacher -> pseudo labels -> balanced set -> student -> repeat.

Every stage writes its outputs under ``run_dir/round_<i>/`` and a marker of completion;
running the same command again skips finished stages and resumes training runs from
their last checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import tempfile
import time

import ray
from omegaconf import DictConfig, OmegaConf

from core.checkpoint_import import import_checkpoint
from core.console import Progress, ProgressChannel, log_file, quiet_ray, verbose
from core.model import SPEC_FILE, WEIGHTS_FILE, ModelSpec, count_parameters, load_spec, model_preprocessing
from core.ray_runtime import start_or_join_ray
from core.storage import (
    absolute,
    delete_tree,
    exists,
    is_s3,
    join,
    read_bytes,
    read_json,
    retry_counts,
    write_bytes,
    write_json,
)
from labeler.api import gpus_per_task, run_labeling
from pipeline.balance import balance_predictions
from pipeline.checks import CheckReport, check_inputs
from pipeline.config import RunConfig, as_config, check_model_sizes, student_archs, train_settings
from pipeline.dedup import dedup_folder, dedup_line, run_dedup
from pipeline.digits import write_digits_corpus
from pipeline.model_eval import (
    PER_CLASS_KEYS,
    add_relative_errors,
    evaluate_model,
    mark_worse_than_teacher,
    validate_model,
    worse_than_teacher_warnings,
)
from pipeline.report import role_label, write_report
from pipeline.split import Splits, carve_validation
from pipeline.stages import Stage, check_stages, label_options, plan_stages, recorded_floor, start_stage
from trainer.api import train_model
from trainer.loop import steps_per_epoch
from trainer.settings import TrainSettings

logger = logging.getLogger(__name__)
RUN_INFO_FILE = "run_config.json"
RUN_LOG = "run.log"


def init_ray(cfg: DictConfig) -> None:
    """Join ``ray.address`` (or ``RAY_ADDRESS``), else start a local cluster; quiet unless ``--verbose``."""
    quiet_ray(verbose())
    if ray.is_initialized():
        return
    if start_or_join_ray(cfg.ray.address, verbose(), num_cpus=cfg.ray.num_cpus, include_dashboard=False):
        _FIXED_CLUSTER.append(True)  # a local cluster: its CPUs are all there will be
    if not verbose():
        logger.info(f"Ray's own logs: {_session_logs()} (--verbose shows them here)")


_FIXED_CLUSTER: list[bool] = []  # set when this process started a local cluster (no autoscaler)


def check_stream_cpus(settings: TrainSettings, cluster_cpus: float) -> None:
    """``feed: ray_data`` decodes in Ray Data CPU tasks beside the training workers; on a cluster that
    cannot grow, workers that take every CPU leave decoding waiting forever (a silent hang).

    Raises:
        ValueError: with what to change, when fewer than 1 CPU is left beside the workers.
    """
    if settings.feed != "ray_data":
        return
    taken = settings.num_workers * settings.cpus_per_worker
    if cluster_cpus - taken < 1:
        raise ValueError(
            f"feed: ray_data decodes images in Ray Data tasks beside the training workers, but this local "
            f"cluster has {cluster_cpus:g} CPUs and {settings.num_workers} workers x cpus_per_worker "
            f"{settings.cpus_per_worker:g} take {taken:g} of them, so decoding would wait forever. Use fewer "
            "num_workers, a smaller cpus_per_worker (e.g. 0.5), more ray.num_cpus, or feed: memory."
        )


def _session_logs() -> str:
    try:
        from ray._private.worker import _global_node

        return os.path.join(_global_node.get_session_dir_path(), "logs")
    except Exception:  # a private API: say where they usually are instead
        return "<ray temp dir>/session_latest/logs"


def software_versions() -> dict:
    """Versions of Python and the libraries that decide the results (for the report's header)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("noisy-student-ray", "ray", "torch", "torchvision", "timm", "pyarrow", "numpy", "tensorboardX"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def split_paths(cfg: DictConfig) -> Splits:
    """The splits as configured, before any carving (``carve`` says whether validation will be carved from the
    labeled set: :func:`prepare_data`). Writes the embedded digits corpus when none is configured
    (``check_rules`` has made sure ``data.labeled`` and ``data.unlabeled`` are both set or both null).
    """
    d = cfg.data
    if d.labeled and d.unlabeled:
        paths = {"labeled": d.labeled, "unlabeled": d.unlabeled, "test": d.test}
    else:
        # val/ is written whichever split validates, so data.val or data.val_fraction on a corpus written
        # before does not find it "made with other settings"
        paths = write_digits_corpus(d.root, d.labels_per_class, d.test_fraction, cfg.seed, d.val_per_class)
        paths["test"] = d.test or paths["test"]
    val = d.val or paths.get("val")
    labeled, unlabeled, test, val = (
        absolute(p) if p else p for p in (paths["labeled"], paths["unlabeled"], paths["test"], val)
    )
    return Splits(labeled, unlabeled, test, val, classes_from=labeled, carve=bool(not d.val and d.val_fraction))


def prepare_data(cfg: DictConfig, paths: Splits | None = None) -> Splits:
    """The splits (:func:`split_paths`, or ``paths`` when given) with the validation split carved where
    configured: ``labeled`` (what models train on) and ``val`` then point at the carved parts.

    The validation split, first that applies: ``data.val`` (a labeled set); ``data.val_fraction`` > 0,
    carved per class from the labeled set into ``run_dir/splits/`` (:mod:`pipeline.split`; the carved
    images leave the training set); the digits corpus's own ``val/`` (``data.val_per_class``); none.
    """
    paths = paths or split_paths(cfg)
    if not paths.carve:
        return paths
    splits = join(cfg.run_dir, "splits")
    carved = carve_validation(paths.labeled, cfg.data.val_fraction, cfg.seed, splits, cfg.data.label_column)
    return dataclasses.replace(paths, labeled=carved["labeled"], val=carved["val"])


def _model_spec(cfg: DictConfig, classes: list[str], settings: TrainSettings) -> ModelSpec:
    """The spec a model is trained with: data.image_size/mean/std, or with ``pretrained`` and
    ``preprocessing: model`` the architecture's own mean/std/crop_pct/interpolation (timm's pretrained_cfg)."""
    d = cfg.data
    spec = ModelSpec(settings.arch, classes, d.image_size, mean=tuple(d.mean), std=tuple(d.std))
    if settings.pretrained and settings.preprocessing == "model":
        spec = model_preprocessing(spec)
    return spec


def _finished(model_dir: str) -> dict | None:
    """A model folder's ``final.json`` when the model is complete there (weights spec and metrics), else None."""
    if exists(join(model_dir, SPEC_FILE)) and exists(join(model_dir, "final.json")):
        return read_json(join(model_dir, "final.json"))
    return None


def _supplied_teacher(
    cfg: DictConfig, settings: TrainSettings, spec: ModelSpec, data: Splits, teacher_dir: str, stage: Stage
) -> dict:
    """Round 0 from ``teacher.checkpoint``: converted into ``teacher_dir`` (the project's checkpoint folder,
    its head in the labeled set's class order: ``teacher.classes``), not trained; with ``reset_classifier``
    and another class count, its new head is fine-tuned on the labels."""
    if (done := _finished(teacher_dir)) is not None:
        return done
    start_stage(stage)
    uri = settings.checkpoint if "://" in settings.checkpoint else absolute(settings.checkpoint)
    staged = join(os.path.dirname(teacher_dir.rstrip("/")), "supplied")
    logger.info(f"round 0: the supplied teacher {uri} (teacher training skipped)")
    spec, reset = import_checkpoint(uri, spec, staged, settings.reset_classifier, list(cfg.teacher.classes) or None)
    if reset:  # a new head knows nothing yet: fine-tune the supplied model on the labeled set
        logger.info(f"the supplied teacher's head was re-initialised; fine-tuning it for {settings.epochs} epochs")
        metrics = _train(cfg, settings, spec, data, teacher_dir, "round_0_teacher", init_from=staged, stage=stage)
    else:
        for name in (SPEC_FILE, WEIGHTS_FILE):
            write_bytes(join(teacher_dir, name), read_bytes(join(staged, name)))
        metrics = {"train_seconds": 0.0}
        if data.val:  # validated like a trained model, so a worse student is marked against it
            task = ray.remote(num_cpus=1, num_gpus=gpus_per_task())(validate_model)
            column = cfg.data.label_column
            metrics.update(ray.get(task.remote(teacher_dir, data.val, cfg.eval.batch_size, column)))
    metrics.update(supplied=uri, classifier_reset=reset)
    write_json(join(teacher_dir, "final.json"), metrics)
    return metrics


def _check_student_size(student: ModelSpec, teacher_dir: str, allow_smaller: bool) -> None:
    """The trained teacher's actual spec against the student (``check_model_sizes`` checked the config up front).

    Raises:
        ValueError: when the student has fewer parameters and ``allow_smaller`` is false.
    """
    teacher = load_spec(teacher_dir)
    n_s, n_t = count_parameters(student), count_parameters(teacher)
    if n_s < n_t and not allow_smaller:
        raise ValueError(
            f"student {student.arch} has {n_s:,} parameters, fewer than its teacher {teacher.arch} ({n_t:,}); "
            "Noisy Student needs an equal-or-larger student. Choose a larger student.archs entry, "
            "or set allow_smaller_student=true to override."
        )


def _train(cfg, settings, spec, data, out_dir, name, pseudo=None, init_from=None, stage: Stage | None = None) -> dict:
    if (done := _finished(out_dir)) is not None:
        logger.info(f"[{name}] already trained, skipping (made from the same inputs)")
        return done
    if stage is not None:
        start_stage(stage)
    if _FIXED_CLUSTER:
        check_stream_cpus(settings, ray.cluster_resources().get("CPU", 0))
    logger.info(f"training {name}: {spec.arch}, {settings.epochs} epochs, {settings.num_workers} workers")
    start = time.time()
    metrics = train_model(
        settings, spec, data.labeled, out_dir, join(cfg.run_dir, "ray_train"), name,
        pseudo=pseudo, val=data.val, hard=cfg.label.hard, init_from=init_from, label=name,
        tensorboard=join(cfg.run_dir, "tensorboard", name),
        eval_batch=cfg.eval.batch_size, label_column=cfg.data.label_column,
    )  # fmt: skip
    metrics["train_seconds"] = round(time.time() - start, 1)
    top1 = metrics.get("val_top1", float("nan"))
    logger.info(f"trained {name} in {metrics['train_seconds']:.0f} s: exported epoch {metrics.get('exported_epoch')} "
                f"({metrics.get('export', 'last')}), val_top1 {top1:.4f}")  # fmt: skip
    write_json(join(out_dir, "final.json"), metrics)
    return metrics


def labeled_images_seen(s: TrainSettings, metrics: dict) -> int | None:
    """Labeled images a finished model trained on (its epochs x steps per epoch x labeled batch), from the
    ``steps`` its trainer recorded; None where unknown (a supplied teacher, a run from before ``steps``)."""
    steps = metrics.get("steps")
    return s.epochs * steps * s.batch_size if steps else None


def at_least_as_long(s: TrainSettings, teacher_seen: int | None, pseudo_rows: int = 0) -> TrainSettings:
    """``s`` with ``min_steps_per_epoch`` raised so the student trains on at least ``teacher_seen`` labeled
    images: as many labeled epochs as its teacher, the reference code's rule (google-research/noisystudent
    trains each student at least as long as its teacher, counted in epochs of the labeled set). The floor is
    only a floor: a student whose epoch already holds more steps (one pass over its ``pseudo_rows``, copies
    counted) trains as before, and an explicit ``steps_per_epoch`` wins (with a warning when it makes the
    student shorter). ``teacher_seen`` None (a supplied teacher, or one trained before ``steps`` was
    recorded): nothing to match, said in the log."""
    if not teacher_seen:
        logger.info("student.as_long_as_teacher: the teacher's training length is unknown (a supplied model, or "
                    "one trained before steps were recorded); the student keeps its own")  # fmt: skip
        return s
    need = math.ceil(math.ceil(teacher_seen / s.batch_size) / s.epochs)
    if s.steps_per_epoch > 0:
        if s.steps_per_epoch < need:
            logger.warning(f"student.steps_per_epoch={s.steps_per_epoch} trains on fewer labeled images than its "
                           f"teacher did ({teacher_seen:,}); {need} steps per epoch would match it")  # fmt: skip
        return s
    if need > steps_per_epoch(0, pseudo_rows or None, s):  # else one pass over the pseudo set is already as long
        logger.info(f"student: at least {need} steps per epoch, to train on as many labeled images as its teacher "
                    f"({teacher_seen:,}; student.as_long_as_teacher)")  # fmt: skip
    return dataclasses.replace(s, min_steps_per_epoch=max(s.min_steps_per_epoch, need))


def _evaluate(cfg: DictConfig, model_dir: str, data: Splits, stage: Stage) -> dict:
    """All metrics of one model (``model_dir/eval.json``, computed once); a Ray task, on a GPU if there is one."""
    path = join(model_dir, "eval.json")
    if exists(path):
        return read_json(path)
    if not data.test:
        return {}
    start_stage(stage)
    task = ray.remote(num_cpus=1, num_gpus=gpus_per_task())(evaluate_model)
    extra = {name: absolute(uri) for name, uri in cfg.eval.extra.items()}
    start = time.time()
    logger.info(
        f"evaluating {model_dir}: test split, corruptions, flips" + (f", then {', '.join(extra)}" if extra else "")
    )
    channel = ProgressChannel.create()
    try:
        ref = task.remote(model_dir, data.test, extra, cfg.seed, cfg.eval.batch_size, channel, cfg.data.label_column)
        metrics = _wait_showing_progress(ref, channel, f"evaluating {_model_name(model_dir)} (test split)")
    finally:
        channel.shutdown()
    write_json(path, metrics)
    logger.info(f"evaluated in {time.time() - start:.0f} s: test_top1 {metrics['test_top1']:.4f}, "
                f"ECE {metrics['test_ece']:.4f}, flip rate {metrics['flip_rate']:.4f}")  # fmt: skip
    return metrics


def _wait_showing_progress(ref: ray.ObjectRef, channel: ProgressChannel, desc: str, poll_s: float = 1.0) -> dict:
    """``evaluate_model``'s result (``ray.get(ref)``), its ``{"done", "total"}`` events shown meanwhile as
    one ``Progress`` display, ending at the images it evaluated and skipped."""
    with Progress(desc, unit="img") as display:
        while not ray.wait([ref], timeout=poll_s)[0]:
            for event in channel.drain():
                display.set_total(event.get("total"))
                display.update(event["done"])
        metrics = ray.get(ref)
        for event in channel.drain():  # a short evaluation ends before the first poll: its total comes here
            display.set_total(event.get("total"))
        display.update(metrics["test_images"] + metrics["test_unreadable"])  # the last event may still be queued
        return metrics


def _model_name(model_dir: str) -> str:
    """``round_1/student`` of ``.../round_1/student``: how the console names a model."""
    parts = model_dir.rstrip("/").split("/")
    return "/".join(parts[-2:])


def _label_and_balance(
    cfg: DictConfig,
    data: Splits,
    teacher_dir: str,
    round_dir: str,
    num_classes: int,
    stages: dict[str, Stage],
    corpus: tuple | None = None,
) -> dict:
    labels_dir, it = join(round_dir, "labels"), round_dir.rstrip("/").rsplit("_", 1)[-1]
    stage = stages[f"round_{it}/labels"]
    start_stage(stage)
    if not exists(join(labels_dir, "manifest.json")):
        logger.info(f"labeling {data.unlabeled} with {teacher_dir}")
    # image bytes from the floor the stage was started with (a raised balance.threshold keeps the labels)
    opts = label_options(cfg, recorded_floor(stage))
    # always: a finished job is reused only when the corpus's units are the same files (labeler.units);
    # an interrupted one resumes
    run_labeling(data.unlabeled, teacher_dir, labels_dir, opts, plan=corpus)
    stats_path = join(round_dir, "balance_stats.json")
    if exists(stats_path):
        return read_json(stats_path)
    start_stage(stages[f"round_{it}/balanced"])
    delete_tree(join(round_dir, "balanced"))
    dedup = dedup_folder(round_dir) if cfg.dedup.enabled else None
    excluded = 0
    if dedup:  # near-duplicates of evaluation images never reach balancing (pipeline.dedup)
        delete_tree(dedup)
        excluded = run_dedup(cfg, data, join(labels_dir, "predictions"), dedup)["excluded"]
    b = cfg.balance
    per_class, duplicate = b.per_class or _auto_per_class(labels_dir, num_classes, excluded), b.duplicate
    if not b.enabled:  # confidence filter only: a target no class reaches, and no duplicates
        per_class, duplicate = max(1, _manifest(labels_dir)["labeled"]), False
    start = time.time()
    logger.info(f"balancing: threshold {b.threshold}, {per_class} per class")
    stats = balance_predictions(
        join(labels_dir, "predictions"), round_dir, num_classes, per_class, b.threshold, duplicate, dedup
    )
    empty = stats["empty_classes"] or "none"
    logger.info(f"balanced in {time.time() - start:.0f} s: {stats['total_rows']} rows, "
                f"{stats['refinement_passes']} refinement passes, empty classes {empty}")  # fmt: skip
    return stats


def _manifest(labels_dir: str) -> dict:
    return read_json(join(labels_dir, "manifest.json"))


def _auto_per_class(labels_dir: str, num_classes: int, excluded: int = 0) -> int:
    """per_class=0: the mean number of predictions per class (what the corpus supports on average), less the
    ``excluded`` rows (near-duplicates)."""
    return max(1, (_manifest(labels_dir)["labeled"] - excluded) // num_classes)


def run_loop(cfg: DictConfig | RunConfig | dict, overwrite: bool = False) -> list[dict]:
    """Run all iterations; returns (and writes) the summary, one entry per trained model.

    ``cfg``: ``pipeline.config.load_config``'s result, a ``RunConfig``, or a dict of what differs from
    the defaults (checked the same way; the caller's object is not changed). Before Ray starts, every
    input is checked (``pipeline.checks``) and every stage already in ``run_dir`` is compared with what
    made it (``pipeline.stages``): a stage made from other inputs stops the run, or with ``overwrite`` is
    deleted and made again. The driver's full log (progress, debug lines) goes to ``RUN_DIR/run.log`` too
    (appended; for an ``s3://`` run_dir it is uploaded at the end); Ray's own logs stay in its session folder.

    Raises:
        ConfigError: for a config that cannot run. InputError: inputs that cannot be used (all problems
            listed). OutputMismatch: stages of ``run_dir`` made from other inputs. All before Ray starts.
    """
    cfg = as_config(cfg)
    run_dir = cfg.run_dir = absolute(cfg.run_dir)
    if not is_s3(run_dir):
        os.makedirs(run_dir, exist_ok=True)
        with log_file(os.path.join(run_dir, RUN_LOG)):
            return _run_loop(cfg, run_dir, overwrite)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, RUN_LOG)
        try:
            with log_file(local):
                return _run_loop(cfg, run_dir, overwrite)
        finally:
            with open(local, "rb") as f:
                write_bytes(join(run_dir, RUN_LOG), f.read())


def model_specs(cfg: DictConfig, classes: list[str]) -> dict[str, ModelSpec]:
    """The spec each model of the run is trained with: ``round_0/teacher``, ``round_<i>/student``."""
    specs = {"round_0/teacher": _model_spec(cfg, classes, train_settings(cfg.teacher, cfg.seed))}
    for it, arch in enumerate(student_archs(cfg), start=1):
        specs[f"round_{it}/student"] = _model_spec(cfg, classes, train_settings(cfg.student, cfg.seed + it, arch))
    return specs


CORPUS_LISTING = "unlabeled_listing.parquet"  # in run_dir: a folder corpus's listing, shared by every round


def preflight(
    cfg: DictConfig,
    overwrite: bool = False,
    listing: str | None = None,
    report: CheckReport | None = None,
    dry_run: bool = False,
) -> tuple[Splits, CheckReport, list]:
    """Everything the loop checks before Ray starts: the inputs (``pipeline.checks``; a folder corpus is
    listed into ``listing``, default a scratch file), the model sizes, and which stages of ``run_dir`` are
    reused, resumed, run or redone (``pipeline.stages``). Returns the splits (:func:`split_paths`), the
    report and the stages; logs the warnings. ``report``: where to collect what is found (filled in place,
    so a caller sees it when an error is raised); ``dry_run``: delete nothing (``noisy-student check``).

    Raises:
        InputError, ConfigError, OutputMismatch: as :func:`run_loop`.
    """
    paths = split_paths(cfg)
    report = check_inputs(cfg, paths, listing, report)
    for warning in report.warnings:
        logger.warning(warning)
    report.raise_for_problems()
    classes = report.classes.classes
    check_model_sizes(cfg, len(classes))
    stages = plan_stages(cfg, paths, classes, model_specs(cfg, classes), report.corpus_digest)
    report.found.append(dedup_line(cfg))
    report.found += check_stages(stages, overwrite, dry_run)
    return paths, report, stages


def _run_loop(cfg: DictConfig, run_dir: str, overwrite: bool = False) -> list[dict]:
    # before Ray starts and before the teacher trains
    retried_before = retry_counts()  # the run log's count: this run's retries, not those of earlier runs here
    paths, report, planned = preflight(cfg, overwrite, join(run_dir, CORPUS_LISTING))
    for line in report.found:
        logger.debug(f"check: {line}")
    stages = {s.name: s for s in planned}
    data = prepare_data(cfg, paths)
    classes = report.classes.classes
    init_ray(cfg)
    supplied = cfg.teacher.checkpoint  # a supplied first teacher: not trained by this run
    info = {"config": OmegaConf.to_container(cfg), "versions": software_versions(), "argv": sys.argv,
            "teacher_supplied": supplied}  # fmt: skip
    write_json(join(run_dir, RUN_INFO_FILE), info)
    logger.info(f"validation split: {data.val}" if data.val else
                "no validation split (data.val, data.val_fraction): every model exports its last epoch")  # fmt: skip
    teacher_dir = join(run_dir, "round_0", "teacher")
    settings = train_settings(cfg.teacher, cfg.seed)
    spec = _model_spec(cfg, classes, settings)
    if settings.checkpoint:
        metrics = _supplied_teacher(cfg, settings, spec, data, teacher_dir, stages["round_0/teacher"])
    else:
        metrics = _train(cfg, settings, spec, data, teacher_dir, "round_0_teacher", stage=stages["round_0/teacher"])
    teacher_seen = labeled_images_seen(settings, metrics)
    spec = load_spec(teacher_dir)
    evaluation = _evaluate(cfg, teacher_dir, data, stages["round_0/teacher evaluation"])
    summary = [_entry(0, "teacher", spec.arch, teacher_dir, metrics, evaluation)]
    if settings.checkpoint:
        summary[0]["supplied"] = metrics.get("supplied", settings.checkpoint)
    archs = student_archs(cfg)
    for it in range(1, cfg.iterations + 1):
        logger.info(f"== round {it} of {cfg.iterations} ==")
        round_dir = join(run_dir, f"round_{it}")
        stats = _label_and_balance(cfg, data, teacher_dir, round_dir, len(classes), stages, report.corpus)
        arch = archs[it - 1]
        settings = train_settings(cfg.student, cfg.seed + it, arch)
        if cfg.student.as_long_as_teacher:
            settings = at_least_as_long(settings, teacher_seen, stats["total_rows"])
        student = _model_spec(cfg, classes, settings)
        _check_student_size(student, teacher_dir, cfg.allow_smaller_student)
        student_dir = join(round_dir, "student")
        init = teacher_dir if cfg.student.init_from_teacher else None
        balanced = join(round_dir, "balanced")
        name = f"round_{it}/student"
        train_name = name.replace("/", "_")
        metrics = _train(cfg, settings, student, data, student_dir, train_name, balanced, init, stages[name])
        teacher_seen = labeled_images_seen(settings, metrics)
        evaluation = _evaluate(cfg, student_dir, data, stages[f"{name} evaluation"])
        summary.append(_entry(it, "student", arch, student_dir, metrics, evaluation, stats["total_rows"]))
        teacher_dir = student_dir
    add_relative_errors(summary)
    mark_worse_than_teacher(summary)
    write_summary(run_dir, summary)
    logger.info(f"report: {write_report(run_dir)}")
    # this process's whole-object S3 requests and listings (core.storage) during the run
    retried = {op: n - retried_before.get(op, 0) for op, n in retry_counts().items() if n > retried_before.get(op, 0)}
    if retried or is_s3(run_dir):
        logger.info(f"storage: the driver retried {sum(retried.values())} S3 requests {retried or ''}".rstrip())
    logger.info(f"TensorBoard: tensorboard --logdir {run_dir}")
    return summary


def _entry(iteration: int, role: str, arch: str, directory: str, train: dict, evaluation: dict, pseudo_rows=0) -> dict:
    """One summary row: the evaluation's numbers where there are some, else the trainer's last ones."""
    entry = {"iteration": iteration, "role": role, "model": arch}
    for key in ("test_top1", "test_top5", "test_loss"):
        entry[key] = evaluation.get(key, train.get(key))
    # per class and the confusion matrix stay in eval.json (classes x classes numbers; the report reads them there)
    entry.update({k: v for k, v in evaluation.items() if k not in entry and k not in PER_CLASS_KEYS})
    entry.update(pseudo_rows=pseudo_rows, train_seconds=train.get("train_seconds"), checkpoint=directory)
    # the exported checkpoint's validation numbers (what selected it), and which epoch that was
    entry.update({k: train[k] for k in ("val_top1", "val_top5", "val_loss", "exported_epoch", "export") if k in train})
    entry.update({k: train[k] for k in ("unreadable_labeled", "unreadable_pseudo") if k in train})
    return entry


TABLE_COLUMNS = ("val_top1", "test_top1", "test_top5", "test_ece", "mce", "flip_rate")


def format_number(v) -> str:
    """A metric for the summary table: 4 decimals, ``n/a`` for None."""
    return "n/a" if v is None else f"{v:.4f}"


def format_table(summary: list[dict]) -> str:
    """The printed summary; mCE is relative to the first teacher (1.0 = as robust as it). A student
    worse than its teacher on validation is marked ``WORSE`` in the last column and warned about
    below the table."""
    head = f"{'iteration':>9}  {'role':<8} {'model':<14}" + "".join(f" {c:>9}" for c in TABLE_COLUMNS)
    head += f" {'pseudo_rows':>11}  {'vs_teacher':<10}"
    lines = [head, "-" * len(head)]
    for e in summary:
        row = f"{e['iteration']:>9}  {role_label(e):<8} {e['model']:<14}"
        row += "".join(f" {format_number(e.get(c)):>9}" for c in TABLE_COLUMNS) + f" {e['pseudo_rows']:>11}"
        verdict = {True: "WORSE", False: "ok", None: ""}[e.get("worse_than_teacher")]
        lines.append(f"{row}  {verdict:<10}".rstrip())
    return "\n".join(lines + worse_than_teacher_warnings(summary))


def write_summary(run_dir: str, summary: list[dict]) -> None:
    """Write ``run_dir/summary.json`` (a list of per-model dicts) and log the summary table."""
    write_json(join(run_dir, "summary.json"), summary)
    logger.info(format_table(summary))
