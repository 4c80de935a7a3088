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
