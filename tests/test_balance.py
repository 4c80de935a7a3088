import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import balance_core
from pipeline.balance import (
    GATHER_LIMIT,
    apply_balance,
    apply_batch,
    balance_predictions,
    files_runner,
    parquet_runner,
    plan_balance,
)
from tests.reference import brute_force_copies


def _frame(labels, confs, rejected=None):
    n = len(labels)
    rejected = rejected if rejected is not None else [False] * n
    return pd.DataFrame(
        {
            "id": [f"img/{i:05d}.jpg" for i in range(n)],
            "label": np.asarray(labels, dtype=np.int64),
            "confidence": np.asarray(confs, dtype=np.float32),
            "reject_reason": [("undecodable" if r else None) for r in rejected],
        }
    )


def _run(df, num_classes, per_class, threshold, blocks=3, duplicate=True):
    ds = ray.data.from_pandas(df).repartition(blocks)
    plan = plan_balance(ds, num_classes, per_class, threshold, duplicate)
    rows = apply_balance(ds, plan).take_all()
    return plan, {r["id"]: r["copies"] for r in rows}


tables = st.integers(min_value=0, max_value=120).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 4), min_size=n, max_size=n),
        st.lists(st.sampled_from([0.1, 0.3, 0.5, 0.9, 1.0]) | st.floats(0, 1, width=32), min_size=n, max_size=n),
        st.lists(st.booleans(), min_size=n, max_size=n),
    )
)


def _run_in_process(df, num_classes, per_class, threshold, blocks=3, duplicate=True):
    """:func:`_run` without Ray: the same passes over ``blocks`` slices of one in-memory table."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    size = max(1, -(-len(table) // blocks))
    parts = [table.slice(i, size) for i in range(0, len(table), size)] or [table]

    def run(fn, kwargs):  # a Runner (pipeline.balance) over the slices, as parquet_runner is over files
        for part in parts:
            out = fn(part, **kwargs)
            yield out if isinstance(out, dict) else {c: out[c].to_numpy(zero_copy_only=False) for c in out.column_names}

    plan = plan_balance(run, num_classes, per_class, threshold, duplicate)
    rows = pa.concat_tables([apply_batch(p, plan) for p in parts]).to_pylist()
    return plan, {r["id"]: r["copies"] for r in rows}


def _check_against_brute_force(df, plan, got, per_class, threshold):
    assert got == brute_force_copies(df, per_class, threshold)
    per_label = df.set_index("id").loc[list(got), "label"] if got else pd.Series(dtype=int)
    totals = pd.Series(list(got.values()), index=per_label.values).groupby(level=0).sum().to_dict()
    for k in range(5):
        expected = per_class if plan.passing[k] > 0 else 0
        assert totals.get(k, 0) == expected
        assert plan.stats["classes"][k]["final"] == expected


# In process (no Ray), so it can try many tables: the exact semantics of pipeline/balance.py's docstring
@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    data=tables,
    per_class=st.integers(1, 30),
    threshold=st.sampled_from([0.0, 0.3, 0.95]),
    blocks=st.integers(1, 4),
    gather_limit=st.sampled_from([1, 4, GATHER_LIMIT]),  # small limits force byte-refinement passes
)
def test_matches_brute_force(data, per_class, threshold, blocks, gather_limit):
    labels, confs, rejected = data
    df = _frame(labels, confs, rejected)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(balance_core, "GATHER_LIMIT", gather_limit)
        mp.setattr("pipeline.balance.GATHER_LIMIT", gather_limit)
        plan, got = _run_in_process(df, 5, per_class, threshold, blocks)
    _check_against_brute_force(df, plan, got, per_class, threshold)


# The same property through Ray Data (map_batches over repartitioned blocks): fewer examples, each starts a job
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=tables, per_class=st.integers(1, 30), threshold=st.sampled_from([0.0, 0.3, 0.95]), blocks=st.integers(1, 4))
def test_ray_matches_brute_force_and_in_process(ray_local, data, per_class, threshold, blocks):
    labels, confs, rejected = data
    df = _frame(labels, confs, rejected)
    plan, got = _run(df, 5, per_class, threshold, blocks)
    _check_against_brute_force(df, plan, got, per_class, threshold)
    local_plan, local_got = _run_in_process(df, 5, per_class, threshold, blocks)
    assert local_got == got and local_plan.stats == plan.stats


def test_heavy_ties_force_refinement(ray_local, monkeypatch):
    """Thousands of confidences exactly 1.0: the cut must come from the id hash, over several passes."""
    monkeypatch.setattr(balance_core, "GATHER_LIMIT", 8)
    monkeypatch.setattr("pipeline.balance.GATHER_LIMIT", 8)
    rng = np.random.default_rng(1)
    n = 3000
    labels = rng.integers(0, 3, n)
    confs = np.where(rng.random(n) < 0.7, 1.0, rng.random(n)).astype(np.float32)
    df = _frame(labels, confs)
    plan, got = _run(df, 3, 400, 0.3, blocks=5)
    assert plan.passes >= 3
    assert got == brute_force_copies(df, 400, 0.3)


def test_same_output_for_any_partitioning(ray_local):
    rng = np.random.default_rng(2)
    df = _frame(rng.integers(0, 4, 500), rng.choice([0.5, 0.99, 1.0], 500))
    results = [_run(df, 4, 90, 0.3, blocks=b)[1] for b in (1, 3, 7)]
    assert results[0] == results[1] == results[2]


def test_empty_class_one_image_class_and_all_filtered(ray_local):
    df = _frame([0, 0, 0, 2], [0.9, 0.8, 0.1, 0.95])
    plan, got = _run(df, 4, 5, 0.3, blocks=2)
    assert plan.stats["empty_classes"] == [1, 3]
    assert got == {"img/00000.jpg": 3, "img/00001.jpg": 2, "img/00003.jpg": 5}
    plan, got = _run(_frame([0, 1], [0.1, 0.2]), 2, 5, 0.3, blocks=1)
    assert got == {} and plan.stats["empty_classes"] == [0, 1]


def test_trim_only_keeps_small_classes_once(ray_local):
    df = _frame([0, 0, 0, 1], [0.9, 0.8, 0.7, 0.95])
    _, got = _run(df, 2, 2, 0.3, blocks=1, duplicate=False)
    assert got == {"img/00000.jpg": 1, "img/00001.jpg": 1, "img/00003.jpg": 1}


def test_balance_predictions_writes_parquet_and_stats(ray_local, tmp_path):
    df = _frame([0, 0, 1, 1, 1], [0.9, 0.4, 0.8, 0.7, 0.2])
    df["probs"] = [[0.5, 0.5]] * len(df)
    (tmp_path / "preds").mkdir()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "preds" / "part.parquet")
    stats = balance_predictions(str(tmp_path / "preds"), str(tmp_path / "out"), 2, 3)
    table = pq.read_table(tmp_path / "out" / "balanced")
    assert sorted(table.column_names) == sorted([*df.columns, "copies"])
    assert sum(table.column("copies").to_pylist()) == 6
    assert json.loads((tmp_path / "out" / "balance_stats.json").read_text()) == stats
    assert [c["passing"] for c in stats["classes"]] == [2, 2]
    assert (tmp_path / "out" / "class_counts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_apply_pass_writes_a_bounded_file_per_predictions_file(ray_local, tmp_path):
    """Labeling's layout (hive folders unit=<key>/, one file each): one balanced file per predictions
    file, written a record batch at a time (row groups of at most a batch), keeping the unit column;
    the same rows and copies as the Ray Data apply pass."""
    from pipeline.balance import write_balanced

    rng = np.random.default_rng(3)
    df = _frame(rng.integers(0, 3, 900), rng.uniform(0, 1, 900))
    df["image"] = [bytes([i % 256]) * 5 for i in range(len(df))]
    for i in range(3):
        (tmp_path / "preds" / f"unit=u{i:07d}").mkdir(parents=True)
        part = pa.Table.from_pandas(df.iloc[i * 300 : (i + 1) * 300], preserve_index=False)
        pq.write_table(part, tmp_path / "preds" / f"unit=u{i:07d}" / "a.parquet", row_group_size=100)
    stats = balance_predictions(str(tmp_path / "preds"), str(tmp_path / "out"), 3, 200)
    files = sorted((tmp_path / "out" / "balanced").iterdir())
    assert [f.name for f in files] == [f"part-{i:06d}.parquet" for i in range(3)]
    table = pq.read_table(tmp_path / "out" / "balanced")
    assert sum(table.column("copies").to_pylist()) == stats["total_rows"] == 600
    assert set(table.column("unit").to_pylist()) == {"u0000000", "u0000001", "u0000002"}
    ds = ray.data.read_parquet(str(tmp_path / "preds"))
    plan = plan_balance(ds, 3, 200, 0.3)
    expected = {r["id"]: r["copies"] for r in apply_balance(ds, plan).take_all()}
    assert dict(zip(table.column("id").to_pylist(), table.column("copies").to_pylist())) == expected
    rows = write_balanced(str(tmp_path / "preds"), plan, str(tmp_path / "small"), batch_rows=64)
    assert rows == len(expected)
    assert max(pq.ParquetFile(f).metadata.row_group(0).num_rows for f in (tmp_path / "small").iterdir()) <= 64


def test_the_local_and_per_file_runners_give_the_same_plan_as_ray(ray_local, tmp_path):
    rng = np.random.default_rng(5)
    df = _frame(rng.integers(0, 6, 2000), rng.choice([0.2, 0.6, 1.0], 2000))
    for i in range(4):
        part = df.iloc[i * 500 : (i + 1) * 500]
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), tmp_path / f"p{i}.parquet")
    pq.write_table(pa.Table.from_pandas(df.iloc[:0], preserve_index=False), tmp_path / "p4.parquet")  # empty
    local = plan_balance(parquet_runner(str(tmp_path), batch_rows=300), 6, 250, 0.3)
    distributed, _ = _run(df, 6, 250, 0.3, blocks=3)
    per_file = plan_balance(files_runner(str(tmp_path), batch_rows=300), 6, 250, 0.3)  # what balancing runs
    assert local.passes > 0 and local.stats == distributed.stats == per_file.stats
    for plan in (distributed, per_file):
        assert list(local.cut_key) == list(plan.cut_key) and local.cut_id == plan.cut_id


def test_a_predictions_folder_without_files_is_named_not_reported_as_nothing_passing(tmp_path):
    (tmp_path / "empty").mkdir()
    for missing in (tmp_path / "empty", tmp_path / "no_such_folder"):
        with pytest.raises(FileNotFoundError, match="predictions"):
            files_runner(str(missing))


def test_sort_key_orders_confidence_then_hash():
    ids = ["a", "b", "c"]
    keys = balance_core.sort_keys(np.array([0.5, 1.0, 0.5], np.float32), ids)
    assert keys[1] > max(keys[0], keys[2])
    h = balance_core.hash32(ids)
    assert (keys[0] > keys[2]) == (h[0] < h[2])


def test_choose_bucket_refuses_a_histogram_with_too_few_rows():
    with pytest.raises(ValueError):
        balance_core.choose_bucket(np.zeros(256, np.int64), 1)


def test_balance_command(ray_local, tmp_path):
    from pipeline.cli import main

    df = _frame([0, 0, 0, 1], [0.9, 0.8, 0.7, 0.95])
    (tmp_path / "preds").mkdir()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "preds" / "a.parquet")
    args = ["balance", "--predictions", str(tmp_path / "preds"), "--out", str(tmp_path / "out")]
    assert main([*args, "--num-classes", "3", "--per-class", "2"]) == 0
    stats = json.loads((tmp_path / "out" / "balance_stats.json").read_text())  # the files written, not the console
    assert stats["total_rows"] == 4 and stats["empty_classes"] == [2]
    got = pq.read_table(tmp_path / "out" / "balanced").to_pydict()
    assert dict(zip(got["id"], got["copies"])) == {"img/00000.jpg": 1, "img/00001.jpg": 1, "img/00003.jpg": 2}


def test_full_key_collisions_are_broken_by_id(ray_local):
    """'x988571' and 'x1563467' share a 32-bit id hash: with equal confidence their keys are equal."""
    assert balance_core.hash32(["x988571"])[0] == balance_core.hash32(["x1563467"])[0]
    df = pd.DataFrame(
        {
            "id": ["a", "x988571", "x1563467", "b", "x990023", "x1519939"],
            "label": [0, 0, 0, 0, 1, 1],
            "confidence": np.array([0.95, 0.9, 0.9, 0.5, 0.7, 0.7], np.float32),
            "reject_reason": [None] * 6,
        }
    )
    for per_class in (1, 2, 3, 6, 7):
        plan, got = _run(df, 2, per_class, 0.3, blocks=2)
        assert got == brute_force_copies(df, per_class, 0.3), per_class
    _, got = _run(df, 2, 2, 0.3, blocks=1)
    assert got["x1563467"] == 1 and "x988571" not in got


def test_bad_arguments_are_clear_errors(ray_local):
    df = _frame([0, 3], [0.9, 0.8])
    with pytest.raises(ValueError, match="per_class"):
        _run(df, 4, 0, 0.3)
    with pytest.raises(Exception, match="outside 0..2"):
        _run(df, 3, 2, 0.3)
