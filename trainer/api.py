"""Driver side: run a TorchTrainer and export the result in the labeler's format."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import ray.train
from ray.train.torch import TorchTrainer

from labeler.model import SPEC_FILE, WEIGHTS_FILE, ModelSpec, load_checkpoint
from trainer.loop import train_loop_per_worker
from trainer.settings import TrainSettings


def train_model(
    settings: TrainSettings,
    spec: ModelSpec,
    labeled: str,
    out_dir: str,
    storage_path: str,
    name: str,
    pseudo: str | None = None,
    test: str | None = None,
    hard: bool = False,
    init_from: str | None = None,
    max_failures: int = 2,
    label: str = "train",
) -> dict:
    """Train one model; write ``out_dir/{model.safetensors,model.json,metrics.jsonl}``.

    Running again with the same ``storage_path``/``name`` resumes from the last epoch's
    checkpoint (Ray Train V2 semantics). Returns the final metrics.
    """
    init_state = None
    if init_from:
        init_state = load_checkpoint(init_from)[0].state_dict()
    config = {
        "settings": settings.to_dict(),
        "spec": dataclasses.asdict(spec),
        "labeled": labeled,
        "pseudo": pseudo,
        "test": test,
        "hard": hard,
        "init_state": init_state,
        "label": label,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.num_workers, use_gpu=settings.use_gpu, resources_per_worker={"CPU": 1}
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=os.path.abspath(storage_path),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} finished without a checkpoint; see the Ray Train logs above")
    os.makedirs(out_dir, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        for f in (WEIGHTS_FILE, SPEC_FILE):
            shutil.copy(os.path.join(d, f), os.path.join(out_dir, f))
        import torch

        history = torch.load(os.path.join(d, "train_state.pt"), map_location="cpu", weights_only=True)["history"]
    with open(os.path.join(out_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(h) + "\n" for h in history)
    return history[-1]
