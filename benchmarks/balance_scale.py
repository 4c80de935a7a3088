"""Balancing at scale: our streaming exact balancer against a pandas sort + groupby baseline.

    python benchmarks/balance_scale.py                 # 1M and 10M rows (about 10 minutes, 2 cores)
    python benchmarks/balance_scale.py --sizes 200000  # quick

Synthetic predictions: 1,000 classes with Zipf-skewed sizes, 30% of confidences exactly 1.0
(heavy ties), ids like ``shard/000123/0000004567.jpg``. Each method runs in its own subprocess
so its peak resident memory (ru_maxrss) is its own. "ours" is the same pass functions the Ray
path runs (count, histogram refinement, apply), driven in one process over Parquet record
batches (``pipeline.balance.parquet_runner``), which isolates the algorithm's memory from
Ray's own processes. Both methods write the balanced Parquet; the run checks they agree.
Prints time and memory ratios; this machine is shared, so only same-run ratios mean much.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

NUM_CLASSES = 1000
CHUNK = 1_000_000


def generate(path: str, rows: int, seed: int = 0) -> None:
    """Write ``rows`` synthetic predictions in 1M-row files under ``path``."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, NUM_CLASSES + 1) ** 1.1
    weights /= weights.sum()
    for start in range(0, rows, CHUNK):
        n = min(CHUNK, rows - start)
        idx = np.arange(start, start + n)
        conf = np.where(rng.random(n) < 0.3, 1.0, rng.beta(5, 2, n)).astype(np.float32)
        ids = pa.array([f"shard/{i // 10000:06d}/{i:010d}.jpg" for i in idx])
        table = pa.table(
            {
                "id": ids,
                "path": ids,
                "label": rng.choice(NUM_CLASSES, n, p=weights).astype(np.int64),
                "confidence": conf,
                "reject_reason": pa.nulls(n, pa.string()),
            }
        )
        pq.write_table(table, os.path.join(path, f"part-{start // CHUNK:05d}.parquet"))


def run_ours(data: str, out: str, per_class: int, threshold: float) -> dict:
    import glob

    from pipeline.balance import apply_batch, parquet_runner, plan_balance

    plan = plan_balance(parquet_runner(data), NUM_CLASSES, per_class, threshold)
    writer = None
    for f in sorted(glob.glob(os.path.join(data, "*.parquet"))):
        for batch in pq.ParquetFile(f, pre_buffer=False).iter_batches(1 << 18):
            t = apply_batch(pa.Table.from_batches([batch]), plan)
            writer = writer or pq.ParquetWriter(out, t.schema)
            writer.write_table(t)
    writer.close()
    return {"rows": plan.stats["total_rows"], "passes": plan.passes}


def run_pandas(data: str, out: str, per_class: int, threshold: float) -> dict:
    """What one would write with pandas: load everything, sort, rank within class."""
    import pandas as pd

    from pipeline.balance_core import hash32

    df = pq.read_table(data).to_pandas()
    df = df[df["reject_reason"].isna() & (df["confidence"] >= np.float32(threshold))]
    df = df.assign(h=hash32(pa.array(df["id"]))).sort_values(
        ["label", "confidence", "h", "id"], ascending=[True, False, True, True]
    )
    rank = df.groupby("label").cumcount().to_numpy()
    count = df.groupby("label")["label"].transform("size").to_numpy()
    big = count >= per_class
    copies = np.where(big, (rank < per_class).astype(np.int64), per_class // count + (rank < per_class % count))
    df = df.assign(copies=copies)[copies > 0].drop(columns=["h"])
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), out)
    return {"rows": int(pd.Series(copies).sum())}


def child(method: str, data: str, out: str, per_class: int, threshold: float) -> None:
    start = time.perf_counter()
    result = (run_ours if method == "ours" else run_pandas)(data, out, per_class, threshold)
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(method: str, data: str, out: str, per_class: int, threshold: float) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--data", data, "--out", out,
           "--per-class", str(per_class), "--threshold", str(threshold)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def same_output(a: str, b: str) -> bool:
    ta = pq.read_table(a, columns=["id", "copies"]).sort_by("id")
    tb = pq.read_table(b, columns=["id", "copies"]).sort_by("id")
    return ta.num_rows == tb.num_rows and all(
        ta.column(c).to_numpy(zero_copy_only=False).tolist() == tb.column(c).to_numpy(zero_copy_only=False).tolist()
        for c in ("id", "copies")
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--child", choices=["ours", "pandas"])
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--per-class", type=int)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.data, args.out, args.per_class, args.threshold)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.sizes:
            data = os.path.join(tmp, f"preds_{rows}")
            generate(data, rows)
            per_class = max(1, rows // (2 * NUM_CLASSES))  # half the mean: big classes trim, small ones duplicate
            r = {m: measure(m, data, os.path.join(tmp, f"{m}_{rows}.parquet"), per_class, args.threshold)
                 for m in ("ours", "pandas")}  # fmt: skip
            r["identical"] = same_output(
                os.path.join(tmp, f"ours_{rows}.parquet"), os.path.join(tmp, f"pandas_{rows}.parquet")
            )
            results[rows] = r
            o, b = r["ours"], r["pandas"]
            print(
                f"{rows:>11,} rows  per_class={per_class}  ours: {o['seconds']:.1f} s, {o['peak_rss_mb']:.0f} MB "
                f"({o['passes']} refinement passes)  pandas: {b['seconds']:.1f} s, {b['peak_rss_mb']:.0f} MB  "
                f"memory ours/pandas={o['peak_rss_mb'] / b['peak_rss_mb']:.2f}  time ours/pandas="
                f"{o['seconds'] / b['seconds']:.2f}  identical output: {r['identical']}",
                flush=True,
            )
        if len(args.sizes) > 1:
            lo, hi = results[min(args.sizes)]["ours"], results[max(args.sizes)]["ours"]
            mem, secs = hi["peak_rss_mb"] / lo["peak_rss_mb"], hi["seconds"] / lo["seconds"]
            print(f"ours {max(args.sizes):,} vs {min(args.sizes):,} rows: memory x{mem:.2f}, time x{secs:.2f}")


if __name__ == "__main__":
    main()
