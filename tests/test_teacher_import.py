"""Bring your own teacher (core.checkpoint_import) and pretrained initialisation (core.model)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from core.checkpoint_import import ClassCountMismatch, import_checkpoint
from core.images import resize_center_crop
from core.model import ModelSpec, create_model, load_checkpoint, load_spec, model_preprocessing
from tests.helpers import random_checkpoint

CLASSES = [str(i) for i in range(10)]


def _spec(num_classes: int = 10, arch: str = "test_resnet") -> ModelSpec:
    return ModelSpec(arch, [str(i) for i in range(num_classes)], 16, mean=(0.5,) * 3, std=(0.5,) * 3)


def _model(seed: int, num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(_spec(num_classes))


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ddp(state: dict) -> dict:
    return {"module." + k: v for k, v in state.items()}


FORMS = {
    "plain.safetensors": lambda sd, other: sd,
    "ddp.pth": lambda sd, other: _ddp(sd),
    "nested_state_dict.pth": lambda sd, other: {"state_dict": _ddp(sd), "epoch": 7},
    "nested_model.pth": lambda sd, other: {"model": sd, "optimizer": {}},
    # EMA weights win over the raw ones, as timm's loader does
    "ema.pth": lambda sd, other: {"state_dict": other, "state_dict_ema": _ddp(sd)},
}


@pytest.mark.parametrize("name", sorted(FORMS))
def test_a_state_dict_in_each_accepted_form_becomes_a_checkpoint_folder(tmp_path, name):
    teacher, other = _model(1).state_dict(), _model(2).state_dict()
    blob = FORMS[name](teacher, other)
    path = str(tmp_path / name)
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in blob.items()}, path)
    else:
        torch.save(blob, path)
    spec, reset = import_checkpoint(path, _spec(), str(tmp_path / "out"))
    assert not reset and spec.classes == CLASSES and spec.extra["imported_from"] == path
    model, loaded = load_checkpoint(str(tmp_path / "out"))
    assert loaded.arch == "test_resnet" and loaded.model_id == spec.model_id
    assert _same_weights(model.state_dict(), teacher)
    assert not _same_weights(model.state_dict(), other)


def test_a_project_checkpoint_folder_keeps_its_own_spec(tmp_path):
    src = random_checkpoint(str(tmp_path / "src"), num_classes=10, image_size=24)
    spec, reset = import_checkpoint(str(tmp_path / "src"), _spec(), str(tmp_path / "out"))
    assert not reset and spec.image_size == 24 and load_spec(str(tmp_path / "out")).image_size == 24
    original, _ = load_checkpoint(str(tmp_path / "src"))
    imported, _ = load_checkpoint(str(tmp_path / "out"))
    assert _same_weights(original.state_dict(), imported.state_dict()) and src.arch == spec.arch


def test_another_class_count_is_an_error_naming_both_counts(tmp_path):
    path = str(tmp_path / "five.pth")
    torch.save(_model(1, num_classes=5).state_dict(), path)
    with pytest.raises(ClassCountMismatch, match=r"for 5 classes.*has 10 classes.*reset_classifier=true"):
        import_checkpoint(path, _spec(10), str(tmp_path / "out"))


def test_reset_classifier_keeps_the_body_and_makes_a_new_head(tmp_path):
    five = _model(1, num_classes=5).state_dict()
    path = str(tmp_path / "five.safetensors")
    save_file(five, path)
    spec, reset = import_checkpoint(path, _spec(10), str(tmp_path / "out"), reset_classifier=True)
    assert reset and spec.num_classes == 10
    state = load_checkpoint(str(tmp_path / "out"))[0].state_dict()
    assert state["fc.weight"].shape == (10, five["fc.weight"].shape[1])
    assert all(torch.equal(state[k], v) for k, v in five.items() if not k.startswith("fc."))


def test_a_pickled_object_is_refused_without_running_it(tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({"state_dict": _model(1).state_dict(), "hook": Image.new("L", (2, 2))}, path)
    with pytest.raises(ValueError, match="could not read a state dict"):
        import_checkpoint(path, _spec(), str(tmp_path / "out"))


def test_a_pretrained_file_really_changes_the_initial_weights(tmp_path):
    """timm loads the file (pretrained_cfg_overlay); a 1000-class head is dropped for our 10 classes."""
    pretrained = _model(3, num_classes=1000).state_dict()
    path = str(tmp_path / "in1k.safetensors")
    save_file(pretrained, path)
    torch.manual_seed(0)
    scratch = create_model(_spec()).state_dict()
    torch.manual_seed(0)
    init = create_model(_spec(), pretrained=path).state_dict()
    body = [k for k in pretrained if not k.startswith("fc.")]
    assert all(torch.equal(init[k], pretrained[k]) for k in body)
    assert any(not torch.equal(init[k], scratch[k]) for k in body if init[k].is_floating_point())
    assert init["fc.weight"].shape == (10, pretrained["fc.weight"].shape[1])


def test_the_pretrained_start_is_written_once_beside_the_ray_storage(tmp_path):
    """Not inside the exported model folder, and a resumed run needs neither the file nor the network."""
    from trainer.api import _pretrained_start
    from trainer.settings import TrainSettings

    pretrained = _model(3, num_classes=1000).state_dict()
    path = tmp_path / "in1k.safetensors"
    save_file(pretrained, str(path))
    settings = TrainSettings(pretrained=str(path))
    folder = _pretrained_start(settings, _spec(), str(tmp_path / "ray_train"), "round_0_teacher")
    assert folder == str(tmp_path / "ray_train" / "round_0_teacher_pretrained")
    model, _ = load_checkpoint(folder)
    assert torch.equal(model.state_dict()["conv1.0.weight"], pretrained["conv1.0.weight"])
    path.unlink()  # the resumed run: the weights file is gone
    assert _pretrained_start(settings, _spec(), str(tmp_path / "ray_train"), "round_0_teacher") == folder


def test_a_missing_pretrained_file_says_what_to_give(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        create_model(_spec(), pretrained=str(tmp_path / "nope.safetensors"))


def test_model_preprocessing_comes_from_the_pretrained_config():
    """timm's pretrained_cfg: ViT-Ti is bicubic at crop_pct 0.9 with mean/std 0.5."""
    spec = model_preprocessing(ModelSpec("vit_tiny_patch16_224", CLASSES, 32))
    assert (spec.interpolation, spec.crop_pct, spec.mean, spec.image_size) == ("bicubic", 0.9, (0.5,) * 3, 32)
    assert ModelSpec.from_json(spec.to_json()) == spec  # interpolation survives model.json


def test_a_fixed_size_architecture_is_built_at_the_configured_size():
    model = create_model(ModelSpec("vit_tiny_patch16_224", CLASSES, 32))
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_eval_resize_is_timms_floor_and_interpolation():
    """Shorter side to floor(size / crop_pct) with the spec's filter, then a centre crop: torchvision's own."""
    from torchvision import transforms as T

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (60, 60, 3), dtype=np.uint8))
    size, crop_pct = 16, 0.85
    assert math.floor(size / crop_pct) == 18 and round(size / crop_pct) == 19  # where floor and round differ
    ref = T.Compose([T.Resize(18, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])(img)
    ours = resize_center_crop(img, size, crop_pct, "bicubic")
    np.testing.assert_array_equal(ours, np.asarray(ref))
    assert not np.array_equal(ours, resize_center_crop(img, size, crop_pct, "bilinear"))
