"""Ray Data UDFs: decode + eval transform (CPU tasks) and the teacher (actor pool)."""

from __future__ import annotations

import os
from contextlib import nullcontext

import numpy as np
import pyarrow as pa

from labeler.images import RejectedImage, decode_image, normalize, resize_center_crop
from labeler.model import ModelSpec, load_checkpoint

BASE_FIELDS = [("id", pa.string()), ("path", pa.string()), ("label", pa.int64()), ("confidence", pa.float32())]
TAIL_FIELDS = [("reject_reason", pa.string()), ("model_id", pa.string())]
FULL_FIELDS = [("probs", pa.list_(pa.float32()))]
TOPK_FIELDS = [
    ("topk_classes", pa.list_(pa.int32())),
    ("topk_probs", pa.list_(pa.float16())),
    ("rest_mass", pa.float32()),
]


def prediction_schema(topk: int = 0) -> pa.Schema:
    """Full soft labels (``probs``), or top-k classes + fp16 probabilities + the mass left over."""
    return pa.schema(BASE_FIELDS + (TOPK_FIELDS if topk else FULL_FIELDS) + TAIL_FIELDS)


def decode_batch(
    batch: dict[str, np.ndarray], image_size: int, crop_pct: float, in_chans: int, max_pixels: int
) -> dict[str, np.ndarray]:
    """bytes -> fixed-size uint8 images; a bad image becomes a row with a reject reason."""
    n = len(batch["path"])
    images = np.zeros((n, image_size, image_size, in_chans), dtype=np.uint8)
    reasons = np.full(n, "", dtype=object)
    for i, data in enumerate(batch["bytes"]):
        try:
            img = decode_image(bytes(data) if data is not None else b"", in_chans, max_pixels)
            images[i] = resize_center_crop(img, image_size, crop_pct)
        except RejectedImage as err:
            reasons[i] = err.reason
    return {"id": batch["id"], "path": batch["path"], "image": images, "reject_reason": reasons}


def soften(logits, temperature: float):
    """Soft labels: softmax(logits / T), i.e. the paper's probs ** (1/T) renormalised."""
    return (logits.float() / temperature).softmax(dim=-1)


class Predictor:
    """Callable class for ``map_batches``: the un-noised teacher in eval mode.

    ``confidence`` is the top probability at T=1 (what the threshold applies to); ``probs``
    holds the soft labels at the chosen temperature, or one-hot when ``hard``.
    """

    def __init__(
        self,
        checkpoint: str,
        spec: dict | None = None,
        temperature: float = 1.0,
        hard: bool = False,
        topk: int = 0,
        threads: int | None = None,
    ):
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            # Ray sets OMP_NUM_THREADS to the actor's (logical) CPUs; on a CPU-only node the
            # model is the bottleneck, so by default it gets every core of its node
            torch.set_num_threads(threads or os.cpu_count() or 1)
        spec_obj = ModelSpec(**spec) if spec else None
        self.model, self.spec = load_checkpoint(checkpoint, spec_obj, self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.temperature = temperature
        self.hard = hard
        self.topk = min(topk, self.spec.num_classes) if topk else 0
        self.schema = prediction_schema(self.topk)
        import ray

        node = ray.get_runtime_context().get_node_id()
        print(f"labeler: predictor for {self.spec.model_id} on node {node}, device {self.device}")

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        ok = np.array([not r for r in batch["reject_reason"]], dtype=bool)
        n = len(ok)
        label = np.full(n, -1, dtype=np.int64)
        conf = np.zeros(n, dtype=np.float32)
        probs: list = [None] * n
        if ok.any():
            x = normalize(batch["image"][ok], self.spec.mean, self.spec.std).to(self.device)
            cuda = self.device.type == "cuda"
            if cuda:
                x = x.to(memory_format=torch.channels_last)
            amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
            with torch.inference_mode(), amp:
                logits = self.model(x).float()
            p1 = logits.softmax(dim=-1)
            top_p, top_i = p1.max(dim=-1)
            soft = (
                torch.nn.functional.one_hot(top_i, p1.shape[-1]).float()
                if self.hard
                else soften(logits, self.temperature)
            )
            idx = np.flatnonzero(ok)
            label[idx] = top_i.cpu().numpy()
            conf[idx] = top_p.cpu().numpy()
            soft_np = soft.cpu().numpy()
            for j, row in zip(idx, soft_np):
                probs[j] = row
        columns = {
            "id": [str(v) for v in batch["id"]],
            "path": [str(v) for v in batch["path"]],
            "label": label,
            "confidence": conf,
            "reject_reason": [str(r) or None for r in batch["reject_reason"]],
            "model_id": [self.spec.model_id] * n,
        }
        columns.update(self._soft_columns(probs) if self.topk else {"probs": probs})
        return pa.Table.from_pydict(columns, schema=self.schema)

    def _soft_columns(self, probs: list) -> dict:
        classes, values, rest = [], [], []
        for p in probs:
            if p is None:
                classes.append(None)
                values.append(None)
                rest.append(None)
                continue
            top = np.argsort(-p, kind="stable")[: self.topk]
            classes.append(top.astype(np.int32))
            values.append(p[top].astype(np.float16))
            rest.append(float(max(0.0, 1.0 - p[top].sum())))
        return {"topk_classes": classes, "topk_probs": values, "rest_mass": rest}
