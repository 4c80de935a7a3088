"""The per-worker training loop that TorchTrainer runs (DDP on gloo or NCCL)."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from timm.utils import ModelEmaV3

from core.model import ModelSpec, create_model, load_checkpoint, save_checkpoint
from trainer.board import Board
from trainer.data import EVAL_BATCH, LABEL_COLUMN, LabeledBatches, load_labeled, load_pseudo
from trainer.data_check import (
    TrainingDataError,
    check_image_set,
    check_unreadable,
    counts_by_reason,
    reason_histogram,
    record_data_error,
)
from trainer.evaluate import evaluate_many, recalibrate_batchnorm, recalibrate_batchnorm_on
from trainer.noise import augment_batch, smooth, soft_cross_entropy, target_smoothing, train_transform
from trainer.settings import TrainSettings

STATE_FILE = "train_state.pt"
# logging, not print: Ray Train V2 patches print in its workers into its logging, and rank 0's printed
# lines came out twice; a logger (the worker's root handler, set up by Ray Train) writes each line once
logger = logging.getLogger(__name__)


def lr_factor(step: int, steps_per_epoch: int, s: TrainSettings) -> float:
    """Linear warm-up, then cosine to zero, or the paper's staircase decay, or constant.

    ``exponential`` is the reference code's (google-research/noisystudent ``utils.build_learning_rate``):
    ``tf.train.exponential_decay(lr, step, 2.4 * steps_per_epoch, 0.97, staircase=True)``, i.e.
    ``0.97 ** floor(step / (2.4 * steps_per_epoch))`` counted from step 0 (warm-up included), replaced by the
    linear warm-up while ``step < warmup_epochs * steps_per_epoch``.
    """
    warm = s.warmup_epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if s.schedule == "cosine":
        total = max(1, s.epochs * steps_per_epoch - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / total)))
    if s.schedule == "exponential":
        return 0.97 ** math.floor(step / (2.4 * steps_per_epoch))
    return 1.0


def build_optimizer(model: torch.nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    """timm's optimizer for ``s.optimizer`` at ``s.lr`` and ``s.weight_decay``: ``sgd`` (momentum),
    ``rmsprop`` as the reference code's TensorFlow RMSProp (timm ``rmsproptf``: decay 0.9, eps 1e-3,
    momentum ``s.momentum``; google-research/noisystudent ``utils.py``), or ``adamw``.

    Raises:
        KeyError: an unknown ``s.optimizer`` (``TrainSettings.validate`` refuses it first).
    """
    from timm.optim import create_optimizer_v2

    name = {"sgd": "sgd", "rmsprop": "rmsproptf", "adamw": "adamw"}[s.optimizer]
    kwargs = {"momentum": s.momentum} if s.optimizer != "adamw" else {}
    if s.optimizer == "rmsprop":
        kwargs.update(alpha=0.9, eps=1e-3)
    return create_optimizer_v2(model, opt=name, lr=s.lr, weight_decay=s.weight_decay, **kwargs)


class Cycler:
    """Endless shuffled batches of one worker's shard; the same order on every rerun.

    Round ``r`` is the ``rank``-th of ``world`` strides through a permutation of ``range(n)`` drawn
    from ``(seed, r)``; batches run across round ends. :meth:`seek` jumps to where a Cycler would be
    after handing out ``items`` indices, so a resumed run goes on with the order an unbroken one has.
    """

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int):
        """Raises:
        ValueError: fewer than ``world`` items (worker ``rank`` would have none to hand out)."""
        if n <= rank:
            raise ValueError(f"{n} images cannot be shared by {world} training workers; use fewer workers")
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self.round, self.order, self.pos = 0, np.empty(0, dtype=np.int64), 0

    def _order(self, r: int) -> np.ndarray:
        """This worker's indices in round ``r``."""
        return np.random.default_rng((self.seed, r)).permutation(self.n)[self.rank :: self.world]

    def seek(self, items: int) -> None:
        """Go to the state after ``items`` indices were handed out (``next`` called ``items / batch`` times)."""
        shard = len(range(self.rank, self.n, self.world))  # every round gives this worker that many
        r, self.pos = divmod(items, shard)
        self.order, self.round = self._order(r), r + 1

    def next(self) -> np.ndarray:
        out = []
        while len(out) < self.batch:
            if self.pos >= len(self.order):
                self.order, self.pos, self.round = self._order(self.round), 0, self.round + 1
            take = self.order[self.pos : self.pos + self.batch - len(out)]
            out.extend(take.tolist())
            self.pos += len(take)
        return np.asarray(out)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random`` (timm's RandAugment draws from it), numpy's global RNG and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of worker ``rank``'s random streams in 0-based ``epoch`` (augmentation, dropout,
    stochastic depth): a function of the three alone, so an epoch trained again after a resume draws
    what it drew the first time, and no random state has to travel in checkpoints."""
    return int(np.random.SeedSequence([seed % 2**63, rank, epoch]).generate_state(1, np.uint64)[0] % 2**63)


def steps_per_epoch(labeled: int, pseudo: int | None, s: TrainSettings) -> int:
    """Optimizer steps in one epoch: ``s.steps_per_epoch`` when set (> 0), else one pass over the
    primary set, the pseudo-labeled rows (``pseudo``, copies counted) at ``batch_size * ratio`` per
    step when training on them, else the ``labeled`` rows at ``batch_size`` per step; at least
    ``s.min_steps_per_epoch``. Both feeds use it. (google-research/noisystudent counts epochs of
    the labeled set instead; here an epoch sees every pseudo label once.)"""
    if s.steps_per_epoch > 0:
        return s.steps_per_epoch
    per_step = s.batch_size * (s.ratio if pseudo is not None and s.ratio > 0 else 1)
    n = pseudo if pseudo is not None and s.ratio > 0 else labeled
    return max(s.min_steps_per_epoch, n // per_step)


def _save(model, spec: ModelSpec, state: dict, directory: str) -> None:
    save_checkpoint(model, spec, directory)
    torch.save(state, os.path.join(directory, STATE_FILE))


class MemoryFeed:
    """``feed: memory``: both sets decoded once into this worker; RandAugment per step, here."""

    def __init__(self, config: dict, s: TrainSettings, spec: ModelSpec, rank: int, world: int, start_epoch: int):
        column = config.get("label_column", LABEL_COLUMN)
        self.labeled = load_labeled(config["labeled"], spec.classes, spec.image_size, spec.in_chans, column)
        self.pseudo = None
        if config.get("pseudo"):
            self.pseudo = load_pseudo(
                config["pseudo"], spec.num_classes, spec.image_size, spec.in_chans, config["hard"]
            )
        self.s, self.spec = s, spec
        self.eps_labeled = target_smoothing(s.label_smoothing, pseudo=False, hard=True)
        self.eps_pseudo = target_smoothing(s.label_smoothing, pseudo=True, hard=config["hard"])
        for name, data in (("labeled", self.labeled), ("pseudo", self.pseudo)):
            if data is not None:
                check_image_set(name, data)
        self.steps = steps_per_epoch(len(self.labeled), len(self.pseudo) if self.pseudo else None, s)
        self.transform = train_transform(
            s.randaugment_ops, s.randaugment_magnitude, spec.image_size, s.random_resized_crop, s.hflip
        )
        per_worker = s.batch_size // world
        # a resumed run goes on where the unbroken one would be: epochs before start_epoch are skipped
        self.lab_iter = Cycler(len(self.labeled), per_worker, rank, world, s.seed)
        self.lab_iter.seek(start_epoch * self.steps * per_worker)
        self.pse_iter = None
        if self.pseudo is not None and s.ratio > 0:
            self.pse_iter = Cycler(len(self.pseudo), per_worker * s.ratio, rank, world, s.seed + 1)
            self.pse_iter.seek(start_epoch * self.steps * per_worker * s.ratio)

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        spec = self.spec
        for _ in range(self.steps):
            idx = self.lab_iter.next()
            x = augment_batch(self.labeled.images[idx], self.transform, spec.mean, spec.std)
            y = smooth(torch.from_numpy(self.labeled.targets[idx]), self.eps_labeled)
            if self.pse_iter is not None:
                pidx = self.pse_iter.next()
                px = augment_batch(self.pseudo.images[pidx], self.transform, spec.mean, spec.std)
                py = smooth(torch.from_numpy(self.pseudo.targets[pidx]), self.eps_pseudo)
                x, y = torch.cat([x, px]), torch.cat([y, py])
            yield x, y

    def epoch_counts(self) -> dict:
        """Rows of each set the epoch trained from and could not read (decoded once: the same every epoch)."""
        out = {"unreadable_labeled": sum(self.labeled.unreadable.values())}
        if self.pseudo is not None:
            out.update(pseudo_rows=len(self.pseudo), unreadable_pseudo=sum(self.pseudo.unreadable.values()))
        return out

    def recalibrate(self, model: torch.nn.Module, device) -> None:
        clean = np.concatenate([self.labeled.images] + ([self.pseudo.images] if self.pseudo is not None else []))
        recalibrate_batchnorm(model, clean, self.spec, device)


class StreamFeed:
    """``feed: ray_data``: batches from this worker's shards of the Ray Datasets (trainer.feed)."""

    def __init__(self, config: dict, s: TrainSettings, world: int):
        per_worker = s.batch_size // world
        self.steps = config["stream_steps"]
        self.lab = _endless("labeled", per_worker)
        self.pse = _endless("pseudo", per_worker * s.ratio) if config.get("pseudo") and s.ratio > 0 else None
        self.codes = {"labeled": [], "pseudo": []}  # reject reason codes of this epoch's rows, per set

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.codes = {"labeled": [], "pseudo": []}
        for _ in range(self.steps):  # a fixed count: every DDP worker must take the same number of steps
            x, y = self._readable("labeled", next(self.lab))
            if self.pse is not None:
                px, py = self._readable("pseudo", next(self.pse))
                x, y = torch.cat([x, px]), torch.cat([y, py])
            yield x, y

    def _readable(self, name: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows that decoded; the others are counted, never silently dropped."""
        self.codes[name].append(batch["reason"])
        ok = batch["ok"].bool()
        return batch["image"][ok], batch["target"][ok]

    def epoch_counts(self) -> dict:
        """Rows met this epoch that could not be read, per set and reason, summed over every worker.

        Raises:
            TrainingDataError: when a set's rows this epoch were mostly unreadable (every worker
                raises alike, since the counts are all-reduced).
        """
        out = {}
        for name, parts in self.codes.items():
            codes = torch.cat(parts).cpu().numpy() if parts else np.zeros(0, np.int64)
            hist = _all_reduce(torch.from_numpy(reason_histogram(codes)))
            unreadable = counts_by_reason(hist.numpy())
            if name == "labeled" or self.pse is not None:
                out[f"unreadable_{name}"] = sum(unreadable.values())
                where = f"rows of this epoch's stream rejected as {unreadable}"
                check_unreadable(name, unreadable, int(hist.sum().item()), where)
        return out

    def recalibrate(self, model: torch.nn.Module, device) -> None:
        clean = ray.train.get_dataset_shard("clean").iter_torch_batches(batch_size=256)
        recalibrate_batchnorm_on(model, (b["image"] for b in clean), device)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum a CPU tensor over every worker (on the GPU under NCCL, which reduces CUDA tensors only)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    on = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else t.device
    t = t.to(on)
    torch.distributed.all_reduce(t)
    return t.cpu()


def _endless(name: str, batch: int) -> Iterator[dict[str, torch.Tensor]]:
    """Pass after pass over this worker's shard (batches of image, target, ok, reason); each pass
    re-runs decode + augmentation."""
    shard = ray.train.get_dataset_shard(name)
    while True:
        empty = True
        for b in shard.iter_torch_batches(batch_size=batch, drop_last=True):
            empty = False
            yield b
        if empty:
            raise ValueError(f"the {name} shard holds fewer than {batch} images; lower batch_size or num_workers")


def _device() -> torch.device:
    """The worker's GPU when CUDA works there, else the CPU (also for fake GPUs in tests)."""
    return ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")


class _Step:
    """One optimisation step: forward under bf16 autocast on CUDA, backward, clipping, EMA."""

    def __init__(self, model, opt, sched, ema, s: TrainSettings, device: torch.device):
        self.model, self.opt, self.sched, self.ema, self.s, self.device = model, opt, sched, ema, s, device

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        cuda = self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            loss = soft_cross_entropy(self.model(x).float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.s.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.s.grad_clip_norm)
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.sched.last_epoch)
        return loss.item()


def _last_state() -> dict | None:
    """The training state in this run's latest checkpoint (Ray Train V2 resumes by run name)."""
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


def train_loop_per_worker(config: dict) -> None:
    """What each TorchTrainer worker runs. A data error (a set mostly unreadable) is not a lost
    node: the workers stop cleanly, rank 0 records it, and the driver raises it (no retries)."""
    try:
        _train_worker(config)
    except TrainingDataError as err:
        if ray.train.get_context().get_world_rank() == 0 and config.get("data_error_file"):
            record_data_error(config["data_error_file"], err)


@dataclass
class _Worker:
    """Everything one TorchTrainer worker holds during a run (built by :func:`_setup`)."""

    s: TrainSettings
    spec: ModelSpec
    rank: int
    world: int
    device: torch.device
    tag: str  # "[round_1_student]": the log prefix
    feed: MemoryFeed | StreamFeed
    model: torch.nn.Module  # as Ray Train prepared it (DDP-wrapped with several workers)
    bare: torch.nn.Module  # the module itself
    ema: ModelEmaV3 | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    step: _Step
    start_epoch: int  # the first epoch this invocation trains (> 0 after a resume)
    history: list[dict]  # per-epoch metrics of every epoch so far (rank 0)
    resumed_from: list[int]
    has_val: bool  # a validation split is configured (every rank knows; only rank 0 reads it)
    val: LabeledBatches | None  # rank 0 streams the validation split at each evaluation; never held decoded
    eval_batch: int
    board: Board | None  # rank 0's TensorBoard writer
    channel: Any  # rank 0's core.console.ProgressChannel, or None


def _setup(config: dict) -> _Worker:
    """Settings, device, feed, model (resumed from the run's latest checkpoint if any), optimiser, EMA."""
    warnings.filterwarnings("ignore", message="Grad strides do not match")
    s = TrainSettings.from_dict(config["settings"])
    spec = ModelSpec(**config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(s.seed * 1000 + rank)  # the initial weights; each epoch reseeds (epoch_seed)
    device = _device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(s.cpus_per_worker)))  # Ray pins OMP_NUM_THREADS to 1 otherwise
    tag = f"[{config.get('label', 'train')}]"
    logger.info(f"{tag} worker {rank}/{world} on node {ray.get_runtime_context().get_node_id()}, device {device}")
    eval_batch = config.get("eval_batch", EVAL_BATCH)
    val = None
    if config.get("val") and rank == 0:
        val = LabeledBatches(
            config["val"],
            spec.classes,
            spec.image_size,
            spec.in_chans,
            eval_batch,
            spec.crop_pct,
            spec.interpolation,
            config.get("label_column", LABEL_COLUMN),
        )

    state = _last_state()
    start_epoch = state["epoch"] if state else 0
    stream = s.feed == "ray_data"
    feed = StreamFeed(config, s, world) if stream else MemoryFeed(config, s, spec, rank, world, start_epoch)
    model = create_model(spec, s.drop_rate, s.drop_path_rate)
    if config.get("init_from"):  # a path, read here: a state dict inside the config would travel to every worker
        model.load_state_dict(load_checkpoint(config["init_from"])[0].state_dict())
    model = ray.train.torch.prepare_model(model, move_to_device=device)
    bare = model.module if hasattr(model, "module") else model
    ema = ModelEmaV3(bare, decay=s.ema_decay, use_warmup=True) if s.ema_decay > 0 else None
    opt = build_optimizer(model, s)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, feed.steps, s))
    history, resumed_from = [], []
    if state:
        bare.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        history, resumed_from = state["history"], state.get("resumed_from", []) + [start_epoch]
        logger.info(f"{tag} resumed from the checkpoint of epoch {start_epoch}")
    channel = config.get("progress") if rank == 0 else None
    if channel is not None:  # the driver counts starts: a second one is a restart of the worker group
        channel.send({"kind": "start", "epoch": start_epoch}, force=True)
    board = Board(config["tensorboard"]) if rank == 0 and config.get("tensorboard") else None
    if board is not None and start_epoch == 0:
        board.hparams({**s.to_dict(), "model": spec.arch, "image_size": spec.image_size})
    return _Worker(
        s, spec, rank, world, device, tag, feed, model, bare, ema, opt, sched, _Step(model, opt, sched, ema, s, device),
        start_epoch, history, resumed_from, bool(config.get("val")), val, eval_batch, board, channel,
    )  # fmt: skip


def epoch_plan(epoch: int, s: TrainSettings, has_val: bool) -> tuple[bool, bool, bool]:
    """``(final, evaluate, checkpoint)`` for 0-based ``epoch``: the same answer on every worker.

    Validation runs every ``eval_every`` epochs and at the last epoch. With ``export: best`` it also
    runs at every checkpoint (so each carries the score Ray Train ranks it by) and every validated
    epoch is checkpointed (a candidate for export). Without a validation split nothing is evaluated.
    """
    n = epoch + 1
    final = n == s.epochs
    checkpoint = final or n % s.checkpoint_every == 0
    best = s.export == "best"
    evaluate = has_val and (final or n % s.eval_every == 0 or (checkpoint and best))
    return final, evaluate, checkpoint or (evaluate and best)


def _train_epoch(w: _Worker, epoch: int) -> dict:
    """One epoch of optimisation steps; its metrics (loss, lr, images/s, unreadable counts)."""
    s, steps = w.s, w.feed.steps
    seed_everything(epoch_seed(s.seed, w.rank, epoch))  # an epoch redone after a resume draws the same
    w.model.train()
    total, seen, started = 0.0, 0, time.perf_counter()
    for i, (x, y) in enumerate(w.feed.epoch()):
        loss = w.step(x, y)
        total += loss
        seen += len(x) * w.world  # over all workers
        if w.board is not None:
            w.board.step(epoch * steps + i + 1, loss, w.sched.get_last_lr()[0])
            if i == 0 and epoch == w.start_epoch:
                w.board.inputs(x, w.spec.mean, w.spec.std, epoch + 1, labeled=s.batch_size // w.world)
        if w.channel is not None:
            w.channel.send({"done": epoch + (i + 1) / steps, "epochs": s.epochs, "loss": loss,
                            "images_per_s": seen / (time.perf_counter() - started)})  # fmt: skip
    return {"epoch": epoch + 1, "train_loss": total / steps, "lr": w.sched.get_last_lr()[0],
            "final": epoch + 1 == s.epochs, "steps": steps, "images": seen,
            "images_per_s": seen / (time.perf_counter() - started),
            "resumed_from": w.resumed_from, **w.feed.epoch_counts()}  # fmt: skip


def _model_to_export(w: _Worker, recalibrate: bool) -> torch.nn.Module:
    """The weights a checkpoint exports: the EMA weights when EMA is on, else the raw ones; with
    ``recalibrate`` (an evaluated or the last epoch) and ``recalibrate_bn``, a copy whose BatchNorm
    statistics are re-estimated on clean images, so what is validated is what would be exported
    (and training goes on with its own statistics)."""
    exported = w.ema.module if w.ema is not None else w.bare
    if not (recalibrate and w.s.recalibrate_bn):
        return exported
    exported = copy.deepcopy(exported)
    w.feed.recalibrate(exported, w.device)
    return exported


def evaluate_split(
    exported: torch.nn.Module,
    raw: torch.nn.Module | None,
    data: LabeledBatches,
    spec: ModelSpec,
    device,
    batch: int = EVAL_BATCH,
    prefix: str = "val",
) -> dict:
    """Per-epoch metrics on one split: ``{prefix}_top1/_top5/_loss/_unreadable`` of the exported model
    and, with EMA on, ``raw_{prefix}_*`` of the raw weights, in one streamed pass over ``data``."""
    models = {"": exported} if raw is None else {"": exported, "raw_": raw}
    out = {}
    for name, metrics in evaluate_many(models, data, spec, device, batch, prefix).items():
        out.update({name + k: v for k, v in metrics.items()})
    return out


def evaluate_test(exported, raw, test: LabeledBatches, spec: ModelSpec, device, batch: int = EVAL_BATCH) -> dict:
    """:func:`evaluate_split` with ``test_*`` keys (the trainer itself validates on ``val_*`` only)."""
    return evaluate_split(exported, raw, test, spec, device, batch, prefix="test")


def _publish(w: _Worker, metrics: dict) -> None:
    """Rank 0: an epoch's metrics to the history, the log, TensorBoard and the driver's progress display."""
    w.history.append(metrics)
    logger.info(f"{w.tag} " + " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
    if w.board is not None:
        w.board.epoch(metrics)
        w.board.flush()
    if w.channel is not None:
        event = {**metrics, "done": metrics["epoch"], "epochs": w.s.epochs, "loss": metrics["train_loss"]}
        w.channel.send(event, force=True)


def _checkpoint(w: _Worker, metrics: dict, exported: torch.nn.Module | None) -> None:
    """Report the epoch with a checkpoint (rank 0 writes it; the others report metrics only).

    The checkpoint holds the exported weights in the labeler's format (``exported``, possibly
    recalibrated / EMA) and the training state to resume from (raw weights, optimiser, scheduler,
    EMA, history): Ray Train selects among them by the reported validation score.
    """
    if w.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        state = {
            "model": w.bare.state_dict(),
            "optimizer": w.opt.state_dict(),
            "scheduler": w.sched.state_dict(),
            "epoch": metrics["epoch"],
            "history": w.history,
            "resumed_from": w.resumed_from,
        }
        if w.ema is not None:
            state["ema"] = w.ema.state_dict()
        _save(exported, w.spec, state, d)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _train_worker(config: dict) -> None:
    w = _setup(config)
    for epoch in range(w.start_epoch, w.s.epochs):
        metrics = _train_epoch(w, epoch)
        final, evaluate, checkpoint = epoch_plan(epoch, w.s, w.has_val)
        exported = _model_to_export(w, final or evaluate) if w.rank == 0 and (evaluate or checkpoint) else None
        if w.rank == 0 and evaluate:
            raw = w.bare if w.ema is not None else None
            metrics.update(evaluate_split(exported, raw, w.val, w.spec, w.device, w.eval_batch))
        if w.rank == 0:
            _publish(w, metrics)
        if checkpoint:  # metrics without a checkpoint are not persisted by Ray Train V2; history keeps them
            _checkpoint(w, metrics, exported)
    if w.board is not None:
        w.board.close()


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
