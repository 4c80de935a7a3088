"""The validation split and model selection.

Checkpoints are selected on a validation split (``data.val``, or ``data.val_fraction`` carved per
class from the labeled set, or the digits corpus's ``val/``); the exported model is the best
checkpoint by ``select_metric``, not the last; a student worse than its teacher on validation is
flagged in the summary table and the report.
"""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from core.model import WEIGHTS_FILE, ModelSpec, load_checkpoint
from pipeline.config import as_config
from pipeline.digits import write_digits_corpus
from pipeline.loop import format_table, prepare_data
from pipeline.model_eval import mark_worse_than_teacher
from pipeline.report import curves_figure, render_report
from pipeline.split import carve_indices, carve_validation
from tests.helpers import png_bytes
from trainer.data import LabeledBatches, labeled_classes, load_labeled
from trainer.evaluate import evaluate
from trainer.loop import epoch_plan
from trainer.settings import TrainSettings

PER_CLASS = {"ant": 2, "bee": 5, "cat": 10, "dog": 1}


def _folders(root) -> list[str]:
    """Class folders with PER_CLASS images each; returns every image path."""
    paths = []
    for c, n in PER_CLASS.items():
        os.makedirs(root / c)
        for i in range(n):
            path = root / c / f"{c}_{i}.png"
            path.write_bytes(png_bytes(seed=len(paths)))
            paths.append(str(path))
    return paths


def _manifest(root: str) -> list[tuple[str, str]]:
    table = pq.read_table(os.path.join(root, "manifest.parquet"))
    return list(zip(table.column("path").to_pylist(), table.column("label").to_pylist()))


def test_carving_is_per_class_deterministic_and_disjoint(tmp_path):
    files = _folders(tmp_path / "labeled")
    labeled = str(tmp_path / "labeled")
    roots = carve_validation(labeled, 0.3, seed=7, out_dir=str(tmp_path / "a"))
    train, val = _manifest(roots["labeled"]), _manifest(roots["val"])
    assert sorted(p for p, _ in train + val) == sorted(files) and not {p for p, _ in train} & {p for p, _ in val}
    per_class = {c: sum(1 for _, lab in val if lab == c) for c in PER_CLASS}
    # round(n x 0.3), at least 1, and never a class's last training image
    assert per_class == {"ant": 1, "bee": 2, "cat": 3, "dog": 0}
    assert all(os.path.basename(os.path.dirname(p)) == lab for p, lab in train + val)
    again = carve_validation(labeled, 0.3, seed=7, out_dir=str(tmp_path / "b"))
    assert _manifest(again["val"]) == val and _manifest(again["labeled"]) == train
    other = carve_validation(labeled, 0.3, seed=8, out_dir=str(tmp_path / "c"))
    assert _manifest(other["val"]) != val
    # the carved images are not trained on: the training reader sees exactly the train manifest
    data = load_labeled(roots["labeled"], sorted(PER_CLASS), 8)
    assert sorted(data.ids) == sorted(p for p, _ in train)
    assert [sorted(PER_CLASS)[k] for k in data.targets.argmax(1)] == [lab for _, lab in train]
    streamed = LabeledBatches(roots["val"], sorted(PER_CLASS), 8, batch=4)
    assert sum(len(labels) for _, labels in streamed) == len(val)
    # resumable: the same call returns the written split; other settings are refused
    assert carve_validation(labeled, 0.3, seed=7, out_dir=str(tmp_path / "a")) == roots
    with pytest.raises(FileExistsError, match="remove it"):
        carve_validation(labeled, 0.5, seed=7, out_dir=str(tmp_path / "a"))


def test_carve_indices_draw_each_class_from_its_own_stream():
    labels = ["a"] * 20 + ["b"] * 20
    both = carve_indices(labels, 0.25, seed=0)
    alone = carve_indices(["b"] * 20, 0.25, seed=0)
    assert len(both) == 10 and both[:5].max() < 20 <= both[5:].min()
    assert np.array_equal(both[5:] - 20, alone)  # class b's split does not depend on class a
    assert not np.array_equal(carve_indices(labels, 0.25, seed=1), both)
    with pytest.raises(ValueError, match="between 0 and 1"):
        carve_indices(labels, 1.0, seed=0)


def test_parquet_labeled_sets_are_carved_with_their_bytes(tmp_path):
    import pyarrow as pa

    images = [png_bytes(seed=i) for i in range(8)]
    (tmp_path / "lab").mkdir()
    pq.write_table(pa.table({"image": images, "label": [0, 1] * 4}), tmp_path / "lab" / "a.parquet")
    roots = carve_validation(str(tmp_path / "lab"), 0.25, seed=0, out_dir=str(tmp_path / "splits"))
    val = pq.read_table(os.path.join(roots["val"], "manifest.parquet"))
    assert val.num_rows == 2 and sorted(val.column("label").to_pylist()) == ["0", "1"]
    assert set(val.column("image").to_pylist()) <= set(images)
    assert len(load_labeled(roots["labeled"], ["0", "1"], 8)) == 6


def test_prepare_data_chooses_the_validation_split(tmp_path):
    base = {"labeled": None, "unlabeled": None, "test": None, "root": str(tmp_path / "digits"),
            "labels_per_class": 5, "test_fraction": 0.3, "val_per_class": 2}  # fmt: skip
    cfg = {"seed": 0, "run_dir": str(tmp_path / "run"), "data": base}
    digits = prepare_data(as_config(cfg))  # the digits corpus's own val/: 2 per class, from the unlabeled pool
    assert digits.val.endswith("val") and len(load_labeled(digits.val, [str(i) for i in range(10)], 8)) == 20
    assert json.loads((tmp_path / "digits" / "corpus.json").read_text())["counts"]["val"] == 20
    folders = _folders(tmp_path / "given_val")
    given = prepare_data(
        as_config({**cfg, "data": {**base, "val": str(tmp_path / "given_val"), "root": str(tmp_path / "d2")}})
    )
    assert given.val == str(tmp_path / "given_val")  # data.val, class folders, as given
    assert len(LabeledBatches(given.val, sorted(PER_CLASS), 8).__iter__().__next__()[1]) == len(folders)
    carved = prepare_data(as_config({**cfg, "data": {**base, "val_fraction": 0.4, "root": str(tmp_path / "d3")}}))
    assert carved.val == str(tmp_path / "run" / "splits" / "val")  # 2 of each class's 5 labels
    assert carved.classes_from.endswith("labeled") and labeled_classes(carved.labeled) == list("0123456789")
    assert len(load_labeled(carved.labeled, list("0123456789"), 8)) == 30


def test_every_checkpoint_of_a_best_export_is_validated():
    s = TrainSettings(epochs=10, eval_every=4, checkpoint_every=3)
    plan = [epoch_plan(e, s, has_val=True) for e in range(10)]
    evaluated = [e + 1 for e, (_, ev, _) in enumerate(plan) if ev]
    saved = [e + 1 for e, (_, _, ck) in enumerate(plan) if ck]
    assert evaluated == saved == [3, 4, 6, 8, 9, 10]
    last = TrainSettings(epochs=10, eval_every=4, checkpoint_every=3, export="last")
    plan = [epoch_plan(e, last, has_val=True) for e in range(10)]
    assert [e + 1 for e, (_, ev, _) in enumerate(plan) if ev] == [4, 8, 10]
    assert [e + 1 for e, (_, _, ck) in enumerate(plan) if ck] == [3, 6, 9, 10]
    assert not any(ev for _, ev, _ in (epoch_plan(e, s, has_val=False) for e in range(10)))
    with pytest.raises(ValueError, match="never selected on the test split"):
        TrainSettings(select_metric="test_top1").validate()


@pytest.mark.timeout(600)
def test_the_best_validation_checkpoint_is_exported_not_the_last(ray_local, tmp_path):
    """A learning rate that warms up into divergence: validation accuracy peaks mid-run and collapses
    by the last epoch, so the best and the last checkpoints differ."""
    from trainer.api import train_model

    paths = write_digits_corpus(str(tmp_path / "data"), labels_per_class=20, test_fraction=0.3, val_per_class=10)
    spec = ModelSpec("test_resnet", [str(i) for i in range(10)], 16, mean=(0.5,) * 3, std=(0.5,) * 3)
    settings = TrainSettings(
        epochs=6,
        steps_per_epoch=15,
        batch_size=32,
        num_workers=1,
        cpus_per_worker=1,
        warmup_epochs=6,
        lr=3.0,
        randaugment_ops=0,
        drop_rate=0,
        drop_path_rate=0,
        weight_decay=0,
        eval_every=1,
        checkpoint_every=100,
        seed=0,
    )  # fmt: skip  (checkpoint_every=100: only validation makes checkpoints here)
    storage, out = str(tmp_path / "storage"), str(tmp_path / "model")
    final = train_model(settings, spec, paths["labeled"], out, storage, "diverging", val=paths["val"], progress=False)
    history = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    scores = [h["val_top1"] for h in history]
    best = max(scores)
    assert scores[-1] < best - 0.2, f"the run was meant to diverge at the end: {scores}"
    assert final["exported_epoch"] < final["last_epoch"] == 6 and final["export"] == "best val_top1 (max)"
    assert final["val_top1"] == best == scores[final["exported_epoch"] - 1]
    # the exported weights are that epoch's checkpoint, byte for byte, and not the last one
    checkpoints = {}
    for d in (tmp_path / "storage" / "diverging").glob("checkpoint_*"):
        if not d.is_dir():  # checkpoint_manager_snapshot.json
            continue
        epoch = torch.load(d / "train_state.pt", weights_only=True)["epoch"]
        checkpoints[epoch] = (d / WEIGHTS_FILE).read_bytes()
    assert 6 in checkpoints and final["exported_epoch"] in checkpoints  # kept: the best and the resume point
    exported = (tmp_path / "model" / WEIGHTS_FILE).read_bytes()
    assert exported == checkpoints[final["exported_epoch"]] and exported != checkpoints[6]
    # and they score the recorded metric on the validation split
    model, spec = load_checkpoint(out)
    again = evaluate(model, LabeledBatches(paths["val"], spec.classes, spec.image_size), spec, "cpu")
    assert again["test_top1"] == pytest.approx(final["val_top1"])
    assert set(load_file(os.path.join(out, WEIGHTS_FILE))) == set(model.state_dict())


def test_last_is_exported_on_request_and_without_validation(ray_local, tmp_path):
    from trainer.api import train_model

    paths = write_digits_corpus(str(tmp_path / "data"), labels_per_class=4, test_fraction=0.3, val_per_class=2)
    spec = ModelSpec("test_resnet", [str(i) for i in range(10)], 16, mean=(0.5,) * 3, std=(0.5,) * 3)
    kw = {"epochs": 2, "steps_per_epoch": 2, "batch_size": 8, "num_workers": 1, "randaugment_ops": 0}
    last = train_model(TrainSettings(export="last", **kw), spec, paths["labeled"], str(tmp_path / "m1"),
                       str(tmp_path / "s"), "last", val=paths["val"], progress=False)  # fmt: skip
    assert last["exported_epoch"] == 2 and last["export"] == "last" and "val_top1" in last
    none = train_model(TrainSettings(**kw), spec, paths["labeled"], str(tmp_path / "m2"), str(tmp_path / "s"),
                       "noval", progress=False)  # fmt: skip
    assert none["exported_epoch"] == 2 and none["export"] == "last" and "val_top1" not in none


def _summary() -> list[dict]:
    row = {"pseudo_rows": 0, "test_top1": 0.9, "test_top5": 1.0}
    return [
        {**row, "iteration": 0, "role": "teacher", "model": "test_resnet", "val_top1": 0.90},
        {**row, "iteration": 1, "role": "student", "model": "test_resnet", "val_top1": 0.92},
        {**row, "iteration": 2, "role": "student", "model": "resnet10t", "val_top1": 0.88},
    ]


def test_a_student_worse_than_its_teacher_is_flagged(tmp_path):
    summary = _summary()
    mark_worse_than_teacher(summary)
    assert [e.get("worse_than_teacher") for e in summary] == [None, False, True]
    table = format_table(summary)
    rows = table.splitlines()
    assert "vs_teacher" in rows[0] and rows[3].endswith("ok") and rows[4].endswith("WORSE")
    assert rows[-1].startswith("WARNING: the iteration 2 student (resnet10t) is worse than its teacher")
    assert "0.8800 < 0.9200" in rows[-1]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    page = render_report(str(tmp_path))
    assert "id='warnings'" in page and "iteration 2 student (resnet10t) is worse than its teacher" in page
    better = _summary()[:2]
    mark_worse_than_teacher(better)
    assert "WARNING" not in format_table(better)
    (tmp_path / "summary.json").write_text(json.dumps(better))
    assert "id='warnings'" not in render_report(str(tmp_path))


def test_a_validation_setting_does_not_invalidate_the_digits_corpus(tmp_path):
    """data.val_fraction after a plain run on the same data.root raised FileExistsError ("other settings")."""
    base = {"run_dir": str(tmp_path / "run"), "data": {"root": str(tmp_path / "digits"), "val_per_class": 2}}
    plain = prepare_data(as_config(base))
    carved = prepare_data(as_config({**base, "data": {**base["data"], "val_fraction": 0.4}}))
    assert plain.unlabeled == carved.unlabeled and carved.val.endswith(os.path.join("splits", "val"))


def test_a_validation_split_with_no_readable_image_stops_before_training(tmp_path):
    """Every epoch scored 0 on it, so a checkpoint was selected at random."""
    from trainer.api import train_model
    from trainer.data_check import TrainingDataError

    paths = write_digits_corpus(str(tmp_path / "digits"), labels_per_class=3, test_fraction=0.2, seed=0)
    for c in range(10):
        (tmp_path / "val" / str(c)).mkdir(parents=True)
        (tmp_path / "val" / str(c) / "broken.png").write_bytes(b"not a png")
    spec = ModelSpec("test_resnet", [str(i) for i in range(10)], 8)
    with pytest.raises(TrainingDataError, match="no image of the validation split"):
        train_model(TrainSettings(epochs=1, num_workers=1), spec, paths["labeled"], str(tmp_path / "out"),
                    str(tmp_path / "ray"), "bad_val", val=str(tmp_path / "val"), progress=False)  # fmt: skip


def test_equal_validation_scores_export_the_later_epoch():
    """Two epochs at val_top1 0.1727 exported the first (Ray's get_best_checkpoint takes the earliest)."""
    from types import SimpleNamespace

    from trainer.api import best_checkpoint

    kept = [("ck1", {"epoch": 1, "val_top1": 0.17}), ("ck2", {"epoch": 2, "val_top1": 0.17}),
            ("ck3", {"epoch": 3, "val_top1": 0.12}), ("ck4", {"epoch": 4})]  # fmt: skip
    assert best_checkpoint(SimpleNamespace(best_checkpoints=kept), "val_top1", "max") == "ck2"
    assert best_checkpoint(SimpleNamespace(best_checkpoints=kept), "val_top1", "min") == "ck3"
    assert best_checkpoint(SimpleNamespace(best_checkpoints=kept), "val_loss", "min") is None


def test_training_curves_mark_the_exported_models_test_top1():
    """The test split is evaluated once per finished model: the curves show it as one point at the export."""
    import matplotlib.pyplot as plt

    history = [{"epoch": e, "train_loss": 1.0 / e, "lr": 0.1, "val_top1": 0.5 + e / 100} for e in range(1, 6)]
    fig = curves_figure("m", history, exported_epoch=4, test_top1=0.9)
    points = [(list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[2].lines]
    plt.close(fig)
    assert ([4], [0.9]) in points and ([1, 2, 3, 4, 5], [0.51, 0.52, 0.53, 0.54, 0.55]) in points
    fig = curves_figure("m", history, exported_epoch=4)
    assert all(len(line.get_xdata()) != 1 or line.get_ydata()[0] != 0.9 for line in fig.axes[2].lines)
    plt.close(fig)
