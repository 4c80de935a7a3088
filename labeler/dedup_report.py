"""The near-duplicate section of a report (HTML), from a dedup folder's ``dedup_stats.json`` and ``pairs.json``:
the counts, and pairs (the closest, and the farthest still within reach), each evaluation image beside its
nearest corpus image with their distance.

The noisy-student report shows it per round; ``labeler dedup`` writes it alone as ``report.html``.
"""

from __future__ import annotations

import html

from core.storage import exists, join, read_json, write_bytes

REPORT_FILE = "report.html"


def _figure(src: str | None, caption: str, title: str) -> str:
    title = html.escape(title)
    if src is None:
        return f"<figure title='{title}'>(no preview)<figcaption>{html.escape(caption)}</figcaption></figure>"
    return (
        f"<figure><img class='thumb' src='{src}' alt='{title}' title='{title}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _counts(stats: dict) -> str:
    near, groups = stats["near_duplicates_of_eval"], stats["corpus_duplicates"]
    rows = [
        ("corpus images hashed", stats["hashed"]),
        (f"excluded: within {stats['max_distance']} bits of an evaluation image", near["rows"]),
    ]
    for name, count in near["per_set"].items():
        images = stats["eval_images"][name]
        matched = near["eval_images_matched"][name]
        rows.append((f"&nbsp;&nbsp;of {html.escape(name)} ({images['hashed']} images, {matched} with a copy)", count))
    rows.append(("equal to a labeled image (counted, kept)", stats["labeled_duplicates"]))
    rows.append((f"in duplicate groups inside the corpus ({groups['groups']} groups, equal hashes)", groups["rows"]))
    if groups["keep_one_per_group"]:
        rows.append(("excluded: all but one of each group", groups["excluded"]))
    cells = "".join(f"<tr><th>{label}</th><td>{value:,}</td></tr>" for label, value in rows)
    return f"<table class='kv'>{cells}</table>"


def render_dedup_section(stats: dict, pairs: list[dict], title: str, anchor: str) -> str:
    """One section: ``<h2 id=anchor>``, the counts and the gallery of pairs."""
    figures = "".join(
        "<div class='pair'>"
        + _figure(p["eval_image"], f"{p['eval_set']}", p["eval_id"])
        + _figure(p["image"], f"d={p['distance']}", p["id"])
        + "</div>"
        for p in pairs
    )
    gallery = (
        f"<p>{len(pairs)} pairs: the closest, and the farthest still within {stats['max_distance']} bits (what the "
        "threshold lets through). Each shows the evaluation image, then the corpus image excluded as near it, with "
        f"their Hamming distance d.</p><div class='pairs'>{figures}</div>"
        if pairs
        else "<p>No corpus image is within reach of an evaluation image.</p>"
    )
    return f"<h2 id='{anchor}'>{html.escape(title)}</h2>{_counts(stats)}{gallery}"


def section_for(folder: str, title: str, anchor: str) -> str:
    """:func:`render_dedup_section` of a dedup folder ('' when it holds no stats)."""
    if not exists(join(folder, "dedup_stats.json")):
        return ""
    pairs = read_json(join(folder, "pairs.json")) if exists(join(folder, "pairs.json")) else []
    return render_dedup_section(read_json(join(folder, "dedup_stats.json")), pairs, title, anchor)


STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{text-align:left}"
    "figure{display:inline-block;margin:2px;text-align:center}figcaption{font-size:11px}"
    "img.thumb{width:48px;height:auto;image-rendering:pixelated}"
    ".pair{display:inline-block;border:1px solid #ccc;margin:3px;padding:2px}"
)


def write_dedup_report(folder: str, source: str) -> str:
    """``folder/report.html``: the section alone, for ``labeler dedup``; returns its path."""
    body = section_for(folder, f"Near-duplicates of evaluation images in {source}", "sec-dedup")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Near-duplicates</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )
    path = join(folder, REPORT_FILE)
    write_bytes(path, page.encode())
    return path
