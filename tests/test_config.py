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
    for section in ("teacher", "student"):
        assert fields - {"arch"} <= set(cfg[section]), fields - set(cfg[section])
        TrainSettings.from_dict({k: v for k, v in cfg[section].items() if k not in ("archs", "init_from_teacher")})
