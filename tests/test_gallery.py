"""The report's pseudo-label samples: right rows, deterministic, bounded, whatever the file split."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.gallery import GROUPS, sample_gallery, sample_rejections


def _write(folder, rows, files):
    """rows: (id, label, confidence, reject_reason) split round-robin over ``files`` Parquet files."""
    folder.mkdir()
    for f in range(files):
        part = rows[f::files]
        pq.write_table(
            pa.table(
                {
                    "id": [r[0] for r in part],
                    "path": [f"/nowhere/{r[0]}.png" for r in part],
                    "label": pa.array([r[1] for r in part], pa.int64()),
                    "confidence": pa.array([r[2] for r in part], pa.float32()),
                    "reject_reason": pa.array([r[3] for r in part], pa.string()),
                }
            ),  # fmt: skip
            folder / f"part-{f}.parquet",
        )
    return str(folder)


def _rows():
    rng = np.random.default_rng(0)
    rows = [(f"img{i:04d}", int(rng.integers(0, 3)), float(rng.random()), None) for i in range(600)]
    rows += [(f"bad{i}", -1, 0.0, "not_an_image" if i % 3 else "truncated") for i in range(9)]
    return rows


def test_groups_hold_the_right_rows(tmp_path):
    rows = _rows()
    sample = sample_gallery(_write(tmp_path / "p", rows, 3), threshold=0.3, num_classes=3, per_group=4)
    assert sorted(sample) == [0, 1, 2]
    for c in range(3):
        conf = sorted(np.float32(r[2]) for r in rows if r[1] == c)
        got = {g: [np.float32(x["confidence"]) for x in sample[c][g]] for g in GROUPS}
        above = [x for x in conf if x >= np.float32(0.3)]
        below = [x for x in conf if x < np.float32(0.3)]
        assert got[GROUPS[0]] == conf[::-1][:4]  # the most confident, highest first
        assert got[GROUPS[1]] == above[:4][::-1]  # the least confident at or above the threshold
        assert got[GROUPS[2]] == below[-4:][::-1]  # the most confident below it
        assert all(x["path"].startswith("/nowhere/img") for g in GROUPS for x in sample[c][g])


def test_same_sample_for_any_file_split_and_bounded_classes(tmp_path):
    rows = _rows()
    one = sample_gallery(_write(tmp_path / "a", rows, 1), 0.3, 3)
    many = sample_gallery(_write(tmp_path / "b", rows, 7), 0.3, 3)
    assert one == many
    few = sample_gallery(_write(tmp_path / "c", rows, 2), 0.3, num_classes=1000, max_classes=2, per_group=1)
    assert sorted(few) == [0, 1] and all(len(v) <= 1 for g in few.values() for v in g.values())


def test_rejections_counted_with_smallest_ids(tmp_path):
    out = sample_rejections(_write(tmp_path / "r", _rows(), 4), per_reason=2)
    assert out == {
        "not_an_image": {"count": 6, "examples": ["bad1", "bad2"]},
        "truncated": {"count": 3, "examples": ["bad0", "bad3"]},
    }
