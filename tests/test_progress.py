"""The console progress display in a log (not a terminal), and how progress events merge."""

import io
import logging

import pytest

from core.console import Progress, configure_console, merge
from core.ray_runtime import ray_init_kwargs


@pytest.fixture
def console():
    """The console as the command lines set it up, written to a buffer; the lines printed."""
    out = io.StringIO()
    configure_console(False, stream=out)
    yield lambda: out.getvalue().splitlines()
    configure_console(False)  # back to stdout for the tests after this one


def test_progress_in_a_log_prints_plain_lines_at_most_every_interval(console):
    p = Progress("labeling", total=1000, unit="img", interval_s=3600, stream=io.StringIO())
    for n in range(0, 1001, 100):
        p.update(n, rejected=n // 100)
    assert console() == []  # within the interval: nothing yet
    p.close()
    p.close()  # closing twice prints once
    assert len(console()) == 1
    line = console()[0]
    assert line.startswith("labeling: 100% 1000/1000 [") and "img/s" in line and "rejected 10" in line
    assert "\r" not in line and "|" not in line  # no bar, no redraw


def test_progress_in_a_log_with_no_interval_prints_every_update(console):
    p = Progress("round_0_teacher", total=4, unit="epoch", interval_s=0, stream=io.StringIO())
    for epoch in (1, 2):
        p.update(epoch, loss=1.0 / epoch)
    assert [m.split(" [")[0] for m in console()] == ["round_0_teacher:  25% 1/4", "round_0_teacher:  50% 2/4"]
    assert "loss 0.5" in console()[-1]


def test_closing_after_a_line_with_the_final_count_prints_nothing_more(console):
    """An evaluation whose last update fell due for a line printed it twice (once more on close)."""
    p = Progress("evaluating round_1/student (test split)", total=539, unit="img", interval_s=0, stream=io.StringIO())
    p.update(539)
    p.close()
    assert len(console()) == 1 and "539/539" in console()[0]


def test_a_total_learned_later_gives_a_percentage(console):
    p = Progress("evaluating round_1/student", unit="img", interval_s=0, stream=io.StringIO())
    p.update(10)
    assert "%" not in console()[-1]  # no total yet: a count and a rate only
    p.set_total(40)
    p.set_total(None)  # an event without one leaves it
    p.update(20)
    assert console()[-1].startswith("evaluating round_1/student:  50% 20/40")


def test_events_merge_counts_and_keep_the_newest_values():
    a = {"labeled": 16, "rejected": 1, "add": ("labeled", "rejected"), "note": "old"}
    b = {"labeled": 16, "rejected": 0, "add": ("labeled", "rejected"), "note": "new"}
    assert merge(a, b) == {"labeled": 32, "rejected": 1, "add": ("labeled", "rejected"), "note": "new"}
    assert merge({"done": 1.5, "loss": 2.0}, {"done": 1.75, "loss": 1.9}) == {"done": 1.75, "loss": 1.9}


def test_console_modes():
    assert ray_init_kwargs(False)["log_to_driver"] is False and ray_init_kwargs(True)["log_to_driver"] is True
    out = io.StringIO()
    configure_console(False, stream=out)
    logging.getLogger("pipeline.loop").info("visible")
    logging.getLogger("pipeline.loop").debug("hidden")
    logging.getLogger("trainer.api").warning("careful")
    assert out.getvalue() == "visible\nwarning: careful\n"
    configure_console(True, stream=out)
    logging.getLogger("pipeline.loop").debug("now shown")
    assert out.getvalue().endswith("now shown\n")
    configure_console(False)  # back to the default (stdout) for the tests after this one
