"""Training settings: one dataclass, the ``teacher:``/``student:`` (and shared ``train:``) sections of a
``noisy-student`` config and the trainer's Python API.

Every field's default lives here and only here; a config file holds what differs. Help texts are
in the field metadata (``core.settings.setting``), which docs/configuration.md's table is generated from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from core.settings import check_choices, setting


@dataclass
class TrainSettings:
    """How one model trains (the trainer's API; a config's ``train:``, ``teacher:`` and ``student:`` sections)."""

    arch: str = setting("test_resnet", help="timm architecture")
    epochs: int = setting(30, help="epochs of the labeled set (the reference code's unit)")
    batch_size: int = setting(32, help="labeled images per step, across all workers (divisible by num_workers)")
    ratio: int = setting(3, help="pseudo-labeled images per labeled image in a step")
    optimizer: Literal["sgd", "rmsprop", "adamw"] = setting(
        "sgd", help="sgd | rmsprop (decay 0.9, momentum, eps 1e-3: TF semantics) | adamw"
    )
    lr: float = setting(0.05, help="peak learning rate (after warm-up); ignored when lr_per_256 is set")
    # the paper states its learning rate per 256 images (0.016, section 3 and google-research/noisystudent)
    lr_per_256: float | None = setting(None, help="when set, lr = lr_per_256 * batch_size / 256 (paper: 0.016)")
    momentum: float = setting(0.9, help="SGD / RMSProp momentum")
    weight_decay: float = setting(5e-4, help="L2 weight decay (paper: 1e-5)")
    warmup_epochs: int = setting(1, help="linear warm-up epochs (paper: 5)")
    schedule: Literal["cosine", "exponential", "constant"] = setting(
        "cosine", help="cosine | exponential (0.97 every 2.4 epochs, the paper's) | constant"
    )
    label_smoothing: float = setting(0.1, help="on labeled (and hard pseudo) targets")
    randaugment_ops: int = setting(2, help="RandAugment operations per image; 0 switches RandAugment off")
    randaugment_magnitude: int = setting(
        9, help="RandAugment magnitude (paper: 27 for B7/L2); above 10 honoured (timm's mmax), as the TF reference"
    )
    random_resized_crop: bool = setting(
        True, help="the reference's distorted crop (area 0.08-1, aspect 3/4-4/3) before RandAugment"
    )
    hflip: bool = setting(True, help="random horizontal flip before RandAugment (off where a flip changes the class)")
    drop_rate: float = setting(0.2, help="dropout before the classifier (paper: 0.2 for B0 to 0.5 for B7/L2)")
    drop_path_rate: float = setting(0.1, help="stochastic depth (paper: survival 0.8 at the last block, i.e. 0.2)")
    ema_decay: float = setting(0.0, help="EMA of weights, exported when on (paper: 0.9999); 0 = off")
    grad_clip_norm: float = setting(0.0, help="clip the global gradient norm; 0 = off")
    eval_every: int = setting(1, help="epochs between validation-split evaluations (the last epoch always evaluates)")
    # model selection: which checkpoint becomes the model. Without a validation split there
    # is nothing to select on, and the last epoch is exported.
    export: Literal["best", "last"] = setting(
        "best",
        help="best: the checkpoint with the best select_metric on validation (Ray Train's CheckpointConfig "
        "score) | last: the last epoch's; no validation split: last",
    )
    select_metric: str = setting(
        "val_top1",
        help="validation metric that selects the exported checkpoint: val_top1, val_top5, val_loss, raw_val_*",
    )
    select_mode: Literal["max", "min"] = setting("max", help="max | min (min for val_loss)")
    recalibrate_bn: bool = setting(True, help="re-estimate BatchNorm statistics on clean images at the end")
    min_steps_per_epoch: int = setting(1, help="at least this many steps per epoch")
    steps_per_epoch: int = setting(
        0, help="0: one pass over the primary set (pseudo labels if any, else labels); N: exactly N steps"
    )
    checkpoint_every: int = setting(1, help="epochs between checkpoints (the last epoch always checkpoints)")
    feed: Literal["memory", "ray_data"] = setting(
        "memory", help="memory: decode once per worker (small sets) | ray_data: stream through Ray Data CPU tasks"
    )
    num_workers: int = setting(2, help="Ray Train workers (one per GPU)")
    cpus_per_worker: float = setting(1.0, help="Ray CPUs per training worker; on CPU also its torch threads")
    use_gpu: bool = setting(False, help="train on GPUs (one per worker)")
    seed: int = setting(0, help="set by the loop from the top-level seed (teacher: seed, round i: seed + i)")
    # bring your own model (core.checkpoint_import); read for the first teacher only
    checkpoint: str | None = setting(
        None,
        help="teacher only: start from this model, skipping its training: a checkpoint folder, or a "
        ".safetensors/.pth state dict of arch (DDP module. prefix, state_dict/model/state_dict_ema nesting accepted)",
    )
    reset_classifier: bool = setting(
        False,
        help="teacher only, with checkpoint: another class count re-initialises the head, then fine-tunes it "
        "for epochs (else an error naming both counts)",
    )
    pretrained: str | None = setting(
        None,
        help="initialise from pretrained weights: a weights file (local or s3://), or true for timm's own "
        "(needs network); null: from scratch",
    )
    preprocessing: Literal["model", "config"] = setting(
        "model", help="with pretrained: model = its own mean/std/crop_pct/interpolation; config = data.*"
    )

    def __post_init__(self) -> None:
        if self.pretrained in (True, "true", "True"):  # YAML true (a str field reads it as "True")
            self.pretrained = "timm"
        elif self.pretrained in (False, "", "false", "False", "none", "null"):
            self.pretrained = None
        if self.lr_per_256 is not None:  # derived, never written by hand
            self.lr = self.lr_per_256 * self.batch_size / 256

    @classmethod
    def from_dict(cls, data: dict) -> TrainSettings:
        """Settings from a plain dict (the trainer's worker config); validated.

        Raises:
            ValueError: for unknown keys or invalid values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training keys {unknown}; valid keys are {sorted(known)}")
        settings = cls(**data)
        settings.validate()
        return settings

    def validate(self, where: str = "") -> None:
        """Check values and the rules between them; ``where`` prefixes key names in messages (``teacher.``).

        Raises:
            ValueError: naming the key and what to change.
        """
        check_choices(self, where)
        if self.num_workers < 1:
            raise ValueError(f"{where}num_workers must be >= 1, not {self.num_workers}")
        if self.batch_size < self.num_workers or self.batch_size % self.num_workers:
            raise ValueError(
                f"{where}batch_size {self.batch_size} must be a multiple of {where}num_workers {self.num_workers} "
                "(it is the global batch, split evenly over the workers); change one of them"
            )
        if self.epochs < 1:
            raise ValueError(f"{where}epochs must be >= 1, not {self.epochs}")
        if self.ratio < 0:
            raise ValueError(f"{where}ratio must be >= 0, not {self.ratio}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"{where}ema_decay must be in [0, 1) (0 switches EMA off), not {self.ema_decay}")
        self._check_selection(where)
        if self.checkpoint_every < 1 or self.eval_every < 1:
            raise ValueError(f"{where}checkpoint_every and {where}eval_every must be >= 1")

    def _check_selection(self, where: str) -> None:
        """``select_metric`` is a per-epoch validation metric the run records, ranked the right way."""
        names = [f"{p}val_{m}" for p in ("", "raw_") for m in ("top1", "top5", "loss")]
        if self.select_metric not in names:
            raise ValueError(
                f"{where}select_metric must be one of {', '.join(names)}, not {self.select_metric!r}: checkpoints "
                "are never selected on the test split or the training loss, only on the validation split"
            )
        if self.select_metric.startswith("raw_") and self.ema_decay == 0:
            raise ValueError(
                f"{where}select_metric {self.select_metric} exists only with EMA on (raw_* are the weights "
                f"before averaging); set {where}ema_decay > 0 or select on {self.select_metric[4:]}"
            )
        if self.select_metric.endswith("_loss") != (self.select_mode == "min"):
            want = "min" if self.select_metric.endswith("_loss") else "max"
            raise ValueError(
                f"{where}select_metric {self.select_metric} with select_mode {self.select_mode} would export the "
                f"worst checkpoint; set {where}select_mode={want}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
