"""Faults of input kinds where images used to vanish or take a worker down (every input image is one
row: rows in = predictions + rejections, or a clear error before the job).

Parquet: the image (and id) column checked in every file's footer before the job; ids by row position;
a file damaged part-way is still a row per row. WebDataset: compressed shards (``.tar.gz`` and kin)
detected and read, other files counted or refused, a cut gzip shard a ``damaged_shard`` row. Images:
one whose resize would be huge is ``too_large`` from its header, and running out of memory is one
rejection. All but one test run without Ray, on inputs built here.
"""

import io
import json
import logging
import subprocess
import sys
import tarfile
import textwrap
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.images import RejectedImage, decode_batch, decode_image
from labeler.sources import detect_format, plan_units
from tests.helpers import png_bytes

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # Hugging Face's Image feature


def _rows(fs_root: str, plan) -> list[dict]:
    """Every row the plan's read tasks give, in unit order (what the labeling job would read)."""
    _, units, reader = plan
    fs = pafs.LocalFileSystem()
    return [r for u in units for t in reader(fs, fs_root, list(u.paths)) for r in t.to_pylist()]


def _decoded(rows: list[dict]) -> list[str]:
    """The reject reason of each row after the decode stage ("" when it decoded)."""
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in ("id", "path", "bytes", "read_error")}
    return list(decode_batch(batch, image_size=8, crop_pct=1.0, in_chans=3, max_pixels=10**6)["reject_reason"])


def _cifar_like(path, n: int = 6, column: str = "img", images=None) -> list:
    """A Parquet file laid out as Hugging Face's cifar10: ``img`` (struct with bytes) and ``label``."""
    images = images if images is not None else [png_bytes(seed=i) for i in range(n)]
    col = pa.array([None if b is None else {"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)], HF_IMAGE)
    pq.write_table(pa.table({column: col, "label": list(range(len(images)))}), path)
    return images


@contextmanager
def _warnings_of(logger_name: str):
    """Warnings logged by ``logger_name``, whatever handlers the console set-up left on its parents."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    log = logging.getLogger(logger_name)
    log.addHandler(handler)
    try:
        yield records
    finally:
        log.removeHandler(handler)


# --- Parquet: columns, ids, damage ------------------------------------------------------------------


def test_a_parquet_file_without_the_image_column_is_refused_before_the_job(tmp_path):
    """cifar10's layout (image column ``img``): was one ``unreadable`` row for 6 images; now an error
    naming the file, the missing column, the columns there are and the option that selects one."""
    (tmp_path / "pq").mkdir()
    images = _cifar_like(tmp_path / "pq" / "train.parquet")
    with pytest.raises(ValueError) as err:
        plan_units(str(tmp_path / "pq"))
    message = str(err.value)
    for part in ("train.parquet", "no image column 'image'", "img (struct<bytes: binary", "label (int64)"):
        assert part in message
    assert "--image-column" in message and "label.image_column" in message
    plan = plan_units(str(tmp_path / "pq"), image_column="img")
    rows = _rows(str(tmp_path / "pq"), plan)
    assert [r["bytes"] for r in rows] == images and _decoded(rows) == [""] * 6


def test_every_parquet_file_is_checked_with_the_id_column_and_the_column_type(tmp_path):
    root = tmp_path / "pq"
    root.mkdir()
    for name in ("a", "b"):
        pq.write_table(pa.table({"image": [png_bytes()], "key": ["k"]}), root / f"{name}.parquet")
    pq.write_table(pa.table({"image": [png_bytes()]}), root / "c.parquet")  # the last file lacks the id column
    plan_units(str(root))  # no id column asked for: all three are fine
    with pytest.raises(ValueError) as err:
        plan_units(str(root), id_column="key")
    assert "c.parquet has no id column 'key'" in str(err.value) and "image (binary)" in str(err.value)
    assert "--id-column" in str(err.value) and "label.id_column" in str(err.value)
    with pytest.raises(ValueError, match=r"a.parquet has an image column 'key' of type string") as err:
        plan_units(str(root), image_column="key")
    assert "2 more of the 3 Parquet files" in str(err.value)  # c.parquet has no column 'key' at all
    pq.write_table(pa.table({"image": pa.array([png_bytes()], pa.large_binary())}), root / "b.parquet")
    assert len(plan_units(str(root))[1]) == 3  # large_binary is image bytes too


def test_parquet_schemas_on_s3_are_checked_from_their_footers(s3):
    """Thousands of files on S3: footers are read by a thread pool; the error names the s3:// URI."""
    client = s3.client()
    client.create_bucket(Bucket="pqcheck")
    for i in range(6):
        buf = io.BytesIO()
        pq.write_table(pa.table({"image" if i != 4 else "img": [png_bytes(seed=i)]}), buf)
        client.put_object(Bucket="pqcheck", Key=f"corpus/part-{i}.parquet", Body=buf.getvalue())
    with pytest.raises(ValueError, match=r"s3://pqcheck/corpus/part-4.parquet has no image column 'image'"):
        plan_units("s3://pqcheck/corpus")
    client.delete_object(Bucket="pqcheck", Key="corpus/part-4.parquet")
    assert len(plan_units("s3://pqcheck/corpus")[1]) == 5


def test_parquet_rows_without_an_id_column_have_distinct_stable_ids(tmp_path):
    """Two null images and the same image twice: a content hash gave them one id each pair; the
    row's position in its file gives every row its own, the same on every run."""
    (tmp_path / "pq").mkdir()
    same = png_bytes(seed=3)
    _cifar_like(tmp_path / "pq" / "hf.parquet", images=[None, same, None, same, png_bytes(seed=4)])
    plan = plan_units(str(tmp_path / "pq"), image_column="img")
    rows = _rows(str(tmp_path / "pq"), plan)
    assert [r["id"] for r in rows] == [f"hf.parquet#{i}" for i in range(5)]
    assert [r["bytes"] for r in rows] == [None, same, None, same, png_bytes(seed=4)]  # a null struct is no bytes
    assert _rows(str(tmp_path / "pq"), plan_units(str(tmp_path / "pq"), image_column="img")) == rows
    assert _decoded(rows) == ["empty", "", "empty", "", ""]
    ids = pa.array(["a", None, "a"])  # an id column with nulls: those rows fall back to their position
    pq.write_table(pa.table({"image": [same] * 3, "key": ids}), tmp_path / "pq" / "hf.parquet")
    keyed = _rows(str(tmp_path / "pq"), plan_units(str(tmp_path / "pq"), id_column="key"))
    assert [r["id"] for r in keyed] == ["a", "hf.parquet#1", "a"]


def _damaged_parquet(path, rows: int = 12, group: int = 4, bad_group: int = 1, column: str = "image") -> list:
    """A Parquet file whose row group ``bad_group`` has a corrupt page header (footer intact)."""
    data = [png_bytes(seed=i) for i in range(rows)]
    pq.write_table(pa.table({column: data}), path, row_group_size=group, use_dictionary=False)
    offset = pq.ParquetFile(path).metadata.row_group(bad_group).column(0).data_page_offset
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(raw))
    return data


def test_a_parquet_file_damaged_part_way_is_still_a_row_per_row(tmp_path):
    """Was: the rows before the damage, then ONE unreadable row for the rest of the file. Now every
    row the footer counts is a row: read, or ``unreadable`` with its own id; only a file without a
    readable footer is one row."""
    root = tmp_path / "pq"
    root.mkdir()
    data = _damaged_parquet(root / "a.parquet")
    (root / "b.parquet").write_bytes(b"PAR1 this is no Parquet file")  # no footer: one row
    rows = _rows(str(root), plan_units(str(root)))
    assert len(rows) == 13 and len({r["id"] for r in rows}) == 13
    assert [r["id"] for r in rows[:12]] == [f"a.parquet#{i}" for i in range(12)]
    assert [r["bytes"] for r in rows[:4]] == data[:4] and [r["bytes"] for r in rows[8:12]] == data[8:]
    assert all(r["read_error"].startswith("unreadable: a.parquet: rows 4..7 of 12") for r in rows[4:8])
    assert rows[12]["id"] == "b.parquet#unreadable"
    assert _decoded(rows) == [""] * 4 + ["unreadable"] * 4 + [""] * 4 + ["unreadable"]


def test_labeling_a_hugging_face_parquet_corpus_counts_every_row(ray_local, tmp_path):
    """Through the labeling job: null and repeated images, a file damaged part-way and a README; every
    row of every file is a prediction or a counted rejection, each with its own id."""
    from labeler.api import LabelOptions, run_labeling
    from tests.helpers import random_checkpoint

    root = tmp_path / "hf"
    root.mkdir()
    same = png_bytes(seed=5)
    _cifar_like(root / "train-0.parquet", images=[png_bytes(seed=1), None, same, same, None, png_bytes(seed=2)])
    _damaged_parquet(root / "train-1.parquet", column="img")  # binary, not a struct: both are image columns
    (root / "README.md").write_text("# a dataset card")
    random_checkpoint(str(tmp_path / "ckpt"))
    manifest = run_labeling(str(root), str(tmp_path / "ckpt"), str(tmp_path / "out"), LabelOptions(image_column="img"))
    ids = pq.read_table(tmp_path / "out" / "predictions", columns=["id"]).column("id").to_pylist()
    assert manifest["rows"] == len(ids) == len(set(ids)) == 18  # 6 + 12: rows in = rows out
    assert manifest["labeled"] == 12 and manifest["reject_reasons"] == {"empty": 2, "unreadable": 4}
    assert sorted(ids) == sorted(
        [f"train-0.parquet#{i}" for i in range(6)] + [f"train-1.parquet#{i}" for i in range(12)]
    )


# --- WebDataset: compressed shards, other files -----------------------------------------------------


def _shard(path, prefix: str, n: int = 5) -> dict:
    """A shard of ``n`` samples (png + cls), compressed as its name says; returns {id: image bytes}."""
    modes = {".tar": "w", ".tar.gz": "w:gz", ".tgz": "w:gz", ".tar.bz2": "w:bz2", ".tar.xz": "w:xz"}
    expected = {}
    with tarfile.open(path, next(m for s, m in modes.items() if path.name.lower().endswith(s))) as tar:
        for i in range(n):
            key = f"{prefix}{i:03d}"
            for name, data in ((f"{key}.png", png_bytes(seed=i)), (f"{key}.cls", b"1")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            expected[f"{path.name}/{key}"] = png_bytes(seed=i)
    return expected


def test_compressed_shards_are_detected_and_read(tmp_path):
    """Two .tar.gz shards were a folder corpus of 2 not_an_image rows; a .tar beside a .tar.gz lost the
    compressed shard's samples. Now every shard suffix tarfile reads is a shard."""
    gz = tmp_path / "gz"
    gz.mkdir()
    expected = _shard(gz / "train-0.tar.gz", "a") | _shard(gz / "train-1.tar.gz", "b")
    assert detect_format(str(gz)) == "webdataset"
    rows = _rows(str(gz), plan_units(str(gz)))
    assert {r["id"]: r["bytes"] for r in rows} == expected and len(rows) == 10
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    expected = {}
    for i, name in enumerate(["s0.tar", "s1.tar.gz", "s2.tgz", "s3.tar.bz2", "s4.tar.xz", "S5.TAR.GZ"]):
        expected |= _shard(mixed / name, f"k{i}_")
    plan = plan_units(str(mixed))
    assert plan[0] == "webdataset" and len(plan[1]) == 6
    rows = _rows(str(mixed), plan)
    assert {r["id"]: r["bytes"] for r in rows} == expected and len(rows) == 30
    assert _decoded(rows) == [""] * 30


def test_files_a_format_does_not_read_are_counted_or_refused(tmp_path):
    """Never a silent gap: other files beside the shards are skipped with a warning that counts them by
    extension; under format auto, images beside shards are refused (which is the corpus is a guess)."""
    root = tmp_path / "wds"
    root.mkdir()
    _shard(root / "s0.tar", "a")
    _shard(root / "s1.tar.gz", "b")
    for name in ("info.json", "stats.json", "README"):
        (root / name).write_text("{}")
    with _warnings_of("labeler.sources") as warned:
        plan = plan_units(str(root))
    assert len(plan[1]) == 2 and len(_rows(str(root), plan)) == 10
    assert [w.getMessage() for w in warned] == [
        f"labeler: input {root}: skipped 3 files that are not WebDataset shards: .json x2, (no extension) x1"
    ]
    (root / "cover.jpg").write_bytes(png_bytes())
    with pytest.raises(ValueError, match=r"also files that another format reads: \.jpg x1") as err:
        plan_units(str(root))
    assert "cover.jpg" in str(err.value) and "--format" in str(err.value) and "label.format" in str(err.value)
    with _warnings_of("labeler.sources") as warned:
        assert len(plan_units(str(root), "webdataset")[1]) == 2  # the user chose: the shards alone
    assert "skipped 4 files" in warned[0].getMessage() and ".jpg x1" in warned[0].getMessage()
    with pytest.raises(ValueError, match=r"holds no Parquet files \(\.parquet\); it holds \.json x2, .*\.tar\.gz x1"):
        plan_units(str(root), "parquet")


def test_a_gzip_shard_cut_at_a_member_boundary_is_a_damaged_row(tmp_path):
    """tarfile's stream mode reads a gzip stream that stops between two members as a shorter archive;
    the end of the compressed stream is checked, so the lost samples are a ``damaged_shard`` row."""
    from labeler.tar_reader import shard_rows

    _shard(tmp_path / "whole.tar", "s")
    raw = (tmp_path / "whole.tar").read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        third = [m for m in tar.getmembers() if m.name == "s003.png"][0].offset  # samples 0-2 before it
    gzip = zlib.compressobj(wbits=31)  # a gzip stream flushed at that byte and never finished: cut there
    (tmp_path / "cut.tar.gz").write_bytes(gzip.compress(raw[:third]) + gzip.flush(zlib.Z_SYNC_FLUSH))
    rows = list(shard_rows(pafs.LocalFileSystem(), str(tmp_path), str(tmp_path / "cut.tar.gz")))
    assert [r[0] for r in rows] == ["cut.tar.gz/s000", "cut.tar.gz/s001", "cut.tar.gz/s002", "cut.tar.gz#damaged"]
    assert rows[-1][3].startswith("damaged_shard: cut.tar.gz after s002: cut off")
    whole = zlib.compressobj(wbits=31)
    (tmp_path / "ok.tar.gz").write_bytes(whole.compress(raw) + whole.flush())
    assert len(list(shard_rows(pafs.LocalFileSystem(), str(tmp_path), str(tmp_path / "ok.tar.gz")))) == 5


# --- Images whose resize would be huge ----------------------------------------------------------------


def _strip(width: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, 1)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_thin_strip_is_too_large_from_its_header():
    """2,000,000 x 1 is 2 Mpx (under max_pixels) in a few KB, but resized to a shorter side of 256 it
    is 512,000,000 x 256: rejected before anything is decoded, saying what the resize would make."""
    data = _strip(2_000_000)
    assert len(data) < 10_000
    with pytest.raises(RejectedImage) as err:
        decode_image(data, scale_size=256)
    assert err.value.reason == "too_large"
    assert "would be 512000000x256 = 131,072,000,000 pixels" in str(err.value)
    assert decode_image(data).size == (2_000_000, 1)  # without a resize in view it is an image like others
    assert decode_image(_strip(500), scale_size=256).size == (500, 1)  # 128,000 x 256 is within the limit
    with pytest.raises(RejectedImage, match="would be 256000x256 = 65,536,000 pixels"):
        decode_image(_strip(1000), scale_size=256)  # over max_pixels, 64,000,000 (an aspect ratio over ~977)


def test_running_out_of_memory_while_resizing_is_one_rejection(monkeypatch):
    def no_memory(*args, **kwargs):
        raise MemoryError

    names = ["a.png", "b.png", "c.png"]
    batch = {
        "id": np.array(names, dtype=object),
        "path": np.array(names, dtype=object),
        "bytes": np.array([png_bytes(seed=i) for i in range(3)], dtype=object),
    }
    monkeypatch.setattr(Image.Image, "resize", no_memory)
    out = decode_batch(batch, image_size=8, crop_pct=1.0, in_chans=3, max_pixels=10**6)
    assert list(out["reject_reason"]) == ["too_large"] * 3


STRIP_SCRIPT = """
import io, json, resource, sys
limit = 4 << 30  # a 4 GB address space, as a worker under a memory limit has
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import numpy as np
import timm.data.transforms  # the resize imports it: count it before the baseline
from PIL import Image
from core.images import decode_batch
from tests.helpers import png_bytes

def strip(width):
    buf = io.BytesIO()
    Image.new("L", (width, 1)).save(buf, format="PNG")
    return buf.getvalue()

data = [png_bytes(seed=1), strip(2_000_000), strip(200_000), png_bytes((40, 30), "RGB")]
batch = {k: np.array(["a", "b", "c", "d"], dtype=object) for k in ("id", "path")}
batch["bytes"] = np.array(data, dtype=object)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = decode_batch(batch, image_size=224, crop_pct=0.875, in_chans=3, max_pixels=64_000_000)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024
print(json.dumps({"reasons": list(out["reject_reason"]), "grown_mb": grown}))
"""


def test_a_thin_strip_does_not_take_a_worker_down():
    """Under a 4 GB address-space limit, decoding a 2,000,000 x 1 PNG for a 224 px model raised
    MemoryError out of the decode step (a failed task; without the limit, the kernel's OOM killer).
    Now each strip is one ``too_large`` row among the others, and memory hardly grows."""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(STRIP_SCRIPT)], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["reasons"] == ["", "too_large", "too_large", ""]
    assert result["grown_mb"] < 100, result


def test_zstd_shards_are_refused_not_read_as_images(tmp_path):
    """A kind of shard Python's tarfile cannot open is named before the job, never one bad image per shard."""
    from labeler.sources import plan_units

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "000.tar.zst").write_bytes(b"(\xb5/\xfd" + b"\0" * 20)
    with pytest.raises(ValueError, match="zstd"):
        plan_units(str(tmp_path / "c"))
