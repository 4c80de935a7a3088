"""Folder listings that stream (labeler.listing): same order, ids and rows as the in-memory listing,
units that are row ranges, S3 through the moto server, and resume when files are added mid-corpus."""

import inspect
import os

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from core.storage import filesystem_for, list_files
from labeler.file_reader import read_files
from labeler.listing import PATH_COLUMN, iter_files, listing_entries, read_listing_range, write_listing
from labeler.sources import detect_format, plan_units
from tests.helpers import png_bytes, random_checkpoint


def test_a_listing_of_20000_files_streams_in_sorted_order_into_row_ranges(tmp_path):
    root = tmp_path / "corpus"
    for d in range(20):
        (root / f"d{d:02d}").mkdir(parents=True)
        for i in range(1000):
            (root / f"d{d:02d}" / f"{i}").touch()  # empty files: the listing does not read them
    fs, path = filesystem_for(str(root))
    stream = iter_files(fs, path)
    assert inspect.isgenerator(stream)  # one path at a time, never a list of all
    listing = write_listing(path, stream, str(tmp_path / "out" / "listing.parquet"), files_per_unit=1000)
    expected = list_files(str(root))[1]
    assert listing.rows == len(expected) == 20_000
    written = pq.read_table(listing.uri).column(PATH_COLUMN).to_pylist()
    assert written == [p[len(path) + 1 :] for p in expected]  # relative to the root, in sorted order
    assert pq.ParquetFile(listing.uri).metadata.num_row_groups == 2  # row groups of ROW_GROUP = 16,384
    assert len(listing.units) == 20
    for k, unit in enumerate(listing.units):  # units hold a range of the listing, not paths
        assert unit.key == f"u{k:07d}" and unit.paths == (listing.uri,)
        assert (unit.start, unit.stop) == (1000 * k, 1000 * (k + 1)) and len(unit.fingerprint) == 16
    assert listing_entries(listing.uri, 19_990, 20_005) == written[19_990:]
    assert listing_entries(listing.uri, 16_000, 17_000) == written[16_000:17_000]  # across two row groups
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".tmp")]


def test_listed_rows_are_those_of_the_in_memory_listing(tmp_path):
    """Same ids, paths and bytes as reading the sorted list (the contract: id = path relative to the
    root), including a name that sorts between a folder and its files and a name that is not UTF-8."""
    root = tmp_path / "corpus"
    (root / "a" / "b").mkdir(parents=True)
    names = ["a/b/x.png", "a-c.png", "a/z.png", "b.png"]
    for i, name in enumerate(names):
        (root / name).write_bytes(png_bytes(seed=i))
    with open(os.path.join(str(root).encode(), b"caf\xe9.png"), "wb") as f:
        f.write(png_bytes(seed=9))
    (root / ".hidden.png").write_bytes(b"x")
    (root / ".cache").mkdir()
    (root / ".cache" / "y.png").write_bytes(b"x")
    os.symlink(root / "a", root / "a" / "b" / "loop")  # a link to an ancestor
    os.symlink(root / "a" / "b", root / "same")  # a second name for a folder listed already
    fs, path = filesystem_for(str(root))
    paths = list(iter_files(fs, path))
    # sorted whole paths; of two names for one folder the first in that order is listed (os.walk, in
    # list_files, keeps whichever the operating system returns first)
    assert [p[len(path) + 1 :] for p in paths] == ["a-c.png", "a/b/x.png", "a/z.png", "b.png", "caf\\xe9.png"]
    assert paths == sorted(paths)
    listing = write_listing(path, iter_files(fs, path), str(tmp_path / "listing.parquet"), files_per_unit=2)
    got = [t.to_pylist() for u in listing.units for t in read_listing_range(fs, path, u.start, u.stop, listing.uri)]
    want = [t.to_pylist() for t in read_files(fs, path, paths)]
    assert sum(got, []) == sum(want, []) and len(sum(got, [])) == 5
    assert all(r["read_error"] is None for r in sum(got, []))


def test_format_detection_and_plan_read_a_bounded_prefix(tmp_path, monkeypatch):
    import labeler.sources as sources

    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(30):
        (root / f"{i:02d}.png").touch()
    (root / "zz.parquet").touch()  # after the sniffed prefix: not seen by format: auto
    monkeypatch.setattr(sources, "SNIFF_FILES", 10)
    assert detect_format(str(root)) == "folder"
    fmt, units, _ = plan_units(str(root), files_per_unit=8, listing=str(tmp_path / "l.parquet"))
    assert fmt == "folder" and [(u.start, u.stop) for u in units] == [(0, 8), (8, 16), (16, 24), (24, 31)]
    assert pq.read_table(tmp_path / "l.parquet").num_rows == 31  # the prefix and the rest, each once


def test_s3_folder_listing_streams_keys_in_order(s3):
    client = s3.client()
    client.create_bucket(Bucket="listing")
    keys = [f"corpus/{c}/{i:03d}.png" for c in ("b", "a") for i in range(1500)]  # more than one page
    keys += ["corpus/.hidden/x.png", "corpus/a/.DS_Store", "corpus/marker/", "corpus2/other.png"]
    for key in keys:
        client.put_object(Bucket="listing", Key=key, Body=b"")
    fs, path = filesystem_for("s3://listing/corpus")
    streamed = list(iter_files(fs, path))
    assert streamed == list_files("s3://listing/corpus")[1]
    assert len(streamed) == 3000 and streamed[0] == "listing/corpus/a/000.png" and streamed == sorted(streamed)
    fmt, units, reader = plan_units("s3://listing/corpus", listing="s3://listing/labels/listing.parquet")
    assert fmt == "folder" and [(u.start, u.stop) for u in units] == [(0, 1000), (1000, 2000), (2000, 3000)]
    rows = [r for t in reader(fs, path, 2999, 3000) for r in t.to_pylist()]
    assert [(r["id"], r["path"], r["bytes"]) for r in rows] == [("b/999.png", "listing/corpus/b/999.png", b"")]


@pytest.mark.timeout(600)
def test_files_added_mid_corpus_are_refused_then_overwritten(ray_local, tmp_path):
    """Resume after files were added in the middle of the listing: every unit whose range now holds other
    files is named and the job stops before labeling; with overwrite the corpus is labeled afresh, counts
    exact."""
    from core.fingerprint import OutputMismatch
    from labeler.api import LabelOptions, run_labeling

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"{2 * i:02d}.png").write_bytes(png_bytes(seed=i))  # 00, 02, .., 22
    random_checkpoint(str(tmp_path / "ckpt"))
    out = tmp_path / "out"
    opts = LabelOptions(files_per_unit=3)
    first = run_labeling(str(corpus), str(tmp_path / "ckpt"), str(out), opts)
    assert first["units"] == 4 and first["rows"] == 12 and first["resumed_from"] == 0
    assert (out / "listing.parquet").exists()
    (corpus / "07.png").write_bytes(png_bytes(seed=40))  # after u0 (00 02 04), inside u1 (06 08 10)
    (corpus / "09.png").write_bytes(b"not an image")
    (out / "manifest.json").unlink()
    with pytest.raises(OutputMismatch, match="3 of its input units differ") as info:  # u1..u3 hold other files
        run_labeling(str(corpus), str(tmp_path / "ckpt"), str(out), opts)
    assert "u0000001" in str(info.value) and "u0000000" not in str(info.value)
    again = run_labeling(str(corpus), str(tmp_path / "ckpt"), str(out), opts, overwrite=True)
    assert again["units"] == 5 and again["resumed_from"] == 0
    table = pq.read_table(out / "predictions").to_pydict()
    ids = table["id"]
    assert len(ids) == len(set(ids)) == 14 and again["rows"] == 14  # rows in = predictions + rejections
    assert sorted(ids) == sorted(p.name for p in corpus.iterdir())
    assert again["rejected"] == 1 and again["labeled"] == 13


def test_no_listing_is_held_for_parquet_and_single_files(tmp_path):
    single = tmp_path / "one.png"
    single.write_bytes(png_bytes())
    fmt, units, _ = plan_units(str(single))
    assert fmt == "folder" and units[0].paths == (str(single),) and units[0].stop is None


def test_the_local_filesystem_lister_reports_an_unlistable_folder(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can list any folder")
    (tmp_path / "locked").mkdir()
    os.chmod(tmp_path / "locked", 0)
    try:
        with pytest.raises(PermissionError, match="cannot list"):
            list(iter_files(pafs.LocalFileSystem(), str(tmp_path)))
    finally:
        os.chmod(tmp_path / "locked", 0o755)
