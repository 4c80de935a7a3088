"""Brute-force reference implementation of the balancing semantics (sort everything)."""

import numpy as np
import pandas as pd

from pipeline.balance_core import hash32


def brute_force_copies(df: pd.DataFrame, per_class: int, threshold: float, duplicate: bool = True) -> dict:
    """id -> copies, by sorting each class fully (confidence desc, hash asc, id asc)."""
    ok = df[df["reject_reason"].isna() & (df["confidence"].astype(np.float32) >= np.float32(threshold))].copy()
    ok["h"] = hash32(ok["id"].tolist())
    ok["c"] = ok["confidence"].astype(np.float32)
    out = {}
    for _, g in ok.groupby("label"):
        g = g.sort_values(["c", "h", "id"], ascending=[False, True, True])
        n = len(g)
        ids = g["id"].tolist()
        if n >= per_class:
            copies = [1] * per_class + [0] * (n - per_class)
        elif not duplicate:
            copies = [1] * n
        else:
            copies = [per_class // n + (1 if r < per_class % n else 0) for r in range(n)]
        out.update({i: c for i, c in zip(ids, copies) if c > 0})
    return out
