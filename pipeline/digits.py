"""The embedded default corpus: scikit-learn's 1,797 real 8x8 handwritten digits as PNGs.

Written (to a local folder or an ``s3://`` prefix) exactly like a user's corpus, so everything
downstream reads image files: ``labeled/<class>/*.png`` (a few labels per class), ``unlabeled/*.png`` (labels withheld,
one flat folder), ``test/<class>/*.png`` and, with ``val_per_class``, ``val/<class>/*.png`` (a validation
split for checkpoint selection, taken from the images that would otherwise be unlabeled).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from core.storage import exists, join, read_json, write_bytes, write_json

SPLITS = ("labeled", "unlabeled", "test", "val")


def split_indices(
    labels: np.ndarray, labels_per_class: int, test_fraction: float, seed: int, val_per_class: int = 0
) -> dict:
    """Stratified split: per class, a test share, then ``labels_per_class`` labeled, then
    ``val_per_class`` validation images, the rest unlabeled. Returns sorted indices per split
    (``val`` only when ``val_per_class`` > 0); the first three splits do not depend on ``val_per_class``
    except that unlabeled gives up the validation images."""
    rng = np.random.default_rng(seed)
    out = {name: [] for name in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        n_lab = n_test + labels_per_class
        out["test"] += idx[:n_test].tolist()
        out["labeled"] += idx[n_test:n_lab].tolist()
        out["val"] += idx[n_lab : n_lab + val_per_class].tolist()
        out["unlabeled"] += idx[n_lab + val_per_class :].tolist()
    if not val_per_class:
        del out["val"]
    return {k: sorted(v) for k, v in out.items()}


def write_digits_corpus(
    root: str, labels_per_class: int = 10, test_fraction: float = 0.3, seed: int = 0, val_per_class: int = 0
) -> dict:
    """Write the corpus under ``root`` (skipped when an identical one is there); return split paths
    (``labeled``, ``unlabeled``, ``test``, and ``val`` when ``val_per_class`` > 0).

    Raises:
        FileExistsError: ``root`` holds a corpus written with other settings.
    """
    from sklearn.datasets import load_digits

    params = {"labels_per_class": labels_per_class, "test_fraction": test_fraction, "seed": seed}
    if val_per_class:  # only when used: corpora written before the validation split stay valid
        params["val_per_class"] = val_per_class
    marker = join(root, "corpus.json")
    paths = {name: join(root, name) for name in SPLITS if name != "val" or val_per_class}
    if exists(marker):
        if read_json(marker).get("params") == params:
            return paths
        raise FileExistsError(
            f"{root} holds a digits corpus made with other settings; remove it or choose another data.root"
        )
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    splits = split_indices(digits.target, labels_per_class, test_fraction, seed, val_per_class)
    for name, idx in splits.items():
        for i in idx:
            folder = paths[name] if name == "unlabeled" else join(paths[name], str(digits.target[i]))
            buf = io.BytesIO()
            Image.fromarray(images[i], "L").save(buf, format="PNG")
            write_bytes(join(folder, f"digit_{i:04d}.png"), buf.getvalue())
    write_json(marker, {"params": params, "counts": {name: len(idx) for name, idx in splits.items()}})
    return paths
