"""Corruptions, calibration and the relative robustness numbers, on small hand-checkable inputs."""

import numpy as np
import pytest
import torch

from pipeline.corruptions import CORRUPTIONS, SEVERITIES, corrupt, perturbation_sequences
from pipeline.model_eval import add_relative_errors, expected_calibration_error
from trainer.evaluate import accuracy_metrics


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    base = rng.integers(40, 216, size=(6, 32, 32, 3)).astype(np.uint8)
    base[:, 8:24, 8:24] = 200  # some structure, so blurs and pixelation change something
    return base


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_keeps_shape_and_grows_with_severity(images, name):
    change = []
    for s in SEVERITIES:
        out = corrupt(images, name, s)
        assert out.shape == images.shape and out.dtype == np.uint8
        change.append(np.abs(out.astype(float) - images).mean())
    assert change[0] > 0
    assert change[-1] > change[0], f"{name}: severity 5 changes no more than severity 1 ({change})"
    assert np.array_equal(corrupt(images, name, 3, seed=1), corrupt(images, name, 3, seed=1))


def test_corruption_rejects_unknown_names_and_severities(images):
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(images, "contrast", 6)


def test_perturbation_sequences(images):
    seqs = perturbation_sequences(images, frames=4)
    assert set(seqs) == {"gaussian_noise", "translate", "brightness"}
    for frames in seqs.values():
        assert len(frames) == 4 and all(f.shape == images.shape for f in frames)
    assert np.array_equal(seqs["translate"][0], images) and np.array_equal(seqs["brightness"][0], images)
    assert np.array_equal(seqs["translate"][1][:, :, 1:], images[:, :, :-1])


def test_expected_calibration_error_by_hand():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 1])
    # bin of 0.9: 2 rows, accuracy 0.5 -> |0.5-0.9| * 2/4; bin of 0.6: 2 rows, accuracy 1 -> |1-0.6| * 2/4
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4 * 0.5 + 0.4 * 0.5)
    perfect = np.eye(2)[labels]
    assert expected_calibration_error(perfect, labels) == pytest.approx(0.0)


def test_accuracy_metrics():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    m = accuracy_metrics(torch.log(torch.tensor(probs)), np.array([0, 1]))  # logits whose softmax is probs
    assert m["test_top1"] == 0.5 and m["test_top5"] == 1.0
    assert m["test_loss"] == pytest.approx(-(np.log(0.7) + np.log(0.3)) / 2)


def test_relative_errors_are_against_the_first_teacher():
    teacher = {"corruption_errors": {"a": [0.4, 0.6], "b": [0.2, 0.2]}, "flip_rates": {"n": 0.2, "t": 0.1}}
    student = {"corruption_errors": {"a": [0.2, 0.3], "b": [0.4, 0.4]}, "flip_rates": {"n": 0.1, "t": 0.1}}
    entries = [teacher, student]
    add_relative_errors(entries)
    assert teacher["mce"] == pytest.approx(1.0) and teacher["mfr"] == pytest.approx(1.0)
    assert student["corruption_ce"] == pytest.approx({"a": 0.5, "b": 2.0})
    assert student["mce"] == pytest.approx(1.25) and student["mfr"] == pytest.approx(0.75)


def test_confusion_matrix_and_per_class_accuracy():
    from pipeline.model_eval import confusion_matrix, per_class_accuracy

    m = confusion_matrix(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]), 3)
    assert m.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]  # row = true class, column = predicted
    assert per_class_accuracy(m) == [0.5, pytest.approx(2 / 3), None]  # class 2 has no test image
