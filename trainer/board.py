"""TensorBoard event files of one training run, written by rank 0 with tensorboardX.

One run directory per model (``<run_dir>/tensorboard/<name>``), so ``tensorboard --logdir RUN_DIR``
lists every model of a Noisy Student run side by side. Written:

* ``step/loss``, ``step/lr``: every optimisation step (x = global step);
* ``epoch/*``: every number of the epoch's metrics (train loss, lr, images/s, test top-1/top-5/loss
  when evaluated; x = epoch);
* ``input/augmented``: a few training inputs of the first epoch after (re)starting, as the model
  sees them (RandAugment applied, normalisation undone), labeled first then pseudo-labeled;
* the hyper-parameters (TensorBoard's HParams tab), with the epoch metrics as its metrics.

``s3://`` destinations: tensorboardX writes to a local folder and each ``flush`` copies the event
files there through pyarrow's S3 filesystem (the same credentials and endpoint as everything else).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import torch

from core.storage import is_s3, join, write_bytes

METRIC_TAGS = ("epoch/val_top1", "epoch/val_top5", "epoch/val_loss", "epoch/train_loss")


class Board:
    """A tensorboardX ``SummaryWriter`` for ``uri`` (local folder or ``s3://`` prefix)."""

    def __init__(self, uri: str):
        from tensorboardX import SummaryWriter

        self.uri = uri
        self.local = tempfile.mkdtemp(prefix="tb-") if is_s3(uri) else uri
        self.writer = SummaryWriter(self.local, flush_secs=30)

    def step(self, global_step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("step/loss", loss, global_step)
        self.writer.add_scalar("step/lr", lr, global_step)

    def epoch(self, metrics: dict) -> None:
        """Every numeric entry of one epoch's metrics, at x = ``metrics['epoch']``."""
        epoch = int(metrics["epoch"])
        for key, value in metrics.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"epoch/{key}", value, epoch)

    def inputs(self, x: torch.Tensor, mean, std, epoch: int, labeled: int, count: int = 8) -> None:
        """Up to ``count`` labeled and ``count`` pseudo-labeled inputs (N, C, H, W normalised floats)."""
        x = x.detach().float().cpu()
        pick = list(range(min(count, labeled))) + list(range(labeled, min(len(x), labeled + count)))
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        images = (x[pick] * s + m).clamp(0, 1).numpy()
        self.writer.add_images("input/augmented", images.astype(np.float32), epoch, dataformats="NCHW")

    def hparams(self, settings: dict) -> None:
        """The run's settings in the HParams tab; its metrics are the ``epoch/*`` scalars above."""
        from tensorboardX.summary import hparams

        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in settings.items()}
        for summary in hparams(values, {tag: 0.0 for tag in METRIC_TAGS}):
            self.writer._get_file_writer().add_summary(summary)  # in this run, not a sub-run as add_hparams does

    def flush(self) -> None:
        self.writer.flush()
        if is_s3(self.uri):
            for root, _, files in os.walk(self.local):
                for name in files:
                    path = os.path.join(root, name)
                    with open(path, "rb") as f:
                        write_bytes(join(self.uri, os.path.relpath(path, self.local)), f.read())

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if is_s3(self.uri):
            shutil.rmtree(self.local, ignore_errors=True)
