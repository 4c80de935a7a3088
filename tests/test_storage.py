"""core.storage: one S3 filesystem per process and setting; stored paths are URIs."""

import pyarrow as pa

from core.storage import filesystem_for, join, read_bytes, uri_of
from labeler.sources import plan_units
from labeler.units import _read_unit
from tests.helpers import png_bytes


def test_s3_filesystem_is_built_once_per_setting(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    fs_a, path_a = filesystem_for("s3://a/x.png")
    fs_b, path_b = filesystem_for("s3://b/y/z.png")
    assert fs_a is fs_b and (path_a, path_b) == ("a/x.png", "b/y/z.png")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")  # another store: another filesystem
    assert filesystem_for("s3://a/x.png")[0] is not fs_a


def test_uri_of_inverts_filesystem_for(tmp_path):
    for uri in ("s3://bucket/k/x.png", str(tmp_path / "x.png")):
        assert uri_of(*filesystem_for(uri)) == uri


def test_join_keeps_the_scheme_and_single_slashes():
    assert join("s3://b/run/", "/labels", "predictions/") == "s3://b/run/labels/predictions"
    assert join("/tmp/run", "a", "b.json") == "/tmp/run/a/b.json"


def test_an_s3_corpus_keeps_s3_uris_in_the_path_column(s3):
    """The labeler's path column of an S3 folder corpus reads ``s3://bucket/key`` (it read ``bucket/key``,
    which looks like a relative local path), and each path reads back the image."""
    s3.client().create_bucket(Bucket="pathcol")
    for i in range(3):
        s3.client().put_object(Bucket="pathcol", Key=f"corpus/{i}.png", Body=png_bytes(seed=i))
    _, units, reader = plan_units("s3://pathcol/corpus", "folder")
    fs, root = filesystem_for("s3://pathcol/corpus")
    table = pa.concat_tables(_read_unit(fs, root, units[0], reader, None))
    assert table["path"].to_pylist() == [f"s3://pathcol/corpus/{i}.png" for i in range(3)]
    assert table["id"].to_pylist() == [f"{i}.png" for i in range(3)]
    assert read_bytes(table["path"][1].as_py()) == png_bytes(seed=1)
