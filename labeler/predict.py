"""The teacher as a Ray Data UDF for the actor pool, and the prediction schema."""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext

import numpy as np
import pyarrow as pa

from core.images import normalize
from core.model import ModelSpec, load_checkpoint
from core.phash import stored
from labeler.inference import optimize_for_inference

logger = logging.getLogger(__name__)


def _actor_logging() -> None:
    """In a Ray actor, the ``core`` and ``labeler`` loggers write INFO lines to the actor's stderr: its worker log
    (and the driver's console with ``log_to_driver``). Ray configures its own loggers there, not ours,
    so without this our INFO lines would be dropped. Outside an actor (a driver that called
    ``core.console.configure_console``, pytest) nothing changes."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._labeler_actor = True
    for name in ("core", "labeler"):  # the labeler's own lines, and those of the storage and model code it runs
        package = logging.getLogger(name)
        if any(getattr(h, "_labeler_actor", False) for h in package.handlers):
            continue
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False  # once, even where Ray's set-up gave the root logger a handler too


BASE_FIELDS = [("id", pa.string()), ("path", pa.string()), ("label", pa.int64()), ("confidence", pa.float32())]
TAIL_FIELDS = [("reject_reason", pa.string()), ("model_id", pa.string())]
FULL_FIELDS = [("probs", pa.list_(pa.float32()))]
TOPK_FIELDS = [
    ("topk_classes", pa.list_(pa.int32())),
    ("topk_probs", pa.list_(pa.float16())),
    ("rest_mass", pa.float32()),
]


IMAGE_FIELDS = [("image", pa.binary())]
PHASH_FIELDS = [("phash", pa.int64())]  # the 64 bits as int64: core.phash.stored


def prediction_schema(topk: int = 0, image_bytes: bool = False, phash: bool = False) -> pa.Schema:
    """Full soft labels (``probs``), or top-k classes + fp16 probabilities + the mass left over;
    with ``phash``, the image's 64-bit perceptual hash (``phash``, its 64 bits as int64, null where rejected:
    :mod:`core.phash`); with ``image_bytes``, the image's encoded bytes as read (``image``, null where
    not kept)."""
    fields = BASE_FIELDS + (TOPK_FIELDS if topk else FULL_FIELDS) + TAIL_FIELDS
    return pa.schema(fields + (PHASH_FIELDS if phash else []) + (IMAGE_FIELDS if image_bytes else []))


PRECISIONS = ("auto", "fp32", "bf16")


def check_precision(precision: str) -> None:
    """Torch-free, so drivers can reject a bad value before any actor starts."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")


def autocast_dtype(precision: str, device_type: str):
    """The autocast dtype for inference, or None for plain fp32.

    ``auto``: bf16 on CUDA, fp32 on CPU (reproducible by default). ``bf16`` on a CPU with native
    bf16 (AVX512-BF16 or AMX) is about twice as fast; probabilities move by about 1e-3.
    """
    import torch

    check_precision(precision)
    if precision == "bf16" or (precision == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return None


def soften(logits, temperature: float):
    """Soft labels: softmax(logits / T), i.e. the paper's probs ** (1/T) renormalised."""
    return (logits.float() / temperature).softmax(dim=-1)


class Predictor:
    """Callable class for ``map_batches``: the un-noised teacher in eval mode.

    ``confidence`` is the top probability at T=1 (what the threshold applies to); ``probs``
    holds the soft labels at the chosen temperature, or one-hot when ``hard``. With
    ``keep_image_bytes``, ``image`` holds the encoded bytes of every labeled image whose
    confidence is at least ``image_bytes_min_confidence`` (null otherwise). With ``phash``, the decode
    stage's perceptual hash of each image passes through as ``phash`` (null for a rejected row).
    """

    def __init__(
        self,
        checkpoint: str,
        spec: dict | None = None,
        temperature: float = 1.0,
        hard: bool = False,
        topk: int = 0,
        threads: int | None = None,
        optimize: bool = True,
        precision: str = "auto",
        keep_image_bytes: bool = False,
        image_bytes_min_confidence: float = 0.0,
        phash: bool = False,
        progress=None,
    ):
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            # Ray sets OMP_NUM_THREADS to the actor's (logical) CPUs; on a CPU-only node the
            # model is the bottleneck, so by default it gets every core of its node
            torch.set_num_threads(threads or os.cpu_count() or 1)
        spec_obj = ModelSpec(**spec) if spec else None
        self.model, self.spec = load_checkpoint(checkpoint, spec_obj, self.device)
        note = "as loaded"
        if optimize:
            self.model, note = optimize_for_inference(self.model)
        self.autocast = autocast_dtype(precision, self.device.type)
        self.temperature = temperature
        self.hard = hard
        self.topk = min(topk, self.spec.num_classes) if topk else 0
        self.keep_bytes, self.bytes_min_confidence = keep_image_bytes, image_bytes_min_confidence
        self.schema = prediction_schema(self.topk, keep_image_bytes, phash)
        self.phash = phash
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        dtype = str(self.autocast or torch.float32).replace("torch.", "")
        self.progress = progress  # a core.console.ProgressChannel, or None
        _actor_logging()
        logger.info(f"labeler: predictor for {self.spec.model_id} on node {node}, device {self.device} {dtype}, {note}")

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        ok = np.array([not r for r in batch["reject_reason"]], dtype=bool)
        n = len(ok)
        label = np.full(n, -1, dtype=np.int64)
        conf = np.zeros(n, dtype=np.float32)
        probs: list = [None] * n
        if ok.any():
            x = normalize(batch["image"][ok], self.spec.mean, self.spec.std).to(self.device)
            x = x.contiguous(memory_format=torch.channels_last)
            amp = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else nullcontext()
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
        if self.phash:
            columns["phash"] = pa.array(stored(batch["phash"]), pa.int64(), mask=~ok)
        if self.keep_bytes:
            keep = ok & (conf >= self.bytes_min_confidence)
            columns["image"] = [bytes(b) if k else None for b, k in zip(batch["encoded"], keep)]
        if self.progress is not None:
            rejected = int(n - ok.sum())
            self.progress.send({"labeled": n - rejected, "rejected": rejected, "add": ("labeled", "rejected")})
        table = pa.Table.from_pydict(columns, schema=self.schema)
        if "unit" in batch:  # passed through for the partitioned, resumable write (labeler.units)
            table = table.append_column("unit", pa.array([str(u) for u in batch["unit"]], pa.string()))
        return table

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
