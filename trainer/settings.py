"""Training settings: one dataclass, filled from the YAML config's teacher/student sections."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class TrainSettings:
    arch: str = "test_resnet"
    epochs: int = 30
    batch_size: int = 32  # labeled images per step, across all workers
    ratio: int = 3  # pseudo-labeled images per labeled image in a step
    optimizer: str = "sgd"  # sgd | rmsprop | adamw
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    schedule: str = "cosine"  # cosine | exponential | constant
    label_smoothing: float = 0.1
    randaugment_ops: int = 2  # 0 switches RandAugment off
    randaugment_magnitude: int = 9  # above 10 honoured (timm's mmax), as the TF reference maps magnitude/10 unclipped
    random_resized_crop: bool = True  # paper's distorted crop (area 0.08-1, aspect 3/4-4/3) before RandAugment
    hflip: bool = True  # random horizontal flip before RandAugment (off where a flip changes the class: digits)
    drop_rate: float = 0.2  # dropout before the classifier
    drop_path_rate: float = 0.1  # stochastic depth
    ema_decay: float = 0.0  # EMA of weights (paper: 0.9999); 0 = off. When on, the EMA model is exported
    grad_clip_norm: float = 0.0  # clip the global gradient norm; 0 = off
    eval_every: int = 1  # epochs between test-split evaluations (the last epoch always evaluates)
    recalibrate_bn: bool = True  # re-estimate BatchNorm statistics on clean images at the end
    min_steps_per_epoch: int = 1
    steps_per_epoch: int = 0  # 0: one pass over the primary set (pseudo labels if any, else labels); N: fixed
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch always checkpoints)
    feed: str = "memory"  # memory: decode once per worker | ray_data: stream through Ray Data CPU tasks
    num_workers: int = 2
    cpus_per_worker: float = 1.0  # Ray CPUs per training worker; on CPU also its torch threads
    use_gpu: bool = False
    seed: int = 0
    # bring your own model (labeler.checkpoint_import); read for the first teacher only
    checkpoint: str | None = None  # project checkpoint folder, or a .safetensors/.pth state dict of `arch`
    reset_classifier: bool = False  # class count differs: new head, then fine-tuned for `epochs` (else an error)
    # pretrained init: None/false = from scratch; true = what timm resolves (needs network); or a weights file
    pretrained: str | None = None
    preprocessing: str = "model"  # with pretrained: model = its pretrained_cfg mean/std/crop_pct/interpolation

    @classmethod
    def from_dict(cls, data: dict) -> TrainSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training keys {unknown}; valid keys are {sorted(known)}")
        settings = cls(**data)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.pretrained is True or self.pretrained is False:  # YAML true/false
            self.pretrained = "timm" if self.pretrained else None
        if self.pretrained in ("", "false", "none", "null"):
            self.pretrained = None
        if self.pretrained in ("true", "True"):
            self.pretrained = "timm"
        if self.preprocessing not in ("model", "config"):
            raise ValueError(f"preprocessing must be model or config, not {self.preprocessing!r}")
        if self.optimizer not in ("sgd", "rmsprop", "adamw"):
            raise ValueError(f"optimizer must be sgd, rmsprop or adamw, not {self.optimizer!r}")
        if self.schedule not in ("cosine", "exponential", "constant"):
            raise ValueError(f"schedule must be cosine, exponential or constant, not {self.schedule!r}")
        if self.feed not in ("memory", "ray_data"):
            raise ValueError(f"feed must be memory or ray_data, not {self.feed!r}")
        if self.batch_size < self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} is smaller than num_workers {self.num_workers}")
        if self.epochs < 1 or self.ratio < 0:
            raise ValueError("epochs must be >= 1 and ratio >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 switches EMA off), not {self.ema_decay}")
        if self.checkpoint_every < 1 or self.eval_every < 1:
            raise ValueError("checkpoint_every and eval_every must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
