"""Bring your own model: a checkpoint made elsewhere, converted into this project's checkpoint folder.

Accepted forms (local paths or ``s3://`` URIs):

* this project's checkpoint folder (``model.json`` + ``model.safetensors``, :mod:`core.model`);
* a bare state dict of a timm architecture, ``.safetensors`` or ``.pth``/``.pt``/``.bin``: keys with a DDP
  ``module.`` prefix, or nested under ``state_dict_ema``, ``model_ema``, ``state_dict`` or ``model``
  (EMA weights preferred, as timm does).

Loading never executes code: safetensors, or ``torch.load(weights_only=True)``, through timm's own
``load_state_dict`` (which also picks the nested entry and strips ``module.``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING

from core.model import (
    SPEC_FILE,
    STATE_DICT_SUFFIXES,
    WEIGHTS_FILE,
    ModelSpec,
    create_model,
    load_spec,
    read_state_dict,
    save_checkpoint,
)
from core.storage import exists, join

if TYPE_CHECKING:
    import torch

__all__ = ["ClassCountMismatch", "classifier_keys", "import_checkpoint"]

logger = logging.getLogger(__name__)


class ClassCountMismatch(ValueError):
    """The checkpoint's classifier has another number of classes than the labeled set."""


def classifier_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of the model's classifier (``weight``, ``bias``), from timm's ``pretrained_cfg``."""
    names = model.pretrained_cfg.get("classifier") or "fc"
    names = [names] if isinstance(names, str) else list(names)
    keys = set(model.state_dict())
    return [f"{n}.{p}" for n in names for p in ("weight", "bias") if f"{n}.{p}" in keys]


def head_width(uri: str, arch: str, num_classes: int) -> int | None:
    """The number of outputs of the classifier in the state dict at ``uri`` for timm architecture ``arch``
    (its keys from a model built on the meta device: no memory), or None when the file has no such key.

    Raises:
        ValueError: as :func:`read_state_dict`, or an unknown architecture.
    """
    import torch

    with torch.device("meta"):
        model = create_model(ModelSpec(arch, [str(i) for i in range(num_classes)], 32))
    return _checkpoint_classes(read_state_dict(uri), classifier_keys(model))


def _checkpoint_classes(state: dict, keys: list[str]) -> int | None:
    weight = next((k for k in keys if k.endswith(".weight")), None)
    return int(state[weight].shape[0]) if weight and weight in state else None


def text_ordered_numbers(classes: list[str]) -> bool:
    """True when every class name is a whole number and the names are in text order where that differs
    from numeric order (``'0', '1', '10', '11', '2'``): a model trained elsewhere may well have its
    outputs in numeric order (timm's folder reader sorts names naturally), so the order is a guess."""
    if not classes or not all(c.isdigit() for c in classes):
        return False
    return list(classes) != sorted(classes, key=int)


def text_order_warning(uri: str, classes: list[str]) -> str:
    """The loud note for a bare state dict whose classes are numbers taken in text order (see
    :func:`text_ordered_numbers`): what is assumed and how to say otherwise."""
    return (
        f"{uri} is a bare state dict, so the class of each output is not known; its outputs are taken to be the "
        f"classes in text order ({', '.join(classes[:6])}, ...), not numeric order (0, 1, 2, ...). If the model was "
        f"trained with classes in numeric order (timm's folder reader does that), set teacher.classes="
        f"[{', '.join(sorted(classes, key=int)[:4])}, ...] to its order"
    )


def reorder_head(state: dict, head: list[str], source: list[str], target: list[str]) -> dict:
    """``state`` with the classifier rows (``head`` keys, output dimension first) moved from the order of
    ``source`` (the supplied model's classes) to that of ``target`` (the same names, another order)."""
    import torch

    order = torch.tensor([source.index(c) for c in target])
    return {k: (v.index_select(0, order) if k in head else v) for k, v in state.items()}


def import_checkpoint(
    uri: str, spec: ModelSpec, out_dir: str, reset_classifier: bool = False, classes: list[str] | None = None
) -> tuple[ModelSpec, bool]:
    """Convert ``uri`` into a checkpoint folder ``out_dir`` whose classes are ``spec.classes``, in that order.

    ``spec`` gives the architecture and preprocessing of a bare state dict; a project folder keeps its own
    ``model.json`` (its architecture and preprocessing) and takes ``spec.classes``. ``classes``: the class of
    each output of the supplied model, in order (``teacher.classes``): needed for a bare state dict whose
    outputs are not in ``spec.classes``' order; a project folder's ``model.json`` says it already. When the
    supplied model's classes are ``spec.classes`` in another order, the classifier's rows are reordered.
    Without ``classes``, a bare state dict is taken to be in ``spec.classes``' order, with a warning when
    the names are numbers in text order (``'10'`` before ``'2'``). Returns the written spec and whether the
    classifier was re-initialised (then the model needs fine-tuning before use).

    Raises:
        ClassCountMismatch: the classifier's class count (or, for a project folder or with ``classes``, its
            class names) differs from ``spec``'s and ``reset_classifier`` is False; the message names both.
        ValueError: unreadable file, weights that do not fit the architecture, ``classes`` that disagree with
            the folder's ``model.json``, or as many names as the head has outputs.
    """
    if uri.endswith(STATE_DICT_SUFFIXES):
        state, source_classes = read_state_dict(uri), list(classes) if classes else None
    elif exists(join(uri, SPEC_FILE)):
        source = load_spec(uri)
        if classes and list(classes) != list(source.classes):
            raise ValueError(
                f"teacher.classes {list(classes)[:5]}... differs from the classes {source.classes[:5]}... that "
                f"{uri}/{SPEC_FILE} records for its outputs; remove teacher.classes (the folder says its order)"
            )
        state, source_classes = read_state_dict(join(uri, WEIGHTS_FILE)), source.classes
        spec = dataclasses.replace(source, classes=list(spec.classes), model_id="")
    else:
        raise ValueError(
            f"{uri} is neither a checkpoint folder (with {SPEC_FILE}) nor a state dict file "
            f"({', '.join(STATE_DICT_SUFFIXES)}); set teacher.checkpoint to one of them"
        )
    model = create_model(spec)
    head = classifier_keys(model)
    found = _checkpoint_classes(state, head)
    if classes and found is not None and len(classes) != found:
        raise ValueError(
            f"teacher.classes names {len(classes)} classes but the classifier of {uri} has {found} outputs; "
            "give one class name per output, in the order of the outputs"
        )
    reorder = (
        source_classes is not None
        and list(source_classes) != list(spec.classes)
        and sorted(source_classes) == sorted(spec.classes)
    )
    if reorder:
        logger.info(
            "the supplied model's outputs are the labeled classes in another order; its head is reordered into the "
            f"labeled set's order ({', '.join(spec.classes[:12])}{', ...' if spec.num_classes > 12 else ''})"
        )
        state, source_classes = reorder_head(state, head, list(source_classes), list(spec.classes)), spec.classes
    elif source_classes is None and found == spec.num_classes and text_ordered_numbers(spec.classes):
        logger.warning(text_order_warning(uri, list(spec.classes)))
    mismatch = (found is not None and found != spec.num_classes) or (
        source_classes is not None and list(source_classes) != list(spec.classes)
    )
    reset = False
    if mismatch:
        if not reset_classifier:
            names = "" if found != spec.num_classes else f" (its class names {source_classes[:5]}... differ)"
            raise ClassCountMismatch(
                f"the checkpoint {uri} has a classifier for {found} classes{names}, but the labeled set has "
                f"{spec.num_classes} classes; supply a checkpoint trained on these classes, or set "
                "teacher.reset_classifier=true to re-initialise its head and fine-tune it on the labeled set"
            )
        state = {k: v for k, v in state.items() if k not in head}
        reset = True
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (reset and k in head)]
    if missing or unexpected:
        raise ValueError(
            f"weights in {uri} do not fit timm architecture {spec.arch!r}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; check teacher.arch (it must name the architecture the weights were saved from)"
        )
    origin = uri if "://" in uri else os.path.abspath(uri)
    spec = dataclasses.replace(spec, extra={**spec.extra, "imported_from": origin})
    return save_checkpoint(model, spec, out_dir), reset
