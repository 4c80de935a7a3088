"""Driver side: run a TorchTrainer and export the result in the labeler's format."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time

import ray.train
import torch
from ray.train.torch import TorchConfig, TorchTrainer

from core.cluster import WAIT_NOTICE_S, WAIT_REPEAT_S, waiting_for
from core.console import Progress, ProgressChannel
from core.model import SPEC_FILE, WEIGHTS_FILE, ModelSpec, create_model, load_spec, save_checkpoint
from core.ray_runtime import started_here
from core.storage import exists, filesystem_for, is_s3, join, write_bytes
from trainer.data import EVAL_BATCH, LABEL_COLUMN
from trainer.data_check import clear_recorded_error, preflight, preflight_val, raise_recorded_error
from trainer.loop import steps_per_epoch, train_loop_per_worker
from trainer.noise import target_smoothing
from trainer.settings import TrainSettings

logger = logging.getLogger(__name__)


def train_model(
    settings: TrainSettings,
    spec: ModelSpec,
    labeled: str,
    out_dir: str,
    storage_path: str,
    name: str,
    pseudo: str | None = None,
    val: str | None = None,
    hard: bool = False,
    init_from: str | None = None,
    max_failures: int = 2,
    label: str = "train",
    tensorboard: str | None = None,
    progress: bool = True,
    eval_batch: int = EVAL_BATCH,
    label_column: str = LABEL_COLUMN,
) -> dict:
    """Train one model; write ``out_dir/{model.safetensors,model.json,metrics.jsonl}``.

    ``out_dir`` and ``storage_path`` are local paths or ``s3://`` URIs. Running again with the
    same ``storage_path``/``name`` resumes from the last epoch's checkpoint (Ray Train V2
    semantics). ``val`` (a labeled validation set, as ``labeled``; never the test split) is evaluated
    every ``eval_every`` epochs and at every checkpoint by rank 0, streamed in batches of
    ``eval_batch`` images (``val_top1``, ``val_top5``, ``val_loss``, ``val_unreadable``).

    The exported model (``settings.export``): ``best``, the checkpoint with the best
    ``settings.select_metric`` (``select_mode`` max or min) as Ray Train's ``CheckpointConfig`` scores
    it (:func:`best_checkpoint`: ties go to the later epoch); ``last``, the last epoch's. Without ``val``
    the last epoch is exported (and the log says so). Checkpoints hold the exported weights (EMA ones when
    ``ema_decay`` > 0, BatchNorm re-estimated when ``recalibrate_bn``).

    ``tensorboard``: a folder or ``s3://`` prefix for this run's TensorBoard event files
    (``trainer.board``). ``progress``: show epoch k of N, loss, val top-1, images/s and the ETA on the
    console (``core.console``). Returns the exported epoch's metrics (a dict of floats and ints:
    ``epoch``, ``train_loss``, ``lr``, ``images_per_s``, ``val_top1`` ...) plus ``exported_epoch``,
    ``last_epoch`` (the epochs trained), ``export`` (``"best val_top1 (max)"`` or ``"last"``); each
    epoch's ``unreadable_labeled`` and ``unreadable_pseudo`` count the rows of that set the epoch
    could not read or decode (the returned value is the largest of any epoch).

    ``pseudo``: the balanced set (``pipeline.balance``), each row trained ``copies`` times, at
    ``settings.ratio`` pseudo-labeled images per labeled image in a step. ``hard``: its labels are
    one-hot and get label smoothing like the labeled set (``trainer.noise.target_smoothing``;
    google-research/noisystudent ``main.py``). ``init_from``: a checkpoint directory in the labeler's
    format whose weights start the model (Xie et al. 2020 train the student from scratch; this is
    the option); the workers read it from there.

    Raises:
        TrainingDataError: a set is mostly unreadable, found in a sample before training starts
            or by the workers (which then stop without Ray Train retrying a data error).
        FileNotFoundError: ``init_from`` holds no ``model.json``.
        RuntimeError: the run ended without finishing every epoch (run it again to resume).
    """
    preflight(labeled, pseudo, spec.classes, spec.image_size, spec.in_chans)  # a bad set fails here, not in retries
    if val:
        preflight_val(val, spec.classes, spec.image_size, spec.in_chans, label_column)
    error_file = join(out_dir, "data_error.json")
    clear_recorded_error(error_file)
    if init_from:  # fail here, naming the checkpoint, rather than in every worker
        load_spec(init_from)
    elif settings.pretrained:
        init_from = _pretrained_start(settings, spec, storage_path, name)
    config = {
        "settings": settings.to_dict(),
        "spec": dataclasses.asdict(spec),
        "labeled": labeled,
        "pseudo": pseudo,
        "val": val,
        "hard": hard,
        "init_from": init_from,
        "label": label,
        "data_error_file": error_file,
        "tensorboard": tensorboard,
        "eval_batch": eval_batch,
        "label_column": label_column,
    }
    datasets = {}
    if settings.feed == "ray_data":
        datasets, config["stream_steps"] = streaming_datasets(settings, spec, labeled, pseudo, hard, label_column)
    if not val:
        logger.info(f"[{label}] no validation split: the last epoch's checkpoint is exported")
    channel = config["progress"] = ProgressChannel.create()
    watcher = _ProgressWatcher(channel, label, settings, show=progress)  # stops (and shuts the channel) below
    try:
        result = _torch_trainer(settings, config, datasets, storage_path, name, max_failures, channel).fit()
    finally:
        watcher.stop()
    raise_recorded_error(error_file)  # the workers stopped on a data error
    return _export(result, out_dir, name, settings, label, val is not None)


def _torch_trainer(
    settings: TrainSettings,
    config: dict,
    datasets: dict,
    storage_path: str,
    name: str,
    max_failures: int,
    channel: ProgressChannel,
) -> TorchTrainer:
    """The TorchTrainer of one run: workers, backend, datasets split over the workers, storage, retries;
    worker failures are reported to ``channel`` (:class:`_FailureReporter`)."""
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        datasets=datasets or None,
        dataset_config=ray.train.DataConfig(datasets_to_split=[k for k in datasets if k != "clean"]),
        torch_config=TorchConfig(backend=ddp_backend(settings.use_gpu)),
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.num_workers,
            use_gpu=settings.use_gpu,
            resources_per_worker={"CPU": settings.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            **ray_storage(storage_path),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=checkpoint_config(settings, config["val"] is not None),
            callbacks=[_FailureReporter(channel)],
        ),
    )


def _export(
    result: ray.train.Result, out_dir: str, name: str, settings: TrainSettings, label: str, has_val: bool
) -> dict:
    """Copy the exported checkpoint (``settings.export``: the best by ``select_metric`` when there is a
    validation split, else the last) into ``out_dir`` in the labeler's format with ``metrics.jsonl``;
    the summary metrics (the exported epoch's, with the largest unreadable counts of any epoch).

    Raises:
        RuntimeError: no checkpoint, or the last one is not of the final epoch (run again to resume).
    """
    epochs, select_best = settings.epochs, has_val and settings.export == "best"
    if result.checkpoint is None:
        raise RuntimeError(
            f"training run {name} finished without a checkpoint; see Ray Train's logs in Ray's session folder "
            "(or run with --verbose)"
        )
    with result.checkpoint.as_directory() as d:  # the latest: its history says whether every epoch ran
        history = torch.load(os.path.join(d, "train_state.pt"), map_location="cpu", weights_only=True)["history"]
    if not history or not history[-1].get("final"):
        done = history[-1]["epoch"] if history else 0
        raise RuntimeError(
            f"training run {name} stopped after epoch {done} of {epochs} (interrupted or out of retries); "
            "run the same command again to resume from its last checkpoint"
        )
    chosen = result.checkpoint
    if select_best:
        chosen = best_checkpoint(result, settings.select_metric, settings.select_mode) or chosen
    with chosen.as_directory() as d:
        for f in (WEIGHTS_FILE, SPEC_FILE):
            with open(os.path.join(d, f), "rb") as src:
                write_bytes(join(out_dir, f), src.read())
        epoch = torch.load(os.path.join(d, "train_state.pt"), map_location="cpu", weights_only=True)["epoch"]
    write_bytes(join(out_dir, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in history).encode())
    final = dict(next(h for h in history if h["epoch"] == epoch))
    how = f"best {settings.select_metric} ({settings.select_mode})" if select_best else "last"
    final.update(exported_epoch=epoch, last_epoch=history[-1]["epoch"], export=how)
    if select_best:
        value = final.get(settings.select_metric)
        logger.info(f"[{label}] exported epoch {epoch} of {settings.epochs}: {how}, {settings.select_metric} {value}")
    for key in UNREADABLE_KEYS:  # for the summary: the most rows of a set any epoch could not read
        values = [h[key] for h in history if key in h]
        if values:
            final[key] = max(values)
    return final


def best_checkpoint(result: ray.train.Result, metric: str, mode: str) -> ray.train.Checkpoint | None:
    """The kept checkpoint with the best ``metric`` (``mode`` max or min); among equal scores the latest
    epoch's (Ray's ``get_best_checkpoint`` returns the earliest: two epochs at 0.1727 exported the first,
    though the second trained longer). None when no kept checkpoint reported ``metric``."""
    sign = 1.0 if mode == "max" else -1.0
    scored = [(c, m) for c, m in result.best_checkpoints if m.get(metric) is not None]
    if not scored:
        return None
    return max(scored, key=lambda cm: (sign * cm[1][metric], cm[1].get("epoch", 0)))[0]


UNREADABLE_KEYS = ("unreadable_labeled", "unreadable_pseudo")
CHECKPOINTS_KEPT = 2  # by score when selecting the best (Ray Train V2 always keeps the latest too, to resume)


def checkpoint_config(settings: TrainSettings, has_val: bool) -> ray.train.CheckpointConfig:
    """Ray Train's checkpoint policy: with a validation split and ``export: best``, checkpoints are
    ranked by ``select_metric`` and the ``CHECKPOINTS_KEPT`` best are kept; Ray Train V2 never deletes
    the latest one either (``CheckpointManager._save_state_and_delete_old_checkpoints``), so the run
    can still resume from where it stopped. Otherwise the most recent ones are kept."""
    if has_val and settings.export == "best":
        return ray.train.CheckpointConfig(
            num_to_keep=CHECKPOINTS_KEPT,
            checkpoint_score_attribute=settings.select_metric,
            checkpoint_score_order=settings.select_mode,
        )
    return ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT)


class _FailureReporter(ray.train.UserCallback):
    """Runs in Ray Train's controller: every worker failure, with its reason, to the driver's channel.

    Ray Train restarts the worker group after a failure (up to ``max_failures``) without telling the
    driver; :class:`_ProgressWatcher` pairs this reason with the restarted workers' first event.
    """

    def __init__(self, channel: ProgressChannel):
        self.channel = channel

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        reasons = [f"worker {rank}: {_first_line(err)}" for rank, err in sorted(worker_exceptions.items())]
        self.channel.send({"kind": "failure", "reason": "; ".join(reasons)}, force=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


class _ProgressWatcher:
    """A driver thread: the rank-0 worker's events. Progress is shown as one ``Progress`` display (when
    ``show``); a restart of the worker group (any start after the first) is logged once, with the reason
    :class:`_FailureReporter` sent and the epoch training resumes from."""

    def __init__(
        self, channel: ProgressChannel, label: str, settings: TrainSettings, poll_s: float = 1.0, show: bool = True
    ):
        self.channel, self.poll_s, self.label, self.settings = channel, poll_s, label, settings
        self.epochs = settings.epochs
        self.display = Progress(label, total=self.epochs, unit="epoch") if show else None
        self.started, self.starts, self.reason = False, 0, None
        self.waiting_since, self.told = time.monotonic(), 0.0  # until the workers start: see _say_what_is_missing
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"progress-{label}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(self.poll_s):
            self._show(self.channel.drain())
            self._say_what_is_missing()
        self._show(self.channel.drain())

    def _show(self, events: list[dict]) -> None:
        for e in events:
            kind = e.get("kind")
            if kind == "failure":
                self.reason, self.waiting_since = e["reason"], time.monotonic()
            elif kind == "start":
                self._started(e["epoch"])
            elif self.display is not None:
                self._progress(e)

    def _say_what_is_missing(self) -> None:
        """While the workers have not started (at first, and after a failure), say every minute what the
        cluster lacks for them (a lost node not replaced yet, GPU nodes the autoscaler is still adding)."""
        now = time.monotonic()
        if self.waiting_since is None or now - self.waiting_since < WAIT_NOTICE_S or now - self.told < WAIT_REPEAT_S:
            return
        if started_here():  # a local cluster this process started cannot grow: the stage before is finishing
            return
        s = self.settings
        try:
            gpus = 1.0 if s.use_gpu else 0.0
            note = waiting_for("training workers", s.num_workers, s.cpus_per_worker, gpus, placement_group=True)
        except Exception:  # noqa: BLE001 - a display must never fail training
            note = None
        if note:
            logger.warning(f"[{self.label}] {note}")
            self.told = now

    def _started(self, epoch: int) -> None:
        self.waiting_since = None
        self.starts += 1
        if self.starts > 1:
            reason = self.reason or "no worker error was reported; Ray's session logs have the controller's"
            logger.warning(
                f"[{self.label}] Ray Train restarted the training workers ({reason}); training resumes from "
                f"epoch {epoch} of {self.epochs}" + (" (the last checkpoint)" if epoch else " (no checkpoint yet)")
            )
            self.reason, self.started = None, False

    def _progress(self, e: dict) -> None:
        if not self.started:  # the rate and ETA count from the first step, not from worker start-up
            self.started = True
            self.display.restart_clock(max(0, math.ceil(e["done"]) - 1))
        fields = {"loss": e.get("loss"), "images/s": round(e.get("images_per_s") or 0)}
        if e.get("val_top1") is not None:
            fields["val_top1"] = round(e["val_top1"], 4)
        self.display.update(round(e["done"], 2), **fields)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=10)
        if self.display is not None:
            self.display.close()
        self.channel.shutdown()


def streaming_datasets(
    settings: TrainSettings,
    spec: ModelSpec,
    labeled: str,
    pseudo: str | None,
    hard: bool,
    label_column: str = LABEL_COLUMN,
) -> tuple[dict[str, ray.data.Dataset], int]:
    """The Ray Datasets of ``feed: ray_data`` and the steps per epoch they give.

    labeled and pseudo are split over the workers; clean (un-augmented labeled images, for
    re-estimating BatchNorm statistics at the end) is read whole by rank 0.
    """
    # imported on use: the streaming feed's module imports Ray Data's torch support, which feed: memory never needs
    from trainer.feed import augmented, labeled_dataset, pseudo_dataset, pseudo_row_count

    s, sp = settings, dataclasses.asdict(spec)
    noise, geometry = (s.randaugment_ops, s.randaugment_magnitude), (s.random_resized_crop, s.hflip)
    rows = labeled_dataset(labeled, spec.classes, label_column)
    eps_labeled = target_smoothing(s.label_smoothing, pseudo=False, hard=True)
    datasets = {
        "labeled": augmented(rows, sp, *noise, eps_labeled, *geometry),
        "clean": augmented(rows, sp, 0, 0, 0.0),
    }
    pseudo_rows = None
    if pseudo and s.ratio > 0:
        smoothing = target_smoothing(s.label_smoothing, pseudo=True, hard=hard)
        rows_p = pseudo_dataset(pseudo, spec.num_classes, hard)
        datasets["pseudo"] = augmented(rows_p, sp, *noise, smoothing, *geometry)
        pseudo_rows = pseudo_row_count(pseudo)
    labeled_rows = rows.count()
    for name, n, per_step in (
        ("labeled", labeled_rows, s.batch_size),
        ("pseudo-labeled", pseudo_rows, s.batch_size * s.ratio),
    ):
        if n is not None and n < per_step:  # the streaming shards cannot fill one step: say so before training
            raise ValueError(
                f"feed: ray_data needs at least one step's worth of {name} images, {per_step} (batch_size "
                f"{s.batch_size}{f' x ratio {s.ratio}' if name != 'labeled' else ''}), but the set holds {n}; "
                "lower batch_size (or ratio), raise balance.per_class, or use feed: memory"
            )
    return datasets, steps_per_epoch(labeled_rows, pseudo_rows, s)


def ddp_backend(use_gpu: bool) -> str:
    """NCCL where the GPU workers really have CUDA, else gloo (CPU runs; fake GPUs in tests).

    Asked of a GPU node, not the driver: on a cluster the driver runs on a head without GPUs.
    """
    if not use_gpu:
        return "gloo"
    probe = ray.remote(num_gpus=1, num_cpus=0)(_cuda_works)
    return "nccl" if ray.get(probe.remote()) else "gloo"


def _cuda_works() -> bool:
    return torch.cuda.is_available()


def _pretrained_start(settings: TrainSettings, spec: ModelSpec, storage_path: str, name: str) -> str:
    """The pretrained weights as a checkpoint folder beside the run's Ray Train storage
    (``storage_path/<name>_pretrained``), read once on the driver (workers on other nodes may not see
    the file) and handed to the workers as a path like ``init_from``, never as a state dict in the
    config; kept out of the exported model folder, and written only once, so a resumed run needs
    neither the file nor the network again."""
    folder = join(storage_path, f"{name}_pretrained")
    if not exists(join(folder, SPEC_FILE)):
        save_checkpoint(create_model(spec, pretrained=settings.pretrained), spec, folder)
    return folder


def ray_storage(storage_path: str) -> dict:
    """RunConfig keywords for a local folder or an ``s3://`` URI (Ray wants ``bucket/prefix`` plus
    the filesystem there, so an endpoint override reaches Ray Train too)."""
    if is_s3(storage_path):
        fs, path = filesystem_for(storage_path)
        return {"storage_path": path, "storage_filesystem": fs}
    return {"storage_path": os.path.abspath(storage_path)}
