"""The embedded default corpus: scikit-learn's 1,797 real 8x8 handwritten digits as PNGs.

Written (to a local folder or an ``s3://`` prefix) exactly like a user's corpus, so everything
downstream reads image files: ``labeled/<class>/*.png`` (a few labels per class), ``unlabeled/*.png`` (labels withheld,
one flat folder) and ``test/<class>/*.png``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from labeler.storage import exists, join, read_json, write_bytes, write_json

SPLITS = ("labeled", "unlabeled", "test")


def split_indices(labels: np.ndarray, labels_per_class: int, test_fraction: float, seed: int) -> dict:
    """Stratified split: per class, a test share, then ``labels_per_class`` labeled, rest unlabeled."""
    rng = np.random.default_rng(seed)
    out = {name: [] for name in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        out["test"] += idx[:n_test].tolist()
        out["labeled"] += idx[n_test : n_test + labels_per_class].tolist()
        out["unlabeled"] += idx[n_test + labels_per_class :].tolist()
    return {k: sorted(v) for k, v in out.items()}


def write_digits_corpus(root: str, labels_per_class: int = 10, test_fraction: float = 0.3, seed: int = 0) -> dict:
    """Write the corpus under ``root`` (skipped when an identical one is there); return split paths."""
    from sklearn.datasets import load_digits

    params = {"labels_per_class": labels_per_class, "test_fraction": test_fraction, "seed": seed}
    marker = join(root, "corpus.json")
    paths = {name: join(root, name) for name in SPLITS}
    if exists(marker):
        if read_json(marker).get("params") == params:
            return paths
        raise FileExistsError(
            f"{root} holds a digits corpus made with other settings; remove it or choose another data.root"
        )
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    splits = split_indices(digits.target, labels_per_class, test_fraction, seed)
    for name, idx in splits.items():
        for i in idx:
            folder = paths[name] if name == "unlabeled" else join(paths[name], str(digits.target[i]))
            buf = io.BytesIO()
            Image.fromarray(images[i], "L").save(buf, format="PNG")
            write_bytes(join(folder, f"digit_{i:04d}.png"), buf.getvalue())
    write_json(marker, {"params": params, "counts": {name: len(idx) for name, idx in splits.items()}})
    return paths
