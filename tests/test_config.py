"""The typed run config (pipeline/config.py): every trap a config can set, as the user sees it.

None of these tests starts Ray: every error here is raised before it would.
"""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import ray
import yaml
from omegaconf import OmegaConf

import pipeline
from labeler.api import STALL_HINT, LabelOptions
from labeler.cli import build_parser, options_from_args
from pipeline.cli import main
from pipeline.config import (
    RUNLOCAL,
    ConfigError,
    RunConfig,
    StudentSettings,
    as_config,
    check_model_sizes,
    config_table,
    load_config,
    resolve_config_path,
    shipped_configs,
    train_settings,
)
from trainer.settings import TrainSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_error(capsys, *overrides: str, config: str = "digits") -> str:
    """``noisy-student run`` with overrides that must fail before Ray starts; returns what stderr says."""
    before = ray.is_initialized()
    assert main(["run", config, *overrides]) == 2
    assert ray.is_initialized() == before  # nothing started
    return capsys.readouterr().err


# --- trap: wrong types and unknown keys are accepted, then fail inside training -------------------------


def test_a_wrong_type_fails_up_front_naming_the_key(capsys):
    err = _run_error(capsys, "teacher.epochs=abc")
    assert "noisy-student: error: config key teacher.epochs: Value 'abc'" in err
    assert "could not be converted to Integer" in err


def test_a_value_outside_a_choice_names_the_key_and_the_choices(capsys):
    assert "config key teacher.optimizer: Invalid value 'lamb', expected one of ['sgd', 'rmsprop', 'adamw']" in (
        _run_error(capsys, "teacher.optimizer=lamb")
    )
    assert "config key label.precision: Invalid value 'fp8'" in _run_error(capsys, "label.precision=fp8")
    assert "config key student.feed" in _run_error(capsys, "student.feed=stream")
    assert "config key train.schedule" in _run_error(capsys, "train.schedule=step")


def test_an_unknown_key_names_its_path_and_the_close_one(capsys):
    assert "unknown config key 'teacher.epoch'; did you mean teacher.epochs" in _run_error(capsys, "teacher.epoch=3")
    assert "unknown config key 'label.soft'; it is now label.hard" in _run_error(capsys, "label.soft=false")
    assert "is not key=value" in _run_error(capsys, "teacher.epochs")


def test_an_unknown_key_in_a_yaml_file_names_its_path(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: digits\nlabel:\n  batchsize: 8\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'label.batchsize'; did you mean label.batch_size"):
        load_config(str(tmp_path / "mine.yaml"))


def test_keys_a_file_leaves_out_take_the_dataclass_defaults(tmp_path):
    """The old loop read every key from the file: one left out was `noisy-student: error: 'soft'`."""
    (tmp_path / "mine.yaml").write_text("teacher:\n  epochs: 3\n")
    cfg = load_config(str(tmp_path / "mine.yaml"))
    assert cfg.teacher.epochs == 3 and cfg.label.hard is False and cfg.label.temperature == 1.0
    assert cfg.student.epochs == TrainSettings().epochs


def test_a_real_bug_keeps_its_traceback(monkeypatch):
    """Only errors a user can fix become one line; a KeyError in the code is a bug and must show where it is."""
    import pipeline.loop

    def broken(cfg, **options):
        return {}["soft"]

    monkeypatch.setattr(pipeline.loop, "run_loop", broken)
    with pytest.raises(KeyError, match="soft"):
        main(["run", "digits"])


# --- trap: runlocal=true overrode explicit overrides -----------------------------------------------------


@pytest.mark.parametrize("order", ["runlocal first", "runlocal last"])
def test_runlocal_is_merged_before_the_command_line(order):
    overrides = ["runlocal=true", "teacher.epochs=10"]
    cfg = load_config("digits", overrides if order == "runlocal first" else overrides[::-1])
    assert cfg.teacher.epochs == 10  # the explicit override wins
    assert cfg.student.epochs == RUNLOCAL["student"]["epochs"] and cfg.iterations == RUNLOCAL["iterations"]
    assert load_config("digits").teacher.epochs == 150


def test_runlocal_set_in_a_file_applies_under_the_command_line(tmp_path):
    (tmp_path / "quick.yaml").write_text("base: digits\nrunlocal: true\n")
    assert load_config(str(tmp_path / "quick.yaml")).teacher.epochs == RUNLOCAL["teacher"]["epochs"]
    assert load_config(str(tmp_path / "quick.yaml"), ["teacher.epochs=7"]).teacher.epochs == 7


# --- trap: defaults in several places; YAML repeating keys; learning rate computed in a comment ---------


def test_the_config_table_is_generated_from_the_dataclasses():
    with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
        page = f.read()
    start, end = "<!-- config table: python -m pipeline.config -->\n", "\n<!-- end of config table -->"
    assert start in page and end in page, "docs/configuration.md lost its config-table markers"
    table = page.split(start, 1)[1].split(end, 1)[0]
    assert table == config_table(), "docs/configuration.md is stale: paste in python -m pipeline.config's output"


def test_every_setting_has_help_text():
    """The help text is the configuration table's meaning column and the labeler's --help."""
    from pipeline.config import StudentSettings

    for cls in (TrainSettings, StudentSettings, LabelOptions, *(type(v) for v in vars(RunConfig()).values())):
        if dataclasses.is_dataclass(cls):
            missing = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help")]
            assert not missing, f"{cls.__name__} fields without help (use core.settings.setting): {missing}"


def _leaves(node, prefix=""):
    for k, v in node.items():
        if isinstance(v, dict) and k != "extra":
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("name", ["digits", "imagenet_jft"])
def test_shipped_configs_hold_only_what_differs_from_the_defaults(name):
    with open(resolve_config_path(name)) as f:
        raw = yaml.safe_load(f)
    defaults = OmegaConf.to_container(OmegaConf.structured(RunConfig))
    train = {**defaults["train"], **raw.get("train", {})}
    same = []
    for key, value in _leaves(raw):
        section, _, leaf = key.partition(".")
        default = defaults.get(section) if not leaf else defaults[section].get(leaf)
        if section in ("teacher", "student") and leaf in train:
            default = train[leaf]  # a section key repeating the shared train: value is just as redundant
        if value == default:
            same.append(key)
    assert not same, f"{name}.yaml repeats default values: {same}"


def test_one_default_epoch_count(tmp_path):
    """Three answers before (150 in the YAML, 30 in TrainSettings, 4 under runlocal): now the dataclass's."""
    (tmp_path / "bare.yaml").write_text("run_dir: runs/bare\n")
    cfg = load_config(str(tmp_path / "bare.yaml"))
    assert cfg.teacher.epochs == cfg.student.epochs == TrainSettings().epochs
    with pytest.raises(ConfigError, match="teacher.epochs"):
        load_config("digits", ["teacher.epochs=null"])


def test_the_learning_rate_per_256_images_is_computed():
    paper = load_config("imagenet_jft")
    for section in ("teacher", "student"):
        assert paper[section].lr == pytest.approx(0.016 * 2048 / 256)
    assert load_config("imagenet_jft", ["train.batch_size=4096"]).teacher.lr == pytest.approx(0.256)
    assert TrainSettings(lr_per_256=0.016, batch_size=512).lr == pytest.approx(0.032)  # the Python API too
    with pytest.raises(ConfigError, match="teacher.lr or teacher.lr_per_256, not both"):
        load_config("imagenet_jft", ["teacher.lr=0.1", "teacher.lr_per_256=0.02"])
    assert load_config("imagenet_jft", ["teacher.lr=0.1"]).teacher.lr == 0.1  # a section's lr beats train's rule


def test_train_is_the_shared_base_of_teacher_and_student():
    cfg = load_config("imagenet_jft", ["train.epochs=5", "student.epochs=3"])
    assert (cfg.teacher.epochs, cfg.student.epochs) == (5, 3)
    assert cfg.teacher.optimizer == cfg.student.optimizer == "rmsprop" and cfg.student.use_gpu
    assert train_settings(cfg.student, 7, "efficientnet_l2") == dataclasses.replace(
        TrainSettings(**{k: v for k, v in OmegaConf.to_container(cfg.teacher).items()
                         if k not in ("lr_per_256", "classes")}),
        epochs=3, arch="efficientnet_l2", seed=7, steps_per_epoch=625,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="top-level seed"):
        load_config("digits", ["train.seed=3"])


def test_the_paper_config_is_valid_and_its_student_is_larger():
    paper = load_config("imagenet_jft")
    s = train_settings(paper.teacher, 0)
    assert s.use_gpu and s.ema_decay == 0.9999 and s.randaugment_magnitude == 27 and s.feed == "ray_data"
    assert paper.balance.per_class == 130000 and paper.balance.threshold == 0.3 and not paper.label.hard
    check_model_sizes(paper, 1000)  # meta device: no 480M-parameter allocation


# --- trap: labeler settings the YAML or the labeler CLI could not reach -----------------------------------


def test_cpus_per_actor_and_stall_timeout_from_the_yaml_and_the_labeler_cli(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: digits\nlabel:\n  cpus_per_actor: 0.5\n  stall_timeout_s: 30\n")
    from_yaml = OmegaConf.to_object(load_config(str(tmp_path / "mine.yaml")).label)
    argv = ["--input", "x", "--checkpoint", "c", "--output", "o", "--cpus-per-actor", "0.5", "--stall-timeout-s", "30"]
    from_cli = options_from_args(build_parser().parse_args(argv))
    assert isinstance(from_yaml, LabelOptions) and from_yaml == from_cli
    assert (from_cli.cpus_per_actor, from_cli.stall_timeout_s) == (0.5, 30.0)


def test_every_labeler_setting_is_a_cli_option_and_a_config_key():
    parser = build_parser()
    dests = {a.dest for a in parser._actions}
    label_keys = set(OmegaConf.to_container(load_config("digits").label))
    for f in dataclasses.fields(LabelOptions):
        assert f.name in dests and f.name in label_keys, f.name
    args = parser.parse_args(["--input", "x", "--checkpoint", "c", "--output", "o", "--hard", "--no-optimize"])
    assert options_from_args(args) == LabelOptions(hard=True, optimize=False)
    with pytest.raises(SystemExit):
        parser.parse_args(["--input", "x", "--checkpoint", "c", "--output", "o", "--precision", "fp8"])


def test_the_stall_message_names_settings_that_exist():
    options = {o for a in build_parser()._actions for o in a.option_strings}
    named = re.findall(r"--[a-z0-9-]+", STALL_HINT)
    assert named and set(named) <= options, set(named) - options
    keys = re.findall(r"label\.([a-z_]+)", STALL_HINT)
    assert keys and set(keys) <= {f.name for f in dataclasses.fields(LabelOptions)}


def test_balance_has_one_name_per_switch():
    from pipeline.ablate import variants

    parser_help = subprocess.run(
        [sys.executable, "-m", "pipeline", "balance", "--help"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert "--no-duplicate" in parser_help and "--trim-only" not in parser_help
    assert load_config("digits", ["balance.duplicate=false"]).balance.duplicate is False
    assert variants(load_config("digits"))["hard_labels"] == ["label.hard=true"]


# --- trap: configs missing from a non-editable install ----------------------------------------------------


def test_configs_resolve_by_name_from_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nowhere near a checkout
    assert set(shipped_configs()) >= {"digits", "imagenet_jft"}
    path = resolve_config_path("digits")
    assert os.path.dirname(path) == os.path.join(os.path.dirname(pipeline.__file__), "configs")
    for ref in ("digits", "digits.yaml", "configs/digits.yaml"):
        assert load_config(ref).run_dir == "runs/digits"
    with pytest.raises(ConfigError, match="digits, imagenet_jft"):
        load_config("digitz")


def test_a_users_yaml_extends_a_shipped_one(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("base: digits\nrun_dir: runs/mine\nteacher:\n  epochs: 7\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.yaml").write_text("base: ../mine.yaml\nstudent:\n  epochs: 5\n")
    monkeypatch.chdir(tmp_path / "sub")
    cfg = load_config("more.yaml", ["iterations=1"])
    assert (cfg.run_dir, cfg.teacher.epochs, cfg.student.epochs, cfg.iterations) == ("runs/mine", 7, 5, 1)
    assert list(cfg.student.archs) == ["resnet10t", "resnet14t"]  # from digits
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="names itself"):
        load_config(str(tmp_path / "loop.yaml"))


@pytest.mark.timeout(300)
def test_the_wheel_ships_the_configs(tmp_path):
    """What a plain `pip install .` installs: the shipped configs are in the wheel, inside the package."""
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ and *.egg-info behind
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "runs", ".*")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for package in ("core", "labeler", "pipeline", "trainer"):
        shutil.copytree(os.path.join(ROOT, package), src / package, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), src],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    assert {"pipeline/configs/digits.yaml", "pipeline/configs/imagenet_jft.yaml"} <= set(names)


# --- trap: cross-field rules found late (silent batch shrink, load_state_dict inside a worker) ------------


def test_a_batch_that_does_not_divide_over_the_workers_is_an_error(capsys):
    err = _run_error(capsys, "teacher.batch_size=33")
    assert "teacher.batch_size 33 must be a multiple of teacher.num_workers 2" in err
    assert "student.batch_size 30 must be a multiple of student.num_workers 4" in (
        _run_error(capsys, "train.batch_size=30", "student.num_workers=4")
    )
    with pytest.raises(ValueError, match="batch_size 10 must be a multiple of num_workers 4"):
        TrainSettings(batch_size=10, num_workers=4).validate()


def test_init_from_teacher_with_another_architecture_fails_before_ray(tmp_path):
    """It used to fail inside a Ray Train worker with a raw load_state_dict error."""
    from pipeline.loop import run_loop

    before = ray.is_initialized()
    cfg = {"run_dir": str(tmp_path / "run"), "student": {"init_from_teacher": True, "archs": ["resnet10t"]}}
    with pytest.raises(ConfigError, match=r"teacher.arch is test_resnet and student.archs\[0\] is resnet10t"):
        run_loop(cfg)
    assert ray.is_initialized() == before and not (tmp_path / "run").exists()
    ok = load_config("digits", ["student.init_from_teacher=true", "student.archs=[test_resnet]"])
    assert list(ok.student.archs) == ["test_resnet"]


def test_a_run_config_object_folds_train_into_teacher_and_student():
    """RunConfig(train=...) reaches both models, as `train:` in a file does (it used to be ignored)."""
    cfg = as_config(RunConfig(train=TrainSettings(epochs=5), student=StudentSettings(epochs=7)))
    assert (cfg.teacher.epochs, cfg.student.epochs) == (5, 7)


def test_init_from_teacher_and_a_pretrained_student_are_refused_together():
    with pytest.raises(ConfigError, match=r"student.pretrained='w.safetensors' \(set there or through train"):
        load_config("digits", ["student.init_from_teacher=true", "student.archs=[test_resnet]",
                               "student.pretrained=w.safetensors"])  # fmt: skip


def test_a_smaller_student_is_refused_before_training():
    cfg = load_config("digits", ["student.archs=[test_efficientnet]"])
    with pytest.raises(ConfigError, match=r"student.archs\[0\] test_efficientnet has 101,766 parameters, fewer than"):
        check_model_sizes(cfg, 10)
    check_model_sizes(load_config("digits", ["student.archs=[test_efficientnet]", "allow_smaller_student=true"]), 10)


def test_data_splits_are_both_set_or_neither():
    with pytest.raises(ConfigError, match="set both data.labeled and data.unlabeled"):
        load_config("digits", ["data.labeled=/tmp/x"])


def test_a_supplied_checkpoint_is_the_first_teachers_only():
    assert load_config("digits", ["teacher.checkpoint=/models/mine.pth"]).teacher.checkpoint == "/models/mine.pth"
    for key in ("student.checkpoint=/m.pth", "train.checkpoint=/m.pth", "student.reset_classifier=true"):
        with pytest.raises(ConfigError, match="set teacher.checkpoint"):
            load_config("digits", [key])
    assert train_settings(load_config("digits", ["teacher.pretrained=true"]).teacher, 0).pretrained == "timm"


def test_a_later_layers_train_key_beats_an_earlier_sections_key():
    """runlocal's teacher/student epochs used to outrank a command-line train.epochs (a trap, via train)."""
    cfg = load_config("digits", ["runlocal=true", "train.epochs=10"])
    assert (cfg.teacher.epochs, cfg.student.epochs) == (10, 10)
    assert load_config("digits", ["train.epochs=7"]).teacher.epochs == 7  # the file sets teacher.epochs: 150
    paper = load_config("imagenet_jft", ["teacher.lr=0.1"])  # an explicit lr clears the file's lr_per_256
    assert paper.teacher.lr == 0.1 and paper.student.lr == pytest.approx(0.128)


def test_the_selection_metric_is_one_the_run_records_ranked_the_right_way(capsys):
    """val_loss with the default max exported the worst checkpoint; a typo failed only after training."""
    assert "select_mode=min" in _run_error(capsys, "train.select_metric=val_loss")
    assert load_config("digits", ["train.select_metric=val_loss", "train.select_mode=min"]).student.select_mode == "min"
    assert "must be one of val_top1" in _run_error(capsys, "teacher.select_metric=val_top")
    assert "exists only with EMA on" in _run_error(capsys, "student.select_metric=raw_val_top1")


def test_a_supplied_checkpoint_folder_must_match_teacher_arch(tmp_path):
    """Its own architecture is used, but the student's default and the size rule read teacher.arch."""
    from tests.helpers import random_checkpoint

    random_checkpoint(str(tmp_path / "mine"), seed=0)  # a test_resnet checkpoint folder
    ok = load_config("digits", [f"teacher.checkpoint={tmp_path / 'mine'}"])
    check_model_sizes(ok, 10)
    bad = load_config("digits", [f"teacher.checkpoint={tmp_path / 'mine'}", "teacher.arch=resnet10t"])
    with pytest.raises(ConfigError, match="holds a test_resnet model but teacher.arch is resnet10t"):
        check_model_sizes(bad, 10)
