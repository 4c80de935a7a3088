import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from labeler.api import LabelOptions
from labeler.sources import detect_format, read_source
from tests.helpers import png_bytes


def _rows(ds):
    return {r["id"]: bytes(r["bytes"]) for r in ds.take_all()}


def test_parquet_with_and_without_id_column(ray_local, tmp_path):
    imgs = [png_bytes(seed=i) for i in range(5)] + [b"broken"]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(6)], "image": imgs}), tmp_path / "pq" / "a.parquet")
    assert detect_format(str(tmp_path / "pq")) == "parquet"
    rows = _rows(read_source(str(tmp_path / "pq"), LabelOptions(id_column="key", image_column="image")))
    assert rows == {f"k{i}": imgs[i] for i in range(6)}
    no_id = _rows(read_source(str(tmp_path / "pq")))
    assert no_id == {f"a.parquet#{i}": imgs[i] for i in range(6)}  # the row's position in its file
    assert no_id == _rows(read_source(str(tmp_path / "pq")))  # stable across runs


def test_parquet_struct_image_column(ray_local, tmp_path):
    img = png_bytes()
    col = pa.array([{"bytes": img, "path": "x.png"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": col}), tmp_path / "hf.parquet")
    assert list(_rows(read_source(str(tmp_path / "hf.parquet"), LabelOptions(format="parquet"))).values()) == [img]


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


def test_folder_units_keep_order_and_a_vanished_file_is_an_unreadable_row(ray_local, tmp_path):
    """Files listed and then deleted (or otherwise unreadable) must not fail the job: the read
    gives a row with ``read_error`` and decoding rejects it as ``unreadable``; each unit's read
    task records its row count."""
    import json

    import pyarrow.fs as pafs

    from core.images import decode_batch
    from labeler.file_reader import read_files
    from labeler.units import UnitsDatasource, make_units

    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    names = ["a.png", "sub/b.png", "gone.png", "c.png"]
    for i, name in enumerate(names):
        (root / name).write_bytes(png_bytes(seed=i))
    paths = [str(root / n) for n in names]
    (root / "gone.png").unlink()
    units = make_units(paths, 3)
    assert [(u.key, len(u.paths)) for u in units] == [("u0000000", 3), ("u0000001", 1)]
    source = UnitsDatasource(pafs.LocalFileSystem(), str(root), units, read_files, str(tmp_path / "log"))
    ds = ray.data.read_datasource(source, override_num_blocks=2)
    kwargs = {"image_size": 8, "crop_pct": 1.0, "in_chans": 3, "max_pixels": 10**6}
    rows = ds.map_batches(decode_batch, batch_format="numpy", fn_kwargs=kwargs).take_all()
    expected = {"a.png": "", "sub/b.png": "", "gone.png": "unreadable", "c.png": ""}
    assert {r["id"]: r["reject_reason"] for r in rows} == expected
    assert {r["id"]: r["unit"] for r in rows}["c.png"] == "u0000001"
    record = json.loads((tmp_path / "log" / "u0000000.json").read_text())
    assert record == {"rows": 3, "input": f"{paths[0]} .. {paths[2]} (3 files)"}


def test_a_read_task_splits_large_reads_into_blocks_in_file_order(tmp_path):
    import pyarrow.fs as pafs

    from labeler.file_reader import read_files

    paths = []
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(b"x" * 100)
        paths.append(str(tmp_path / f"{i}.png"))
    blocks = list(read_files(pafs.LocalFileSystem(), str(tmp_path), paths, max_block_bytes=250))
    assert [b.num_rows for b in blocks] == [3, 2]
    assert [i for b in blocks for i in b.column("id").to_pylist()] == [f"{i}.png" for i in range(5)]


def test_manifest_inputs_text_and_parquet_local_and_s3(ray_local, s3, tmp_path):
    """A manifest lists URIs (relative to it, absolute, s3://); units cut it without the driver
    holding the URIs; a listed file that is missing is an unreadable row, never a failed job."""
    from labeler.api import run_labeling
    from labeler.manifest import text_units
    from tests.helpers import random_checkpoint

    s3.client().create_bucket(Bucket="manifests")
    s3.client().put_object(Bucket="manifests", Key="imgs/remote.png", Body=png_bytes(seed=7))
    (tmp_path / "imgs").mkdir()
    for i in range(5):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(png_bytes(seed=i))
    entries = ["imgs/0.png", str(tmp_path / "imgs" / "1.png"), "imgs/2.png", "imgs/missing.png",
               "s3://manifests/imgs/remote.png", "imgs/3.png", "imgs/4.png"]  # fmt: skip
    text = "# one URI per line\n" + "\n".join(entries[:4]) + "\n\n" + "\n".join(entries[4:])  # no final newline
    (tmp_path / "list.txt").write_text(text)
    import pyarrow.fs as pafs

    units = text_units(pafs.LocalFileSystem(), str(tmp_path / "list.txt"), 3)
    assert [u.key for u in units] == ["u0000000", "u0000001", "u0000002"]
    rows = {r["id"]: r for r in read_source(str(tmp_path / "list.txt"), LabelOptions(files_per_unit=3)).take_all()}
    assert sorted(rows) == sorted(entries)
    assert bytes(rows["s3://manifests/imgs/remote.png"]["bytes"]) == png_bytes(seed=7)
    assert rows["imgs/missing.png"]["read_error"].startswith("unreadable")
    table = pa.table({"uri": entries, "other": list(range(7))})
    pq.write_table(table, tmp_path / "list.parquet", row_group_size=2)  # ranges cross row groups
    random_checkpoint(str(tmp_path / "ckpt"))
    opts = LabelOptions(format="manifest", files_per_unit=3)
    manifest = run_labeling(str(tmp_path / "list.parquet"), str(tmp_path / "ckpt"), str(tmp_path / "out"), opts)
    labeled = pq.read_table(tmp_path / "out" / "predictions").to_pydict()
    assert sorted(labeled["id"]) == sorted(entries) and manifest["units"] == 3
    assert manifest["rows"] == 7 and manifest["reject_reasons"] == {"unreadable": 1}
