import pytest

from pipeline.config import apply_override, load_config
from trainer.settings import TrainSettings


def test_overrides_parse_yaml_values():
    cfg = load_config("configs/digits.yaml", ["teacher.epochs=3", "data.test=null", "student.archs=[a, b]"])
    assert cfg["teacher"]["epochs"] == 3 and cfg["data"]["test"] is None and cfg["student"]["archs"] == ["a", "b"]


def test_unknown_key_suggests_the_close_one():
    cfg = {"teacher": {"epochs": 1}}
    with pytest.raises(KeyError, match="teacher.epochs"):
        apply_override(cfg, "teacher.epoch=3")
    with pytest.raises(ValueError, match="key=value"):
        apply_override(cfg, "teacher.epochs")


def test_train_settings_reject_unknown_and_bad_values():
    with pytest.raises(ValueError, match="unknown training keys"):
        TrainSettings.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="optimizer"):
        TrainSettings.from_dict({"optimizer": "lamb"})


def test_every_training_key_is_in_the_default_config():
    """Overrides only accept keys the YAML has, so every TrainSettings field must be there."""
    import dataclasses

    cfg = load_config("configs/digits.yaml")
    fields = {f.name for f in dataclasses.fields(TrainSettings)} - {"seed", "ratio"}
    teacher_only = {"checkpoint", "reset_classifier"}  # the first teacher's: a supplied model
    for section in ("teacher", "student"):
        needed = fields - {"arch"} - (teacher_only if section == "student" else set())
        assert needed <= set(cfg[section]), needed - set(cfg[section])
        TrainSettings.from_dict({k: v for k, v in cfg[section].items() if k not in ("archs", "init_from_teacher")})


def _keys(cfg: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in cfg.items():
        out.add(prefix + k)
        if isinstance(v, dict) and k != "extra":
            out |= _keys(v, prefix + k + ".")
    return out


def test_paper_config_has_the_same_keys_and_valid_settings():
    """configs/imagenet_jft.yaml is the digits config's schema with the paper's values."""
    import torch

    from labeler.model import ModelSpec, count_parameters, create_model

    paper, digits = load_config("configs/imagenet_jft.yaml"), load_config("configs/digits.yaml")
    assert _keys(paper) == _keys(digits)
    for section in ("teacher", "student"):
        s = TrainSettings.from_dict(
            {k: v for k, v in paper[section].items() if k not in ("archs", "init_from_teacher")}
        )
        assert s.use_gpu and s.ema_decay == 0.9999 and s.randaugment_magnitude == 27
    assert paper["balance"]["per_class"] == 130000 and paper["balance"]["threshold"] == 0.3
    with torch.device("meta"):  # shapes only: no 480M-parameter allocation
        sizes = [count_parameters(create_model(ModelSpec(a, ["c"] * 1000, 600)))
                 for a in (paper["teacher"]["arch"], paper["student"]["archs"][0])]  # fmt: skip
    assert sizes[1] > sizes[0], "the student must be larger than the teacher"
