import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from core.fingerprint import OutputMismatch
from core.model import ModelSpec, create_model, load_checkpoint
from labeler.api import LabelOptions, label_images, run_labeling
from tests.helpers import random_checkpoint, write_bad_and_good_folder


def test_every_file_is_a_prediction_or_a_rejection(ray_local, tmp_path):
    expected = write_bad_and_good_folder(str(tmp_path / "corpus"))
    random_checkpoint(str(tmp_path / "ckpt"))
    manifest = run_labeling(str(tmp_path / "corpus"), str(tmp_path / "ckpt"), str(tmp_path / "out"))
    table = pq.read_table(tmp_path / "out" / "predictions").to_pandas()
    table["reject_reason"] = table["reject_reason"].astype(object).where(table["reject_reason"].notna(), None)
    assert len(table) == len(expected) == manifest["rows"]
    got = dict(zip(table["id"], table["reject_reason"]))
    assert got == expected
    good = table[table["reject_reason"].isna()]
    assert (good["label"] >= 0).all() and (table[table["reject_reason"].notna()]["label"] == -1).all()
    probs = np.stack(good["probs"].to_numpy())
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs.max(axis=1), good["confidence"], rtol=1e-5)
    assert manifest["reject_reasons"] == {"empty": 1, "not_an_image": 1, "truncated": 1}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["labeled"] == manifest["labeled"]


def test_predictions_match_the_model_run_directly(ray_local, tmp_path):
    """The Ray path must give the same numbers as the checkpoint's model on the same pixels."""
    from core.images import decode_image, normalize, resize_center_crop

    write_bad_and_good_folder(str(tmp_path / "corpus"))
    random_checkpoint(str(tmp_path / "ckpt"))
    rows = label_images(str(tmp_path / "corpus"), str(tmp_path / "ckpt"), LabelOptions(temperature=2.0)).take_all()
    row = next(r for r in rows if r["id"] == "good_3.png")
    model, spec = load_checkpoint(str(tmp_path / "ckpt"))
    img = resize_center_crop(decode_image((tmp_path / "corpus" / "good_3.png").read_bytes()), spec.image_size)
    with torch.no_grad():
        logits = model(normalize(img[None], spec.mean, spec.std))[0]
    np.testing.assert_allclose(row["probs"], (logits / 2.0).softmax(-1).numpy(), rtol=1e-4, atol=1e-6)
    assert row["confidence"] == pytest.approx(logits.softmax(-1).max().item(), rel=1e-5)
    assert row["model_id"] == spec.model_id


def test_hard_labels_are_one_hot(ray_local, tmp_path):
    write_bad_and_good_folder(str(tmp_path / "corpus"))
    random_checkpoint(str(tmp_path / "ckpt"))
    rows = label_images(str(tmp_path / "corpus"), str(tmp_path / "ckpt"), LabelOptions(hard=True)).take_all()
    for r in rows:
        if r["reject_reason"] is None:
            assert sorted(r["probs"])[-1] == 1.0 and sum(r["probs"]) == 1.0 and np.argmax(r["probs"]) == r["label"]


def test_bare_state_dict_needs_and_uses_a_spec(tmp_path):
    spec = ModelSpec("test_resnet", ["a", "b"], 16)
    torch.save(create_model(spec).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="--arch"):
        load_checkpoint(str(tmp_path / "w.pth"))
    model, loaded = load_checkpoint(str(tmp_path / "w.pth"), spec)
    assert loaded.num_classes == 2 and not model.training
    with pytest.raises(ValueError, match="do not match"):
        load_checkpoint(str(tmp_path / "w.pth"), ModelSpec("test_resnet", ["a", "b", "c"], 16))


def test_bare_state_dict_may_be_nested_and_ddp_prefixed(tmp_path):
    """The labeler reads the same forms `teacher.checkpoint` accepts: module.-prefixed keys under a
    'model' or 'state_dict_ema' entry (a training script's checkpoint, not just model.state_dict())."""
    spec = ModelSpec("test_resnet", ["a", "b"], 16)
    model = create_model(spec).eval()
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "model": wrapped}, tmp_path / "ckpt.pth")
    loaded, _ = load_checkpoint(str(tmp_path / "ckpt.pth"), spec)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_cli_reports_missing_arch(tmp_path, suffix):
    """Every state-dict file the loader reads is one (a .bin used to be taken for a checkpoint folder)."""
    (tmp_path / f"w{suffix}").write_bytes(b"")
    res = subprocess.run(
        [sys.executable, "-m", "labeler", "--input", str(tmp_path), "--checkpoint", str(tmp_path / f"w{suffix}"),
         "--output", str(tmp_path / "o")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2 and "--arch" in res.stderr


def test_parquet_input_end_to_end(ray_local, tmp_path):
    import pyarrow as pa

    from tests.helpers import png_bytes

    (tmp_path / "pq").mkdir()
    imgs = [png_bytes(seed=i) for i in range(4)] + [b"", b"nope"]
    pq.write_table(pa.table({"uid": [f"u{i}" for i in range(6)], "jpeg": imgs}), tmp_path / "pq" / "x.parquet")
    random_checkpoint(str(tmp_path / "ckpt"))
    opts = LabelOptions(image_column="jpeg", id_column="uid")
    manifest = run_labeling(str(tmp_path / "pq"), str(tmp_path / "ckpt"), str(tmp_path / "out"), opts)
    assert manifest["rows"] == 6 and manifest["labeled"] == 4
    assert manifest["reject_reasons"] == {"empty": 1, "not_an_image": 1}
    ids = pq.read_table(tmp_path / "out" / "predictions", columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == [f"u{i}" for i in range(6)]


def test_interrupted_run_resumes_by_unit_without_relabeling_or_duplicates(ray_local, tmp_path):
    """A run (T=1) in units of 3 files, then the damage an interruption leaves: a unit whose rows
    were never written (its count file only), one whose count file was never written, one with a
    file cut off mid-write. The resumed run redoes exactly those units: exact counts, no duplicate,
    and the finished units' rows untouched. A resumption with other row settings (T=3) or another
    unit size is refused, not mixed in; --overwrite then starts fresh."""
    import shutil

    expected = write_bad_and_good_folder(str(tmp_path / "corpus"))  # 13 files: units u0..u4
    random_checkpoint(str(tmp_path / "ckpt"))
    out = tmp_path / "out"
    first = run_labeling(str(tmp_path / "corpus"), str(tmp_path / "ckpt"), str(out), LabelOptions(files_per_unit=3))
    assert first["units"] == 5 and first["rows"] == len(expected) == 13
    unit_dir = {u: out / "predictions" / f"unit=u000000{u}" for u in range(4)}
    shutil.rmtree(unit_dir[1])  # rows never written
    (out / "units" / "u0000002.json").unlink()  # the read task never finished
    cut = sorted(unit_dir[3].iterdir())[0]
    cut.write_bytes(cut.read_bytes()[:40])  # a file cut off mid-write
    (out / "manifest.json").unlink()
    kept = pq.read_table(unit_dir[0]).to_pandas().set_index("id")
    with pytest.raises(OutputMismatch, match="temperature"):  # T=3 rows would be mixed with T=1 ones
        run_labeling(
            str(tmp_path / "corpus"), str(tmp_path / "ckpt"), str(out), LabelOptions(temperature=3.0, files_per_unit=3)
        )
    manifest = run_labeling(str(tmp_path / "corpus"), str(tmp_path / "ckpt"), str(out), LabelOptions(files_per_unit=3))
    table = pq.read_table(out / "predictions").to_pandas()
    assert sorted(table["id"]) == sorted(expected) and manifest["rows"] == len(expected)  # each id exactly once
    assert manifest["resumed_from"] == 13 - 9 and manifest["units"] == 5  # units 1-3 redone
    again = table.set_index("id")
    assert len(kept) == 3
    for i in kept.index:  # unit 0 kept as it was (T=1: its top probability is the confidence)
        assert again.loc[i, "confidence"] == kept.loc[i, "confidence"] and again.loc[i, "unit"] == "u0000000"
    redone = again[again["unit"].isin(["u0000001", "u0000002", "u0000003"])].dropna(subset=["probs"])
    assert len(redone) >= 6
    assert all(abs(max(p) - c) < 1e-6 for p, c in zip(redone["probs"], redone["confidence"]))  # T=1 as before
    rejected = pq.read_table(out / "rejected.parquet").to_pydict()
    assert sorted(rejected["reject_reason"]) == ["empty", "not_an_image", "truncated"]
    # units of another size are other inputs: refused; with overwrite, all is redone, exactly once
    (out / "manifest.json").unlink()
    with pytest.raises(OutputMismatch, match="files_per_unit"):
        run_labeling(str(tmp_path / "corpus"), str(tmp_path / "ckpt"), str(out), LabelOptions(files_per_unit=5))
    again = run_labeling(
        str(tmp_path / "corpus"), str(tmp_path / "ckpt"), str(out), LabelOptions(files_per_unit=5), overwrite=True
    )
    ids = pq.read_table(out / "predictions").column("id").to_pylist()
    assert sorted(ids) == sorted(expected) and again["units"] == 3 and again["resumed_from"] == 0


def test_units_are_written_while_later_units_are_still_unread(ray_local, tmp_path):
    """Writing needs no CPU of its own, so units reach storage while later units are still being read,
    not at the end of the job: a job killed part-way keeps them. Before, the writer waited for a CPU
    until every unit had been read and decoded (here: the first file came with 40 of 40 units read;
    scale_run: none of 100 units was finished 60 s into a 1M-image job). 40 units of 4 incompressible
    128 px PNGs, decoded at 128 px."""
    import threading
    import time

    from PIL import Image

    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(160):
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(corpus / f"noise_{i:03d}.png")
    random_checkpoint(str(tmp_path / "ckpt"), image_size=128)
    out = tmp_path / "out"
    seen: list[tuple[int, int]] = []  # (unit records, predictions files) while the job runs
    running = True

    def watch() -> None:
        while running:
            units = len(list((out / "units").glob("*.json"))) if (out / "units").exists() else 0
            seen.append((units, len(list(out.glob("predictions/*/*.parquet")))))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        manifest = run_labeling(str(corpus), str(tmp_path / "ckpt"), str(out), LabelOptions(files_per_unit=4))
    finally:
        running = False
        watcher.join()
    assert manifest["rows"] == 160 and manifest["units"] == 40
    read_when_first_written = min(units for units, files in seen if files)
    assert read_when_first_written < 40, seen[-5:]


def test_an_object_store_limit_applies_to_the_labeling_job_only(ray_local, tmp_path):
    random_checkpoint(str(tmp_path / "ckpt"))
    write_bad_and_good_folder(str(tmp_path / "corpus"))
    limited = label_images(str(tmp_path / "corpus"), str(tmp_path / "ckpt"), LabelOptions(object_store_mb=512))
    default = label_images(str(tmp_path / "corpus"), str(tmp_path / "ckpt"))
    assert limited.context.execution_options.resource_limits.object_store_memory == 512 * 2**20
    for ctx in (default.context, ray.data.DataContext.get_current()):
        assert ctx.execution_options.resource_limits.object_store_memory == float("inf")
    with pytest.raises(ValueError, match="object_store_mb"):
        LabelOptions(object_store_mb=-1)


def test_topk_labels_keep_the_mass(ray_local, tmp_path):
    import pyarrow as pa

    from trainer.data import dense_targets

    write_bad_and_good_folder(str(tmp_path / "corpus"))
    random_checkpoint(str(tmp_path / "ckpt"))
    full = pa.Table.from_pylist(label_images(str(tmp_path / "corpus"), str(tmp_path / "ckpt")).take_all())
    rows = label_images(str(tmp_path / "corpus"), str(tmp_path / "ckpt"), LabelOptions(topk=3)).take_all()
    topk = pa.Table.from_pylist(rows)
    full, topk = full.sort_by("id"), topk.sort_by("id")
    assert "probs" not in topk.column_names
    good = [i for i, r in enumerate(topk.column("reject_reason").to_pylist()) if r is None]
    for i in good:
        c, v, rest = topk["topk_classes"][i].as_py(), topk["topk_probs"][i].as_py(), topk["rest_mass"][i].as_py()
        p = np.asarray(full["probs"][i].as_py())
        assert c == list(np.argsort(-p, kind="stable")[:3])
        np.testing.assert_allclose(v, p[c], rtol=2e-3)
        assert rest == pytest.approx(1 - p[c].sum(), abs=1e-5)
    dense = dense_targets(topk.take(good), 10)
    np.testing.assert_allclose(dense.sum(axis=1), 1.0, rtol=1e-5)
    assert (dense.argmax(axis=1) == np.asarray(topk.take(good)["label"])).all()


def test_one_gpu_probe_asks_for_whole_gpus_only():
    """The labeler's actors and the loop's evaluation task ask for a GPU by the same rule: a whole one
    must exist (a fractional GPU total once gave the actors num_gpus=1, which could never be placed)."""
    from labeler.api import gpus_per_task

    assert [gpus_per_task(r) for r in ({}, {"CPU": 2.0}, {"GPU": 0.5}, {"GPU": 1.0}, {"GPU": 8.0})] == [0, 0, 0, 1, 1]


def test_parameters_are_counted_without_building_weights(monkeypatch):
    """A spec's parameters are counted on the meta device: the same number as a real model's, no weights."""
    import core.model as model_module
    from core.model import count_parameters

    spec = ModelSpec("test_efficientnet", [str(i) for i in range(7)], 32)
    expected = sum(p.numel() for p in create_model(spec).parameters())
    built = []
    real_create = model_module.create_model
    monkeypatch.setattr(model_module, "create_model", lambda s: built.append(real_create(s)) or built[-1])
    assert count_parameters(spec) == expected
    assert {p.device.type for p in built[0].parameters()} == {"meta"}
