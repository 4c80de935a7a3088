"""``noisy-student report RUN_DIR``: one self-contained HTML page (PNG plots inlined) per run.

It reads what the loop wrote: ``summary.json``, and per round ``labels/predictions`` (the
confidence column only, file by file, so it streams at any corpus size) and
``balance_stats.json``.
"""

from __future__ import annotations

import base64
import datetime
import html
import io

import numpy as np
import pyarrow.parquet as pq

from labeler.storage import absolute, exists, join, list_dirs, list_files, read_json, write_bytes
from pipeline.balance import plot_class_counts

REPORT_FILE = "report.html"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


def plot_accuracy(summary: list[dict]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    its = [e["iteration"] for e in summary]
    for key, name in (("test_top1", "top-1"), ("test_top5", "top-5")):
        ax.plot(its, [e.get(key) or np.nan for e in summary], marker="o", label=name)
    ax.axhline(summary[0].get("test_top1") or np.nan, color="grey", ls="--", lw=1, label="first teacher top-1")
    ax.set_xticks(its, [f"{e['iteration']}\n{e['role']}\n{e['model']}" for e in summary])
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy per iteration (0 = first teacher)")
    ax.legend()
    return _png(fig)


def confidence_histogram(predictions: str, bins: int = 50) -> np.ndarray:
    """Counts of pseudo-label confidence in ``bins`` equal bins over [0, 1], one file at a time."""
    counts = np.zeros(bins, dtype=np.int64)
    fs, files = list_files(predictions, suffix=".parquet")
    for path in files:
        conf = pq.read_table(path, filesystem=fs, columns=["confidence"]).column("confidence").to_numpy()
        counts += np.histogram(conf, bins=bins, range=(0.0, 1.0))[0]
    return counts


def plot_confidence(histograms: dict[str, np.ndarray], threshold: float | None) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, counts in histograms.items():
        edges = np.linspace(0, 1, len(counts) + 1)
        ax.stairs(counts, edges, label=name)
    if threshold is not None:
        ax.axvline(threshold, color="red", ls="--", lw=1, label=f"threshold {threshold}")
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("images")
    ax.set_title("pseudo-label confidence")
    ax.legend()
    return _png(fig)


def plot_corruptions(summary: list[dict]) -> bytes:
    plt = _pyplot()
    names = list(summary[0]["corruption_errors"])
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.9), 3.8))
    width = 0.8 / len(summary)
    for i, e in enumerate(summary):
        means = [np.mean(e["corruption_errors"][n]) for n in names]
        ax.bar(np.arange(len(names)) + i * width, means, width, label=f"{e['iteration']} {e['role']} {e['model']}")
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, ha="right")
    ax.set_ylabel("error (mean of severities 1-5)")
    ax.set_title("corruption error by type")
    ax.set_ylim(0, 1.25)
    ax.legend(fontsize=8, loc="upper left", ncol=min(4, len(summary)))
    return _png(fig)


def _flatten(entry: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in entry.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, list):
            flat.update({f"{name}.s{i + 1}": v for i, v in enumerate(value)})
        else:
            flat[name] = value
    return flat


def _table(summary: list[dict]) -> str:
    rows = [_flatten(e) for e in summary]
    keys = [k for k in rows[0] if k != "checkpoint"] + sorted({k for r in rows for k in r} - set(rows[0]))
    head = "".join(f"<th>{html.escape(str(e['iteration']))} {html.escape(e['role'])}</th>" for e in summary)
    body = []
    for k in keys:
        cells = "".join(f"<td>{_cell(r.get(k))}</td>" for r in rows)
        body.append(f"<tr><th>{html.escape(k)}</th>{cells}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(body)}</table>"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape("" if v is None else str(v))


def _rounds(run_dir: str) -> list[tuple[str, str]]:
    names = [d for d in list_dirs(run_dir) if d.startswith("round_") and d[6:].isdigit() and d != "round_0"]
    return [(n, join(run_dir, n)) for n in sorted(names, key=lambda d: int(d[6:]))]


def _figures(run_dir: str, summary: list[dict]) -> list[tuple[str, str, bytes]]:
    figures = [("accuracy", "Accuracy per iteration", plot_accuracy(summary))]
    hists, threshold, balance = {}, None, []
    for name, path in _rounds(run_dir):
        if exists(join(path, "labels", "predictions")):
            hists[name] = confidence_histogram(join(path, "labels", "predictions"))
        stats_path = join(path, "balance_stats.json")
        if exists(stats_path):
            stats = read_json(stats_path)
            threshold = stats["threshold"]
            balance.append((f"class_counts_{name}", f"Class counts before and after balancing, {name}", stats))
    if hists:
        figures.append(("confidence", "Confidence of the pseudo labels", plot_confidence(hists, threshold)))
    figures += [(key, title, plot_class_counts(stats)) for key, title, stats in balance]
    if all("corruption_errors" in e for e in summary):
        figures.append(("corruptions", "Corruption error by type", plot_corruptions(summary)))
    return figures


def render_report(run_dir: str) -> str:
    summary = read_json(join(run_dir, "summary.json"))
    if not summary:
        raise ValueError(f"{run_dir}/summary.json lists no models; run the loop first")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Noisy Student run report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}</style></head><body>",
        f"<h1>Noisy Student run report</h1><p>{html.escape(absolute(run_dir))}, written "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}. mCE and mFR are relative to the first "
        "teacher (1.0 = as robust as it; lower is better).</p>",
    ]
    for key, title, png in _figures(run_dir, summary):
        data = base64.b64encode(png).decode()
        parts.append(f"<h2>{html.escape(title)}</h2><img id='{key}' alt='{html.escape(title)}' "
                     f"src='data:image/png;base64,{data}'>")  # fmt: skip
    parts.append("<h2>Every number</h2>" + _table(summary) + "</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str) -> str:
    """Write ``run_dir/report.html`` (a local folder or an ``s3://`` prefix); returns its path."""
    path = join(run_dir, REPORT_FILE)
    write_bytes(path, render_report(run_dir).encode())
    return path
