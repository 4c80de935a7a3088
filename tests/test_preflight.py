"""Inputs are checked before compute: class sets, label values, a supplied teacher's class order, and
whether what a run_dir holds was made from the same inputs. Each refusal happens before Ray starts
(the autouse fixture fails any test here that starts Ray) and before any model directory exists."""

import json
import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import timm
import torch

from core.checkpoint_import import import_checkpoint
from core.fingerprint import OutputMismatch
from core.model import ModelSpec, load_checkpoint, save_checkpoint
from pipeline.checks import InputError
from pipeline.cli import main
from pipeline.config import as_config
from pipeline.loop import preflight, run_loop
from pipeline.stages import start_stage
from tests.helpers import png_bytes
from trainer.data import LabeledBatches, label_names, read_class_set


def folders(root, counts: dict, seed: int = 0):
    """root/<class>/<i>.png for each class and count (a class of count 0 is an empty folder)."""
    for k, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / name / f"{i}.png").write_bytes(png_bytes(seed=seed + 100 * k + i))
    return str(root)


def unlabeled(root, n: int = 6):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"u{i}.png").write_bytes(png_bytes(seed=1000 + i))
    return str(root)


def config(tmp_path, labeled: str, test: str | None = None, **data) -> dict:
    return {
        "run_dir": str(tmp_path / "run"),
        "data": {"labeled": labeled, "unlabeled": unlabeled(tmp_path / "unlabeled"), "test": test, **data},
        "teacher": {"arch": "test_resnet", "epochs": 1},
        "student": {"epochs": 1},
    }


def refused(cfg: dict, error=InputError) -> str:
    """run_loop's error for ``cfg``; asserts that nothing was trained and Ray was not started."""
    ray_before = ray.is_initialized()  # (another module's tests may have started the session's cluster)
    with pytest.raises(error) as info:
        run_loop(cfg)
    assert ray.is_initialized() == ray_before
    assert not any(p.name == "model.safetensors" for p in Path(cfg["run_dir"]).rglob("*"))
    return str(info.value)


DIGITS = [str(i) for i in range(10)]


def test_an_empty_class_folder_stops_the_loop_before_the_teacher_trains(tmp_path):
    labeled = folders(tmp_path / "labeled", {c: (0 if c == "7" else 3) for c in DIGITS})
    test = folders(tmp_path / "test", {c: 5 for c in DIGITS}, seed=7)
    message = refused(config(tmp_path, labeled, test))
    assert "'7'" in message and "hold no images" in message
    assert not (tmp_path / "run" / "round_0" / "teacher").exists()


def test_a_labeled_set_of_one_class_is_refused(tmp_path):
    labeled = folders(tmp_path / "labeled", {"three": 4})
    message = refused(config(tmp_path, labeled))
    assert "at least two" in message and "'three'" in message


def test_a_test_split_with_other_classes_is_refused_naming_them(tmp_path):
    labeled = folders(tmp_path / "labeled", {c: 2 for c in "abc"})
    test = folders(tmp_path / "test", {"a": 2, "b": 2, "x": 1})
    message = refused(config(tmp_path, labeled, test))
    assert "'x'" in message and "'c'" in message and "data.test" in message


def test_an_extra_evaluation_set_may_hold_a_subset_of_the_classes(tmp_path):
    labeled = folders(tmp_path / "labeled", {c: 2 for c in "abc"})
    extra = folders(tmp_path / "extra", {"a": 2})
    cfg = as_config({**config(tmp_path, labeled), "iterations": 0, "eval": {"extra": {"hard": extra}}})
    _, report, _ = preflight(cfg)
    assert not report.problems and any("eval.extra.hard" in line for line in report.found)


def labeled_parquet(path, labels, column="label"):
    images = [png_bytes(seed=i) for i in range(len(labels))]
    pd.DataFrame({"image": images, column: labels}).to_parquet(path)  # as pandas writes them
    return str(path)


def test_float_labels_are_class_indices_and_rows_without_one_are_counted(tmp_path):
    labels = [float(i % 10) for i in range(20)] + [None]  # pandas: an int column with a missing value
    path = labeled_parquet(tmp_path / "labeled.parquet", labels)
    assert pq.read_schema(path).field("label").type == pa.float64()
    cs = read_class_set(path)
    assert cs.classes == DIGITS and cs.unlabeled == 1 and cs.images == 20
    test = folders(tmp_path / "test", {c: 1 for c in DIGITS})
    message = refused(config(tmp_path, path, test))
    assert "1 of 21 rows have no label" in message
    # without the unlabeled row, the float labels name the test split's classes
    clean = labeled_parquet(tmp_path / "clean.parquet", labels[:-1])
    _, report, _ = preflight(as_config({**config(tmp_path, clean, test), "iterations": 0}))
    assert not report.problems and report.classes.classes == DIGITS


@pytest.mark.parametrize(
    "values, message",
    [([0.5, 1.0], "not a class index"), ([-1, 2], "not a class index"), ([True, False], "labels must be")],
)
def test_labels_that_are_neither_names_nor_indices_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        label_names(pa.array(values), "x.parquet, column 'label'")


def test_the_label_column_is_a_setting_and_a_missing_one_names_the_columns(tmp_path):
    path = labeled_parquet(tmp_path / "labeled.parquet", [i % 3 for i in range(9)], column="labels")
    message = refused(config(tmp_path, path))
    assert "no 'label' column" in message and "labels" in message and "data.label_column" in message
    cfg = as_config({**config(tmp_path, path, label_column="labels"), "iterations": 0})
    _, report, _ = preflight(cfg)
    assert not report.problems and report.classes.classes == ["0", "1", "2"]
    batches = LabeledBatches(path, ["0", "1", "2"], 8, 3, batch=16, label_column="labels")
    ((_, got),) = list(batches)
    assert got.tolist() == [i % 3 for i in range(9)]


# --- a supplied teacher's class order ----------------------------------------------------------------

TWELVE = sorted(str(i) for i in range(12))  # class folders 0..11 in the project's (text) order


def numeric_head_model() -> torch.nn.Module:
    """A model whose output i is the class numbered i (numeric order): its bias says which."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=12)
    with torch.no_grad():
        model.fc.bias.copy_(torch.arange(12, dtype=torch.float32))
    return model


def test_a_state_dict_in_numeric_class_order_is_reordered_into_the_labeled_order(tmp_path):
    path = tmp_path / "teacher.pth"
    torch.save(numeric_head_model().state_dict(), path)
    spec = ModelSpec("test_resnet", TWELVE, 16)
    numeric = [str(i) for i in range(12)]
    import_checkpoint(str(path), spec, str(tmp_path / "out"), classes=numeric)
    model, written = load_checkpoint(str(tmp_path / "out"))
    assert written.classes == TWELVE  # output j is the labeled set's class j ...
    assert model.fc.bias.tolist() == [float(c) for c in TWELVE]  # ... which was the model's output int(c)


class Recorded(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_a_bare_state_dict_with_numbers_in_text_order_gets_a_loud_note(tmp_path):
    path = tmp_path / "teacher.pth"
    torch.save(numeric_head_model().state_dict(), path)
    log, recorded = logging.getLogger("core.checkpoint_import"), Recorded()
    log.addHandler(recorded)
    try:
        import_checkpoint(str(path), ModelSpec("test_resnet", TWELVE, 16), str(tmp_path / "out"))
    finally:
        log.removeHandler(recorded)
    assert any("teacher.classes" in line and "text order" in line for line in recorded.lines)
    labeled = folders(tmp_path / "labeled", {c: 1 for c in TWELVE})
    cfg = {**config(tmp_path, labeled), "teacher": {"arch": "test_resnet", "checkpoint": str(path)}}
    _, report, _ = preflight(as_config({**cfg, "iterations": 0}))
    assert any("teacher.classes" in w for w in report.warnings)
    numeric = [str(i) for i in range(12)]
    cfg["teacher"]["classes"] = numeric
    _, report, _ = preflight(as_config({**cfg, "iterations": 0}))
    assert not report.warnings and any("reordered" in line for line in report.found)


def test_a_checkpoint_folder_in_another_class_order_is_reordered(tmp_path):
    model = numeric_head_model()
    save_checkpoint(model, ModelSpec("test_resnet", [str(i) for i in range(12)], 16), str(tmp_path / "given"))
    import_checkpoint(str(tmp_path / "given"), ModelSpec("test_resnet", TWELVE, 16), str(tmp_path / "out"))
    reordered, _ = load_checkpoint(str(tmp_path / "out"))
    assert reordered.fc.bias.tolist() == [float(c) for c in TWELVE]
    x = torch.randn(2, 3, 16, 16)  # the same predictions, each under its class's name
    assert torch.allclose(reordered(x)[:, [TWELVE.index(str(i)) for i in range(12)]], model.eval()(x), atol=1e-5)


# --- reuse: a stage is kept only when the same inputs made it ----------------------------------------


def test_a_stage_made_from_other_inputs_stops_the_run_before_compute(tmp_path):
    labeled = folders(tmp_path / "labeled", {c: 2 for c in "ab"})
    base = config(tmp_path, labeled)
    _, _, stages = preflight(as_config(base))
    for stage in stages[:3]:  # the teacher (finished), its evaluation, round 1's labels: from an earlier run
        start_stage(stage)
    (tmp_path / "run" / "round_0" / "teacher" / "final.json").write_text("{}")
    _, report, _ = preflight(as_config(base))  # the same inputs: resumed
    assert (
        "round_0/teacher: reuse (same inputs)" in report.found
        and "round_1/labels: resume (same inputs)" in report.found
    )
    message = refused({**base, "teacher": {**base["teacher"], "epochs": 3}}, OutputMismatch)
    assert "round_0/teacher: settings.epochs: 1 -> 3" in message and "round_1/labels" in message
    assert "--overwrite" in message
    (tmp_path / "labeled" / "a" / "0.png").write_bytes(png_bytes(seed=99))  # one labeled image replaced
    message = refused(base, OutputMismatch)
    assert "labeled.sha256" in message
    preflight(as_config(base), overwrite=True)  # deletes the stale stages
    assert not (tmp_path / "run" / "round_0" / "teacher").exists()
    assert not (tmp_path / "run" / "round_1" / "labels").exists()
    _, report, _ = preflight(as_config(base))
    assert "round_0/teacher: run" in report.found


def test_a_stage_without_a_record_is_not_reused(tmp_path):
    labeled = folders(tmp_path / "labeled", {c: 2 for c in "ab"})
    base = config(tmp_path, labeled)
    teacher = tmp_path / "run" / "round_0" / "teacher"
    teacher.mkdir(parents=True)
    (teacher / "final.json").write_text(json.dumps({"epoch": 1}))  # written by an older version
    assert "no record of its inputs" in refused(base, OutputMismatch)


# --- errors a user meets: one message, no traceback --------------------------------------------------


def test_a_config_with_a_tab_is_one_message_naming_the_line(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("base: digits\nteacher:\n  epochs: 2\n\tlr: 0.1\n")
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}, line 4" in err and "tab" in err and "Traceback" not in err


def test_a_git_lfs_pointer_as_checkpoint_is_one_message(tmp_path, capsys):
    from labeler.cli import main as labeler_main

    pointer = tmp_path / "teacher.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 + "\nsize 4829\n")
    images = unlabeled(tmp_path / "images", 2)
    args = ["--input", images, "--checkpoint", str(pointer), "--output", str(tmp_path / "out")]
    assert labeler_main([*args, "--arch", "test_resnet", "--num-classes", "10"]) == 2
    err = capsys.readouterr().err
    assert "Git LFS pointer" in err and "git lfs pull" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_check_reports_every_split_and_what_would_be_reused(tmp_path, capsys):
    labeled = folders(tmp_path / "labeled", {c: 3 for c in "abc"})
    test = folders(tmp_path / "test", {c: 2 for c in "abc"}, seed=5)
    args = ["check", "digits", f"run_dir={tmp_path / 'run'}", f"data.labeled={labeled}", f"data.test={test}",
            f"data.unlabeled={unlabeled(tmp_path / 'unlabeled', 4)}"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "data.labeled" in out and "9 images in 3 classes" in out and "data.test" in out
    assert "data.unlabeled" in out and "4 images" in out and "round_0/teacher: run" in out
    (tmp_path / "labeled" / "c" / "0.png").unlink()
    (tmp_path / "labeled" / "c" / "1.png").unlink()
    (tmp_path / "labeled" / "c" / "2.png").unlink()
    assert main(args) == 2
    assert "'c'" in capsys.readouterr().out


# --- review: the kinds of fault around reuse and checks ----------------------------------------------


def test_a_carved_split_belongs_to_the_teacher_and_is_made_again_with_it(tmp_path):
    labeled = folders(tmp_path / "labeled", {c: 4 for c in "ab"})
    base = {**config(tmp_path, labeled, val_fraction=0.5), "iterations": 0}
    paths, _, stages = preflight(as_config(base))
    start_stage(stages[0])
    from pipeline.loop import prepare_data

    prepare_data(as_config(base), paths)  # the carve
    assert (tmp_path / "run" / "splits" / "split.json").exists()
    (tmp_path / "labeled" / "a" / "9.png").write_bytes(png_bytes(seed=77))  # a labeled image added
    assert "round_0/teacher: labeled" in refused(base, OutputMismatch)
    preflight(as_config(base), overwrite=True)
    assert not (tmp_path / "run" / "splits").exists()  # carved again from the set as it is now


def test_a_higher_threshold_keeps_the_labels_and_a_lower_one_explains_why_not(tmp_path):
    labeled = folders(tmp_path / "labeled", {c: 2 for c in "ab"})
    base = config(tmp_path, labeled)
    _, _, stages = preflight(as_config(base))
    for stage in stages[:3]:
        start_stage(stage)
    (tmp_path / "run" / "round_0" / "teacher" / "final.json").write_text("{}")
    (tmp_path / "run" / "round_1" / "labels" / "manifest.json").write_text("{}")
    _, report, _ = preflight(as_config({**base, "balance": {"threshold": 0.5}}))
    assert "round_1/labels: reuse (same inputs)" in report.found
    start_stage(stages[3])  # round 1 balanced at 0.3, finished: a higher threshold remakes it, keeps the labels
    (tmp_path / "run" / "round_1" / "balance_stats.json").write_text("{}")
    higher = {**base, "balance": {"threshold": 0.5}}
    message = refused(higher, OutputMismatch)
    assert "round_1/balanced: balance.threshold: 0.3 -> 0.5" in message and "round_1/labels:" not in message
    preflight(as_config(higher), overwrite=True)
    assert (tmp_path / "run" / "round_1" / "labels" / "manifest.json").exists()
    assert not (tmp_path / "run" / "round_1" / "balance_stats.json").exists()
    message = refused({**base, "balance": {"threshold": 0.1}}, OutputMismatch)
    assert "round_1/labels: balance.threshold 0.1 is below 0.3" in message and "image bytes" in message


def test_a_parquet_evaluation_set_without_images_is_refused_before_training(tmp_path):
    labeled = folders(tmp_path / "labeled", {c: 2 for c in DIGITS[:3]})
    pd.DataFrame({"img": [png_bytes(seed=i) for i in range(3)], "label": [0, 1, 2]}).to_parquet(tmp_path / "t.parquet")
    message = refused(config(tmp_path, labeled, str(tmp_path / "t.parquet")))
    assert "data.test" in message and "neither an image column" in message and "img (" not in message


def test_labels_that_are_ids_are_refused_quickly(tmp_path):
    path = labeled_parquet(tmp_path / "ids.parquet", [10**9 + i for i in range(4)])
    with pytest.raises(ValueError, match="is data.label_column the label column"):
        read_class_set(path)
    with pytest.raises(ValueError, match="not a class index"):
        label_names(pa.array([1.0, float("inf")]), "x")


def test_a_supplied_state_dict_with_another_class_count_is_refused_before_ray(tmp_path):
    path = tmp_path / "teacher.pth"
    torch.save(numeric_head_model().state_dict(), path)  # 12 outputs
    labeled = folders(tmp_path / "labeled", {c: 1 for c in DIGITS})  # 10 classes
    cfg = {**config(tmp_path, labeled), "teacher": {"arch": "test_resnet", "checkpoint": str(path)}}
    message = refused(cfg)
    assert "classifier for 12 classes" in message and "teacher.reset_classifier" in message


def test_a_failed_first_labeling_job_does_not_block_the_corrected_one(tmp_path):
    from labeler.api import prepare_output

    out = str(tmp_path / "out")
    assert prepare_output(out, {"settings": {"image_column": "image"}}) is False  # then the job failed
    assert prepare_output(out, {"settings": {"image_column": "img"}}) is False  # nothing written: a fresh start
    (tmp_path / "out" / "predictions").mkdir()
    with pytest.raises(OutputMismatch, match="image_column: img -> image"):
        prepare_output(out, {"settings": {"image_column": "image"}})


def test_locations_are_recorded_in_one_spelling(tmp_path):
    from labeler.api import LabelOptions, labeling_record
    from tests.helpers import random_checkpoint

    random_checkpoint(str(tmp_path / "ckpt"))
    images = unlabeled(tmp_path / "images", 2)
    options = LabelOptions()
    assert labeling_record(images + "/", str(tmp_path / "ckpt"), options) == labeling_record(
        images, str(tmp_path / "ckpt") + "/", options
    )


def test_the_labeler_checks_a_bare_state_dicts_head_before_ray(tmp_path, capsys):
    from labeler.cli import main as labeler_main

    path = tmp_path / "teacher.pth"
    torch.save(numeric_head_model().state_dict(), path)  # 12 outputs
    args = ["--input", unlabeled(tmp_path / "images", 2), "--checkpoint", str(path), "--output", str(tmp_path / "o")]
    assert labeler_main([*args, "--arch", "test_resnet", "--num-classes", "10"]) == 2
    err = capsys.readouterr().err
    assert "classifier for 12 classes, not 10" in err and "--num-classes 12" in err and "Traceback" not in err
