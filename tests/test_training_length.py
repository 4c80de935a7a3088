"""The student trains at least as long as its teacher, counted in labeled images (student.as_long_as_teacher)."""

import logging

from pipeline.config import load_config, train_settings
from pipeline.loop import at_least_as_long, labeled_images_seen
from trainer.loop import steps_per_epoch
from trainer.settings import TrainSettings


def test_labeled_images_seen_counts_epochs_steps_and_batch():
    s = TrainSettings(epochs=150, batch_size=32)
    assert labeled_images_seen(s, {"steps": 8}) == 150 * 8 * 32
    assert labeled_images_seen(s, {}) is None  # a supplied teacher: nothing to match


def test_a_short_student_epoch_grows_to_the_teachers_labeled_images():
    # a reported case: 250 labeled images (7 teacher steps an epoch for 150 epochs), 1,200 pseudo rows
    teacher = TrainSettings(epochs=150, batch_size=32)
    seen = labeled_images_seen(teacher, {"steps": steps_per_epoch(250, None, teacher)})
    student = TrainSettings(epochs=40, batch_size=32, ratio=3)
    before = steps_per_epoch(250, 1200, student)
    longer = at_least_as_long(student, seen, pseudo_rows=1200)
    after = steps_per_epoch(250, 1200, longer)
    assert before * student.epochs * 32 < seen <= after * student.epochs * 32
    assert (after - 1) * student.epochs * 32 < seen  # the least that reaches it


def test_a_student_already_longer_than_its_teacher_is_unchanged():
    # the digits demo: one pass over 1,100 pseudo rows is 11 steps, 440 in 40 epochs; its teacher took 150
    student = TrainSettings(epochs=40, batch_size=32, ratio=3)
    floored = at_least_as_long(student, 150 * 1 * 32, pseudo_rows=1100)
    assert floored.min_steps_per_epoch == 4 and steps_per_epoch(50, 1100, floored) == 11  # a floor, not reached
    assert at_least_as_long(student, None) == student


def test_explicit_steps_per_epoch_wins():
    # a handler of its own: the CLI's console set-up (other tests) may stop pipeline.* propagating to caplog's
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("pipeline.loop")
    logger.addHandler(handler)
    try:
        student = TrainSettings(epochs=2, batch_size=32, steps_per_epoch=5)
        assert at_least_as_long(student, 10_000) == student
    finally:
        logger.removeHandler(handler)
    assert any("fewer labeled images than its teacher" in m for m in seen)


def test_the_rule_is_on_by_default_and_can_be_switched_off():
    cfg = load_config("digits", [])
    assert cfg.student.as_long_as_teacher is True
    assert cfg.balance.per_class == 0  # the target follows the corpus: the mean number of predictions per class
    off = load_config("digits", ["student.as_long_as_teacher=false"])
    assert off.student.as_long_as_teacher is False
    train_settings(off.student, 0)  # a student-only key: TrainSettings(**...) would raise on it
