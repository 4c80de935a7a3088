import json
import os

import numpy as np
import pytest
from PIL import Image

from pipeline.digits import split_indices, write_digits_corpus


def test_split_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(10), 30)
    s = split_indices(labels, labels_per_class=3, test_fraction=0.2, seed=0)
    assert len(s["labeled"]) == 30 and len(s["test"]) == 60 and len(s["unlabeled"]) == 210
    assert not (set(s["labeled"]) & set(s["test"])) and not (set(s["unlabeled"]) & set(s["test"]))
    assert np.bincount(labels[s["labeled"]]).tolist() == [3] * 10


def test_corpus_is_real_png_folders(tmp_path):
    paths = write_digits_corpus(str(tmp_path / "d"), labels_per_class=2, test_fraction=0.1)
    assert sorted(os.listdir(paths["labeled"])) == [str(i) for i in range(10)]
    assert all(f.endswith(".png") for f in os.listdir(paths["unlabeled"]))
    counts = json.loads((tmp_path / "d" / "corpus.json").read_text())["counts"]
    assert sum(counts.values()) == 1797 and counts["labeled"] == 20
    img = Image.open(os.path.join(paths["labeled"], "0", os.listdir(os.path.join(paths["labeled"], "0"))[0]))
    assert img.size == (8, 8) and img.mode == "L"
    assert write_digits_corpus(str(tmp_path / "d"), labels_per_class=2, test_fraction=0.1) == paths
    with pytest.raises(FileExistsError):
        write_digits_corpus(str(tmp_path / "d"), labels_per_class=3)


def test_validation_split_comes_from_the_unlabeled_pool():
    labels = np.repeat(np.arange(10), 30)
    plain = split_indices(labels, labels_per_class=3, test_fraction=0.2, seed=0)
    s = split_indices(labels, labels_per_class=3, test_fraction=0.2, seed=0, val_per_class=4)
    assert s["labeled"] == plain["labeled"] and s["test"] == plain["test"]  # only unlabeled gives images up
    assert np.bincount(labels[s["val"]]).tolist() == [4] * 10
    assert sorted(s["val"] + s["unlabeled"]) == plain["unlabeled"] and not set(s["val"]) & set(s["unlabeled"])
    assert "val" not in plain
