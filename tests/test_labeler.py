import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from labeler.api import LabelOptions, label_images, run_labeling
from labeler.model import ModelSpec, create_model, load_checkpoint
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
    from labeler.images import decode_image, normalize, resize_center_crop

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


def test_cli_reports_missing_arch(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"")
    res = subprocess.run(
        [sys.executable, "-m", "labeler", "--input", str(tmp_path), "--checkpoint", str(tmp_path / "w.safetensors"),
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


def test_interrupted_run_resumes_without_relabeling_or_duplicates(ray_local, tmp_path):
    """First run labels part of the corpus (T=1), a half-written file is left behind, then the
    full run (T=3) must add only the missing images: exact counts, the old rows untouched."""
    import shutil

    expected = write_bad_and_good_folder(str(tmp_path / "corpus"))
    part = tmp_path / "part"
    part.mkdir()
    for name in ("good_0.png", "good_1.png", "empty.png"):
        shutil.copy(tmp_path / "corpus" / name, part / name)
    random_checkpoint(str(tmp_path / "ckpt"))
    out = tmp_path / "out"
    run_labeling(str(part), str(tmp_path / "ckpt"), str(out), LabelOptions(temperature=1.0))
    (out / "predictions" / "zz_cut_off.parquet").write_bytes(b"PAR1 half a file")
    (out / "manifest.json").unlink()
    manifest = run_labeling(str(tmp_path / "corpus"), str(tmp_path / "ckpt"), str(out), LabelOptions(temperature=3.0))
    table = pq.read_table(out / "predictions").to_pandas()
    assert sorted(table["id"]) == sorted(expected) and manifest["rows"] == len(expected)
    assert manifest["resumed_from"] == 3 and not (out / "predictions" / "zz_cut_off.parquet").exists()
    sharp = {i: max(p) for i, p in zip(table["id"], table["probs"]) if p is not None}
    # the T=1 row from the first run is kept as it was (its top prob is the confidence); new rows are T=3
    assert table.set_index("id").loc["good_0.png", "confidence"] == pytest.approx(sharp["good_0.png"])
    assert table.set_index("id").loc["good_2.png", "confidence"] > sharp["good_2.png"]
    rejected = pq.read_table(out / "rejected.parquet").to_pydict()
    assert sorted(rejected["reject_reason"]) == ["empty", "not_an_image", "truncated"]


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
