import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from labeler.sources import detect_format, read_source
from tests.helpers import png_bytes


def _rows(ds):
    return {r["id"]: bytes(r["bytes"]) for r in ds.take_all()}


def test_parquet_with_and_without_id_column(ray_local, tmp_path):
    imgs = [png_bytes(seed=i) for i in range(5)] + [b"broken"]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(6)], "image": imgs}), tmp_path / "pq" / "a.parquet")
    assert detect_format(str(tmp_path / "pq")) == "parquet"
    rows = _rows(read_source(str(tmp_path / "pq"), id_column="key", image_column="image"))
    assert rows == {f"k{i}": imgs[i] for i in range(6)}
    no_id = _rows(read_source(str(tmp_path / "pq")))
    assert len(no_id) == 6 and all(k.startswith("a.parquet#") for k in no_id)
    assert no_id == _rows(read_source(str(tmp_path / "pq")))  # stable across runs


def test_parquet_struct_image_column(ray_local, tmp_path):
    img = png_bytes()
    col = pa.array([{"bytes": img, "path": "x.png"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": col}), tmp_path / "hf.parquet")
    assert list(_rows(read_source(str(tmp_path / "hf.parquet"), fmt="parquet")).values()) == [img]


def test_webdataset_shards(ray_local, tmp_path):
    (tmp_path / "wds").mkdir()
    expected = {}
    for shard in range(2):
        with tarfile.open(tmp_path / "wds" / f"shard-{shard}.tar", "w") as tar:
            for i in range(3):
                key = f"s{shard}_{i:03d}"
                for name, data in ((f"{key}.png", png_bytes(seed=i)), (f"{key}.cls", b"3")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                expected[f"shard-{shard}.tar/{key}"] = png_bytes(seed=i)
    assert detect_format(str(tmp_path / "wds")) == "webdataset"
    assert _rows(read_source(str(tmp_path / "wds"))) == expected


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_format(str(tmp_path / "nope"))
