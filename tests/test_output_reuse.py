"""The labeler reuses an --output only when the same inputs made it: the same corpus files (paths, sizes,
modification times), the same checkpoint bytes and the same row settings. Anything else stops the job
before it labels, saying what changed; --overwrite starts fresh."""

import os

import pyarrow.parquet as pq
import pytest

from core.fingerprint import OutputMismatch
from labeler.api import LabelOptions, run_labeling
from tests.helpers import png_bytes, random_checkpoint


def batch(root, seed: int) -> str:
    """Ten images named 000.png .. 009.png: the same names in every batch, other pixels per seed."""
    root.mkdir()
    for i in range(10):
        (root / f"{i:03d}.png").write_bytes(png_bytes((8 + seed % 3, 8), seed=seed * 100 + i))
    return str(root)


def predictions(out) -> dict:
    table = pq.read_table(out / "predictions", columns=["id", "label", "confidence"]).to_pydict()
    return {i: (lab, round(c, 5)) for i, lab, c in zip(table["id"], table["label"], table["confidence"])}


def test_an_output_is_reused_only_for_the_inputs_that_made_it(ray_local, tmp_path):
    first, second = batch(tmp_path / "batch_2024_01", 1), batch(tmp_path / "batch_2024_02", 2)
    ckpt, other = str(tmp_path / "ckpt"), str(tmp_path / "other")
    random_checkpoint(ckpt, seed=0)
    random_checkpoint(other, seed=1)
    out = tmp_path / "out"
    opts = LabelOptions(files_per_unit=4)
    assert run_labeling(first, ckpt, str(out), opts)["rows"] == 10
    again = run_labeling(first, ckpt, str(out), opts)  # the same inputs: reused as it is
    assert again["rows"] == 10 and again["units"] == 3
    with pytest.raises(OutputMismatch, match="source: .*batch_2024_01 -> .*batch_2024_02"):
        run_labeling(second, ckpt, str(out), opts)  # other images under the same names
    with pytest.raises(OutputMismatch, match="checkpoint_sha256"):
        run_labeling(first, other, str(out), opts)
    with pytest.raises(OutputMismatch, match="settings.temperature: 1.0 -> 2.0"):
        run_labeling(first, ckpt, str(out), LabelOptions(files_per_unit=4, temperature=2.0))
    # the same folder, one image rewritten in place: its unit is not the same input any more
    path = os.path.join(first, "005.png")
    with open(path, "wb") as f:
        f.write(png_bytes((11, 9), seed=555))
    (out / "manifest.json").unlink()
    with pytest.raises(OutputMismatch, match="u0000001"):
        run_labeling(first, ckpt, str(out), opts)
    # --overwrite: labeled afresh, exactly what a new output gets
    fresh = run_labeling(second, ckpt, str(out), opts, overwrite=True)
    assert fresh["rows"] == 10 and fresh["resumed_from"] == 0
    run_labeling(second, ckpt, str(tmp_path / "new"), opts)
    assert predictions(out) == predictions(tmp_path / "new")
