"""``noisy-student report RUN_DIR``: one self-contained HTML page (PNG plots inlined) per run.

It reads what the loop wrote: ``run_config.json`` (the resolved config and software versions),
``summary.json``, each model's ``metrics.jsonl`` (training curves) and ``eval.json`` (per class,
confusion matrix), and per round ``labels/predictions`` (a few columns, file by file, so it
streams at any corpus size) and ``balance_stats.json``. The page is bounded in size whatever the
corpus: plots are fixed-size PNGs, and the gallery shows at most ``gallery.MAX_CLASSES`` classes x
3 groups x 4 thumbnails per round, chosen deterministically (``pipeline.gallery``).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json

import numpy as np
import pyarrow.parquet as pq
import yaml

from core.images import thumbnail
from core.storage import absolute, exists, join, list_dirs, list_files, read_bytes, read_json, write_bytes
from labeler.dedup_report import section_for
from pipeline.balance import plot_class_counts
from pipeline.gallery import GROUPS, sample_gallery, sample_rejections
from pipeline.model_eval import worse_than_teacher_warnings

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
    for key, name in (("test_top1", "top-1"), ("test_top5", "top-5"), ("val_top1", "validation top-1")):
        if any(e.get(key) is not None for e in summary):
            ax.plot(its, [e.get(key) or np.nan for e in summary], marker="o", label=name)
    ax.axhline(summary[0].get("test_top1") or np.nan, color="grey", ls="--", lw=1, label="first teacher top-1")
    ax.set_xticks(its, [f"{e['iteration']}\n{e['role']}\n{e['model']}" for e in summary])
    ax.set_ylabel("accuracy")
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


def role_label(e: dict) -> str:
    """A summary entry's role as shown: ``supplied`` for a first teacher brought by ``teacher.checkpoint``."""
    return "supplied" if e.get("supplied") else e["role"]


def _name(e: dict) -> str:
    return f"{e['iteration']} {role_label(e)} {e['model']}"


def _key(e: dict) -> str:
    return f"{e['iteration']}_{e['role']}"


def read_history(model_dir: str) -> list[dict]:
    """The per-epoch metrics of one trained model (``metrics.jsonl``); [] when absent."""
    path = join(model_dir, "metrics.jsonl")
    if not exists(path):
        return []
    return [json.loads(line) for line in read_bytes(path).decode().splitlines() if line.strip()]


def plot_curves(
    name: str, history: list[dict], exported_epoch: int | None = None, test_top1: float | None = None
) -> bytes:
    """PNG of :func:`curves_figure`."""
    return _png(curves_figure(name, history, exported_epoch, test_top1))


def curves_figure(name: str, history: list[dict], exported_epoch: int | None = None, test_top1: float | None = None):
    """Loss, learning rate and validation accuracy per epoch of one model (the epochs evaluated; older
    runs that evaluated the test split per epoch show it), the exported epoch marked when known, and the
    exported model's test top-1 as one point there (the test split is evaluated once per finished model).
    A matplotlib figure of three axes."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.0))
    epochs = [h["epoch"] for h in history]
    axes[0].plot(epochs, [h["train_loss"] for h in history], marker=".")
    axes[0].set_title("training loss")
    axes[1].plot(epochs, [h["lr"] for h in history], marker=".")
    axes[1].set_title("learning rate")
    for key, label in (
        ("val_top1", "val top-1"),
        ("val_top5", "val top-5"),
        ("raw_val_top1", "raw (no EMA) val top-1"),
        ("test_top1", "test top-1"),
        ("test_top5", "test top-5"),
        ("raw_test_top1", "raw (no EMA) top-1"),
    ):
        points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if points:
            axes[2].plot(*zip(*points), marker="o", label=label)
    if exported_epoch is not None:
        axes[2].axvline(exported_epoch, color="grey", ls="--", lw=1, label=f"exported (epoch {exported_epoch})")
        if test_top1 is not None:
            axes[2].plot([exported_epoch], [test_top1], marker="*", ms=12, ls="", color="black",
                         label=f"test top-1 of the exported model ({test_top1:.4f})")  # fmt: skip
    axes[2].set_title("validation accuracy (epochs evaluated), test at export")
    axes[2].set_ylim(0, 1)
    if axes[2].get_legend_handles_labels()[0]:
        axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.suptitle(name)
    return fig


def plot_per_class(models: list[tuple[str, dict]]) -> bytes:
    """Test top-1 per class of every model (bars; a line per model beyond 30 classes)."""
    plt = _pyplot()
    classes = models[0][1]["classes"]
    k = len(classes)
    fig, ax = plt.subplots(figsize=(max(6, min(16, k * 0.5)), 3.5))
    width = 0.8 / len(models)
    for i, (name, ev) in enumerate(models):
        acc = [np.nan if a is None else a for a in ev["per_class_top1"]]
        if k <= 30:
            ax.bar(np.arange(k) + i * width, acc, width, label=name)
        else:
            ax.plot(np.arange(k), acc, label=name, lw=1)
    if k <= 30:
        ax.set_xticks(np.arange(k) + 0.4 - width / 2, classes)
    ax.set_xlabel("class")
    ax.set_ylabel("test top-1")
    ax.set_ylim(0, 1.05)
    ax.set_title("test accuracy per class")
    ax.legend(fontsize=8, loc="lower left", ncol=min(3, len(models)))
    return _png(fig)


def plot_per_class_change(first: tuple[str, dict], last: tuple[str, dict]) -> bytes:
    """Per-class test top-1 of the last student minus that of the first teacher."""
    plt = _pyplot()
    classes = first[1]["classes"]
    delta = [
        np.nan if a is None or b is None else b - a
        for a, b in zip(first[1]["per_class_top1"], last[1]["per_class_top1"])
    ]
    fig, ax = plt.subplots(figsize=(max(6, min(16, len(classes) * 0.5)), 3.2))
    ax.bar(np.arange(len(classes)), delta, color=["tab:green" if d >= 0 else "tab:red" for d in np.nan_to_num(delta)])
    if len(classes) <= 30:
        ax.set_xticks(np.arange(len(classes)), classes)
    ax.axhline(0, color="grey", lw=1)
    ax.set_xlabel("class")
    ax.set_ylabel("change in test top-1")
    ax.set_title(f"per-class change: {last[0]} vs {first[0]}")
    return _png(fig)


def plot_confusion(name: str, ev: dict) -> bytes:
    """Confusion matrix on the test split, colour = share of the true class (counts written up to 20 classes)."""
    plt = _pyplot()
    m = np.asarray(ev["confusion_matrix"], dtype=np.float64)
    k = len(m)
    share = m / np.maximum(1, m.sum(axis=1, keepdims=True))
    fig, ax = plt.subplots(figsize=(5, 4.4))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        ax.set_xticks(range(k), ev["classes"])
        ax.set_yticks(range(k), ev["classes"])
        for i in range(k):
            for j in range(k):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(name)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
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
    head = "".join(f"<th>{html.escape(str(e['iteration']))} {html.escape(role_label(e))}</th>" for e in summary)
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


def _evaluations(summary: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for e in summary:
        path = join(e["checkpoint"], "eval.json") if e.get("checkpoint") else None
        ev = read_json(path) if path and exists(path) else {}
        if "per_class_top1" in ev:
            out.append((_name(e), ev))
    return out


def _model_figures(summary: list[dict]) -> list[tuple[str, str, bytes]]:
    """Training curves, per-class accuracy and its change, confusion matrices."""
    figures = []
    for e in summary:
        history = read_history(e["checkpoint"]) if e.get("checkpoint") else []
        if history:
            png = plot_curves(_name(e), history, e.get("exported_epoch"), e.get("test_top1"))
            figures.append((f"curves_{_key(e)}", f"Training curves, {_name(e)}", png))
    evals = _evaluations(summary)
    if evals:
        figures.append(("per_class", "Test accuracy per class", plot_per_class(evals)))
    if len(evals) > 1:
        title = "Per-class change, first teacher to last student"
        figures.append(("per_class_change", title, plot_per_class_change(evals[0], evals[-1])))
    by_name = {_name(e): e for e in summary}
    for name, ev in evals:
        figures.append((f"confusion_{_key(by_name[name])}", f"Confusion matrix, {name}", plot_confusion(name, ev)))
    return figures


def _figures(run_dir: str, summary: list[dict]) -> list[tuple[str, str, bytes]]:
    figures = [("accuracy", "Accuracy per iteration", plot_accuracy(summary))]
    figures += _model_figures(summary)
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


def _header(run_dir: str) -> str:
    """The resolved config that produced the run and the software versions (``run_config.json``)."""
    path = join(run_dir, "run_config.json")
    if not exists(path):
        return "<p>No run_config.json in this run (written by runs since 2026-11-29).</p>"
    info = read_json(path)
    versions = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in info["versions"].items()
    )
    config = html.escape(yaml.safe_dump(info["config"], sort_keys=False))
    command = html.escape(" ".join(info.get("argv") or []))
    return (
        "<h2 id='sec-config'>Config and software</h2>"
        f"<p>Command: <code>{command}</code></p><table class='kv'>{versions}</table>"
        "<details><summary>Resolved config (defaults, file and overrides applied)</summary>"
        f"<pre>{config}</pre></details>"
    )


def _gallery(run_dir: str, num_classes: int, classes: list[str]) -> list[str]:
    """Per round: thumbnails of the most confident pseudo labels and of those either side of the threshold."""
    parts = []
    for name, path in _rounds(run_dir):
        predictions, stats_path = join(path, "labels", "predictions"), join(path, "balance_stats.json")
        if not (exists(predictions) and exists(stats_path)):
            continue
        threshold = read_json(stats_path)["threshold"]
        dedup = join(path, "dedup")
        sample = sample_gallery(predictions, threshold, num_classes, dedup=dedup if exists(dedup) else None)
        head = "".join(f"<th>{html.escape(g)}</th>" for g in GROUPS)
        rows = []
        for c, groups in sample.items():
            cells = "".join(f"<td class='thumbs'>{_thumbs(groups[g])}</td>" for g in GROUPS)
            label = classes[c] if c < len(classes) else str(c)
            rows.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
        shown = f"classes 0-{len(sample) - 1} of {num_classes}; " if len(sample) < num_classes else ""
        parts.append(
            f"<h2 id='sec-gallery-{name}'>Pseudo labels, {name}</h2><p>{shown}threshold {threshold}; "
            "each image with its confidence (top probability); ties ranked by a stable hash of the id, as in "
            f"balancing.</p><table class='gallery'><tr><th>class</th>{head}</tr>{''.join(rows)}</table>"
        )
    return parts


def _near_duplicates(run_dir: str) -> list[str]:
    """Per round: the unlabeled images excluded as near-duplicates of evaluation images, and pairs of them."""
    return [
        section_for(join(path, "dedup"), f"Near-duplicates of evaluation images, {name}", f"sec-dedup-{name}")
        for name, path in _rounds(run_dir)
    ]


def _thumbs(rows: list[dict]) -> str:
    out = []
    for r in rows:
        src = thumbnail(r["path"], data=r.get("image"))
        title = html.escape(r["id"])
        if src is None:
            out.append(f"<figure title='{title}'>(unreadable)<figcaption>{r['confidence']:.3f}</figcaption></figure>")
        else:
            out.append(f"<figure><img class='thumb' src='{src}' alt='{title}' title='{title}'>"
                       f"<figcaption>{r['confidence']:.3f}</figcaption></figure>")  # fmt: skip
    return "".join(out) or "none"


def _rejections(run_dir: str) -> str:
    """Rejected images per round: count by reason and a few example ids."""
    rows = []
    for name, path in _rounds(run_dir):
        predictions = join(path, "labels", "predictions")
        if not exists(join(path, "labels", "manifest.json")):
            continue
        manifest = read_json(join(path, "labels", "manifest.json"))
        rejected = sample_rejections(predictions) if manifest.get("rejected") else {}
        if not rejected:
            rows.append(f"<tr><th>{name}</th><td>none</td><td>0 of {manifest['rows']}</td><td></td></tr>")
        for reason, r in rejected.items():
            ids = html.escape(", ".join(r["examples"]))
            rows.append(f"<tr><th>{name}</th><td>{html.escape(reason)}</td><td>{r['count']}</td><td>{ids}</td></tr>")
    if not rows:
        return ""
    return ("<h2 id='sec-rejected'>Rejected images</h2><table><tr><th>round</th><th>reason</th><th>images</th>"
            f"<th>examples (smallest ids)</th></tr>{''.join(rows)}</table>")  # fmt: skip


STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}"
    "table.kv td,table.gallery td{text-align:left}figure{display:inline-block;margin:2px;text-align:center}"
    ".pair{display:inline-block;border:1px solid #ccc;margin:3px;padding:2px}"
    "figcaption{font-size:11px}img.thumb{width:48px;height:auto;max-width:none;image-rendering:pixelated}pre{text-align:left}"
    ".warning{background:#fff3cd;border:2px solid #d39e00;padding:0 1em;color:#7a5600}"
)


def render_report(run_dir: str) -> str:
    """The report's HTML: self-contained (every image inlined), bounded in size whatever the corpus.

    Raises:
        FileNotFoundError: ``run_dir/summary.json`` is missing.
        ValueError: it lists no model.
    """
    summary = read_json(join(run_dir, "summary.json"))
    if not summary:
        raise ValueError(f"{run_dir}/summary.json lists no models; run the loop first")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Noisy Student run report</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Noisy Student run report</h1><p>{html.escape(absolute(run_dir))}, written "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}. mCE and mFR are relative to the first "
        "teacher (1.0 = as robust as it; lower is better). Training curves: the validation split is evaluated "
        "every <code>eval_every</code> epochs and selects the exported checkpoint; the test split is evaluated "
        "once per finished model.</p>",
        _warnings(summary),
        _header(run_dir),
    ]
    for key, title, png in _figures(run_dir, summary):
        data = base64.b64encode(png).decode()
        parts.append(f"<h2 id='sec-{key}'>{html.escape(title)}</h2><img id='{key}' alt='{html.escape(title)}' "
                     f"src='data:image/png;base64,{data}'>")  # fmt: skip
    evals = _evaluations(summary)
    classes = evals[0][1]["classes"] if evals else []
    num_classes = len(classes) or _num_classes(run_dir)
    parts += _gallery(run_dir, num_classes, classes)
    parts += _near_duplicates(run_dir)
    parts.append(_rejections(run_dir))
    parts.append("<h2 id='sec-numbers'>Every number</h2>" + _table(summary) + "</body></html>")
    return "\n".join(parts)


def _warnings(summary: list[dict]) -> str:
    """A visible block naming every student worse than its teacher on validation ('' when none)."""
    lines = worse_than_teacher_warnings(summary)
    if not lines:
        return ""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return f"<div id='warnings' class='warning'><h2 id='sec-warnings'>Warnings</h2><ul>{items}</ul></div>"


def _num_classes(run_dir: str) -> int:
    for _, path in _rounds(run_dir):
        if exists(join(path, "balance_stats.json")):
            return len(read_json(join(path, "balance_stats.json"))["classes"])
    return 0


def write_report(run_dir: str) -> str:
    """Write ``run_dir/report.html`` (a local folder or an ``s3://`` prefix); returns its path."""
    path = join(run_dir, REPORT_FILE)
    write_bytes(path, render_report(run_dir).encode())
    return path
