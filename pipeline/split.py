"""A validation split carved from the labeled set (``data.val_fraction``), written as manifests.

Checkpoints are selected on a validation split, never on the test split. When a user has none
(``data.val``), a share of each class of the labeled set is held out: per class, so every class
is validated; seeded, so the same config gives the same split; and written under
``run_dir/splits/`` so a resumed run trains on exactly the images it trained on before, and the
held-out images are never trained on.

Layout: ``splits/train/manifest.parquet`` and ``splits/val/manifest.parquet``, each a labeled set
the trainer and evaluation read like any other (``trainer.data``): a file list (``path``, image
URI; ``label``, class name) for a class-folder labeled set, or the rows themselves (``image`` bytes,
``label``) for a Parquet labeled set, which has no file per image to point at.
The label column is named as in the labeled set (``data.label_column``), so one setting reads both.
``splits/split.json`` records the parameters and the images per class in each part.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.storage import exists, join, read_json, write_bytes, write_json
from trainer.data import LABEL_COLUMN, list_class_folders, parquet_columns, parquet_files, parquet_source_column

SPLIT_FILE = "split.json"


@dataclass(frozen=True)
class Splits:
    """A run's data sets, as the stages of the loop pass them on: local paths (absolute, since Ray Train's
    workers run in a working directory of their own) or ``s3://`` URIs.

    ``labeled``: what the models train on (after a carve, the training part); ``unlabeled``: the corpus;
    ``test`` and ``val``: evaluation sets, or None; ``classes_from``: the labeled set as given, whose classes
    the models predict; ``carve``: whether ``val`` is carved from the labeled set (``data.val_fraction``).
    """

    labeled: str
    unlabeled: str
    test: str | None
    val: str | None
    classes_from: str
    carve: bool


def carve_indices(labels: list[str], fraction: float, seed: int) -> np.ndarray:
    """Indices (sorted, int64) of the rows held out for validation: per class, ``round(n * fraction)``
    of its ``n`` rows, at least 1 and at most ``n - 1`` (a class keeps a training image; a class with
    a single image gives none). Each class draws from its own generator, seeded with ``seed`` and a
    CRC-32 of the class name (stable across processes, unlike ``hash``), so a class's split does not
    depend on which other classes there are.

    Raises:
        ValueError: ``fraction`` is not in (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.val_fraction must be between 0 and 1 (exclusive), not {fraction}")
    labels_arr = np.asarray(labels, dtype=object)
    held = []
    for c in sorted(set(labels)):
        rows = np.flatnonzero(labels_arr == c)
        n_val = min(len(rows) - 1, max(1, int(round(len(rows) * fraction))))
        if n_val > 0:
            rng = np.random.default_rng((seed, zlib.crc32(str(c).encode())))
            held.append(rng.permutation(rows)[:n_val])
    return np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)


def carve_validation(
    labeled: str, fraction: float, seed: int, out_dir: str, label_column: str = LABEL_COLUMN
) -> dict[str, str]:
    """Split ``labeled`` (class folders or Parquet, local or ``s3://``) into ``out_dir/train`` and
    ``out_dir/val`` (see the module docstring); returns ``{"labeled": train root, "val": val root}``.

    Rows are taken in a fixed order (files sorted; Parquet rows in file order) before carving, so the
    split depends only on the set, ``fraction`` and ``seed``. Done once: a second call with the same
    arguments returns the written split without reading the set.

    Raises:
        FileExistsError: ``out_dir`` holds a split made from another set or with other settings
            (remove it, or use another run_dir).
        ValueError: as :func:`carve_indices`.
    """
    params = {"labeled": labeled, "val_fraction": fraction, "seed": seed}
    if label_column != LABEL_COLUMN:  # recorded only when set, so splits carved before still match
        params["label_column"] = label_column
    roots = {"labeled": join(out_dir, "train"), "val": join(out_dir, "val")}
    marker = join(out_dir, SPLIT_FILE)
    if exists(marker):
        if read_json(marker)["params"] == params:
            return roots
        raise FileExistsError(
            f"{out_dir} holds a validation split made with {read_json(marker)['params']}, not {params}; "
            "remove it to carve a new one (models trained on the old split would then be stale), or use another run_dir"
        )
    if parquet_files(labeled):
        column = parquet_source_column(labeled)
        cols = parquet_columns(labeled, [column, "label"], label_column)
        source, names = cols[column], cols["label"]
    else:
        _, pairs = list_class_folders(labeled)
        column, source, names = "path", [u for u, _ in pairs], [c for _, c in pairs]
    val = carve_indices(names, fraction, seed)
    is_val = np.zeros(len(names), dtype=bool)
    is_val[val] = True
    counts = {}
    for part, mask in (("labeled", ~is_val), ("val", is_val)):
        rows = np.flatnonzero(mask)
        table = pa.table({column: [source[i] for i in rows], label_column: [names[i] for i in rows]})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        write_bytes(join(roots[part], "manifest.parquet"), buf.getvalue())
        counts[part] = {c: int(n) for c, n in zip(*np.unique([names[i] for i in rows], return_counts=True))}
    write_json(marker, {"params": params, "images_per_class": counts})  # last: its presence means done
    return roots
