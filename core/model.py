"""The model contract: how a checkpoint becomes a predicting model.

A checkpoint is a directory with two files:

* ``model.safetensors``: the timm model's state dict (tensors only, loads without
  executing code);
* ``model.json``: a :class:`ModelSpec` naming the timm architecture, the classes and
  the eval preprocessing.

Users can also bring a bare state dict (``.safetensors`` or ``.pth`` loaded with
``weights_only=True``) plus a timm architecture name; see :func:`load_checkpoint`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.storage import filesystem_for, join, read_bytes, write_bytes

if TYPE_CHECKING:  # torch is imported on use: drivers that only read specs start faster
    import torch

WEIGHTS_FILE = "model.safetensors"
STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")  # a bare state dict (core.checkpoint_import)
SPEC_FILE = "model.json"
FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model and feed it like it was evaluated."""

    arch: str
    classes: list[str]
    image_size: int
    in_chans: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 1.0  # eval resize: shorter side to floor(image_size / crop_pct), then a centre crop
    interpolation: str = "bilinear"  # eval resize filter, a timm name (bilinear, bicubic, ...)
    model_id: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of classes: the model's output width."""
        return len(self.classes)

    def to_json(self) -> str:
        """``model.json``'s text: every field, indented."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        """A spec from ``model.json``'s text.

        Raises:
            ValueError: unknown keys, or a ``format_version`` newer than this package reads.
        """
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"model.json has unknown keys {sorted(unknown)}; known keys: {sorted(known)}")
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(
                f"model.json format_version {data['format_version']} is newer than this labeler "
                f"understands ({FORMAT_VERSION}); upgrade the noisy-student package."
            )
        data["mean"] = tuple(data.get("mean", IMAGENET_MEAN))
        data["std"] = tuple(data.get("std", IMAGENET_STD))
        return cls(**data)


def create_model(
    spec: ModelSpec, drop_rate: float = 0.0, drop_path_rate: float = 0.0, pretrained: str | None = None
) -> torch.nn.Module:
    """The one way to build a model in this project: timm's factory.

    ``pretrained``: None (random init), ``"timm"`` (whatever timm resolves for ``spec.arch``: the Hugging
    Face hub or a URL, so it needs network or timm's cache), or a ``.safetensors``/``.pth`` weights file
    (local or ``s3://``), loaded by timm (``pretrained_cfg_overlay=dict(file=...)``, ``weights_only``);
    timm drops the classifier when its class count differs, and adapts ``in_chans``. Architectures with a
    fixed input size (ViT, Swin: ``fixed_input_size`` in their pretrained config) get
    ``img_size=spec.image_size``.

    Raises:
        ValueError: unknown architecture, or pretrained weights that cannot be had.
    """
    import timm

    kwargs = {"num_classes": spec.num_classes, "in_chans": spec.in_chans, "drop_rate": drop_rate}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    cfg = _pretrained_cfg(spec.arch)
    if cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = spec.image_size
    try:
        if not pretrained:
            return timm.create_model(spec.arch, pretrained=False, **kwargs)
        if pretrained == "timm":
            return _create_from_hub(spec.arch, kwargs)
        with local_copy(pretrained) as path:
            return timm.create_model(spec.arch, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(
                f"unknown timm architecture {spec.arch!r}; list valid names with "
                "`python -c 'import timm; print(timm.list_models())'`"
            ) from err
        raise


def _create_from_hub(arch: str, kwargs: dict) -> torch.nn.Module:
    import timm

    try:
        return timm.create_model(arch, pretrained=True, **kwargs)
    except Exception as err:
        if isinstance(err, RuntimeError) and "Unknown model" in str(err):
            raise
        raise ValueError(
            f"could not get timm's pretrained weights for {arch!r} ({type(err).__name__}: {str(err)[:200]}); "
            "this needs network access to the Hugging Face hub (or timm's cache). Without network, download "
            "the weights elsewhere and set pretrained to the .safetensors/.pth file (local or s3://)."
        ) from err


def _pretrained_cfg(arch: str):
    """timm's default pretrained config of ``arch`` (input size, interpolation, crop_pct, mean/std), or None."""
    import timm

    try:
        return timm.get_pretrained_cfg(arch)
    except Exception:  # an unknown name is reported by create_model, with a hint
        return None


def model_preprocessing(spec: ModelSpec) -> ModelSpec:
    """``spec`` with the eval preprocessing of its architecture's pretrained config (mean, std,
    crop_pct, interpolation), as timm's ``resolve_data_config`` gives them; the image size stays
    ``spec.image_size`` (the configured resolution). Unchanged when timm has no pretrained config."""
    from timm.data import resolve_data_config

    cfg = _pretrained_cfg(spec.arch)
    if cfg is None:
        return spec
    data = resolve_data_config(pretrained_cfg=cfg.to_dict())
    mean, std = tuple(data["mean"]), tuple(data["std"])
    if spec.in_chans == 1:  # a grey model: timm averages the first conv over RGB; the statistics likewise
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return dataclasses.replace(
        spec, mean=mean, std=std, crop_pct=float(data["crop_pct"]), interpolation=str(data["interpolation"])
    )


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local path for ``uri``: itself when local, else a temporary copy (``s3://``) that is removed after."""
    if not uri.startswith("s3://"):
        if not os.path.isfile(uri):
            raise ValueError(f"weights file {uri} does not exist; give a local path or an s3:// URI")
        yield uri
        return
    suffix = os.path.splitext(uri)[1]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "weights" + suffix)
        with open(path, "wb") as f:
            f.write(read_bytes(uri))
        yield path


def count_parameters(model: torch.nn.Module | ModelSpec) -> int:
    """Number of parameters (elements of every parameter tensor) of a model, or of the model a spec
    describes. A spec's model is built on ``torch.device("meta")``: shapes only, no memory and no
    weight initialisation, so sizing a large architecture costs next to nothing."""
    import torch

    if isinstance(model, ModelSpec):
        with torch.device("meta"):
            model = create_model(model)
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(model: torch.nn.Module, spec: ModelSpec, directory: str) -> ModelSpec:
    """Write ``model.safetensors`` + ``model.json`` into ``directory`` (local or s3://).

    The spec's ``model_id`` is set to a content hash of the weights so predictions can
    name the exact model that made them.
    """
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save(state)
    spec = dataclasses.replace(spec, model_id=f"{spec.arch}-{hashlib.sha256(blob).hexdigest()[:12]}")
    write_bytes(join(directory, WEIGHTS_FILE), blob)
    write_bytes(join(directory, SPEC_FILE), spec.to_json().encode())
    return spec


def weights_file(checkpoint: str) -> str:
    """The weights file of a checkpoint: the file itself for a bare state dict (``.safetensors``, ``.pth``,
    ``.pt``, ``.bin``), else the folder's ``model.safetensors``."""
    return checkpoint if checkpoint.endswith(STATE_DICT_SUFFIXES) else join(checkpoint, WEIGHTS_FILE)


LFS_POINTER = b"version https://git-lfs.github.com/spec/"
SNIFF_BYTES = 1 << 16


def check_weights_file(uri: str) -> None:
    """Refuse a weights file that cannot be what it claims, from its first bytes (no tensor is read):
    empty, a Git LFS pointer (the weights were never fetched), a ``.safetensors`` file whose header is not
    one, or a ``.pth``/``.pt``/``.bin`` file that is neither a zip (``torch.save``) nor a pickle.

    Raises:
        FileNotFoundError: nothing at ``uri``. ValueError: naming the file, what it holds and what to do.
    """

    fs, path = filesystem_for(uri)
    info = fs.get_file_info(path)
    if not info.is_file:
        raise FileNotFoundError(f"weights file {uri} does not exist")
    with fs.open_input_file(path) as f:
        head = f.read(min(info.size, SNIFF_BYTES))
    if not head:
        raise ValueError(f"weights file {uri} is empty; point at the real weights file")
    if head.startswith(LFS_POINTER):
        raise ValueError(
            f"{uri} is a Git LFS pointer file ({info.size} bytes of text), not the weights: the file was never "
            "downloaded. Run `git lfs pull` in its repository (or download the file itself) and use that file"
        )
    if path.endswith(".safetensors"):
        size = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
        if not 0 < size <= info.size - 8 or not head[8:9] == b"{":
            raise ValueError(
                f"{uri} is not a safetensors file (it starts with {head[:24]!r}); give the weights saved by "
                "safetensors (or a .pth saved with torch.save(model.state_dict(), ...))"
            )
    elif not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise ValueError(
            f"{uri} is not a PyTorch checkpoint (neither torch.save's zip nor a pickle; it starts with "
            f"{head[:24]!r}); save it with torch.save(model.state_dict(), ...), or as .safetensors"
        )


def _load_weights(uri: str) -> dict[str, torch.Tensor]:
    """A checkpoint folder's own weights (always safetensors: nothing is executed)."""
    from safetensors.torch import load

    check_weights_file(uri)
    return load(read_bytes(uri))


def load_spec(directory: str) -> ModelSpec:
    """The :class:`ModelSpec` in ``directory/model.json`` (a local folder or an ``s3://`` prefix).

    Raises:
        FileNotFoundError: no ``model.json`` there. ValueError: as :meth:`ModelSpec.from_json`.
    """
    uri = join(directory, SPEC_FILE)
    text = read_bytes(uri)
    if text.startswith(LFS_POINTER):
        raise ValueError(f"{uri} is a Git LFS pointer file, not the model's spec; run `git lfs pull` in its repository")
    try:
        return ModelSpec.from_json(text.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{uri} is not a model spec written by this project ({type(err).__name__}: {err})") from err


def load_checkpoint(
    path: str, spec: ModelSpec | None = None, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, ModelSpec]:
    """Load a model for inference (eval mode, no noise).

    ``path`` is either a checkpoint directory (with model.json), or a state-dict file
    (``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin``, read as :func:`read_state_dict`
    does: DDP prefixes and nested or EMA entries unwrapped) in which case ``spec`` must say the
    architecture, classes and preprocessing.
    """

    if path.endswith(STATE_DICT_SUFFIXES):
        if spec is None:
            raise ValueError(
                f"{path} is a bare state dict; pass the timm architecture, the classes and the "
                "image size too (CLI: --arch ARCH --num-classes N --image-size S)."
            )
        state = read_state_dict(path)  # nested (state_dict, model, EMA) and module.-prefixed keys unwrapped
        if not spec.model_id:
            spec = dataclasses.replace(spec, model_id=f"{spec.arch}-{os.path.basename(path)}")
    else:
        spec = spec or load_spec(path)
        state = _load_weights(join(path, WEIGHTS_FILE))
    model = create_model(spec)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        missing, unexpected = [str(err).splitlines()[-1].strip()], []
    if missing or unexpected:
        raise ValueError(
            f"weights in {path} do not match timm architecture {spec.arch!r} with "
            f"{spec.num_classes} classes: missing/mismatched {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.to(device).eval(), spec


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or ``.pth`` file (local or ``s3://``), unwrapped and unprefixed.

    Raises:
        ValueError: the file is missing or holds something other than a state dict (a pickled
            module or code is refused by ``weights_only=True``).
    """
    from timm.models import load_state_dict

    check_weights_file(uri)
    with local_copy(uri) as path:
        try:
            # timm: safetensors or torch.load(weights_only=True); state_dict_ema > model_ema > state_dict > model;
            # strips a DDP "module." prefix (clean_state_dict)
            state = load_state_dict(path, use_ema=True, weights_only=True)
        except Exception as err:
            raise ValueError(
                f"could not read a state dict from {uri} ({type(err).__name__}: {str(err)[:300]}); give a "
                ".safetensors file or a .pth saved with torch.save(model.state_dict(), ...) (tensors only)"
            ) from err
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ValueError(f"{uri} does not hold a state dict of tensors; save model.state_dict()")
    return dict(state)
