"""What a person watching a long job sees: one progress display per stage, and quiet Ray logs.

* ``Progress``: a tqdm bar on a terminal; in a log (``ray job submit``, a file, CI) a plain line at
  most every ``interval_s`` and one at the end, because tqdm redraws with carriage returns, which a
  log keeps as one ever-growing line. Both use tqdm's own formatting (rate, ETA).
* ``ProgressChannel``: how Ray workers and actors report progress to the driver: a
  ``ray.util.queue.Queue`` (an actor, so it works across nodes and through ``ray job submit``), with
  sends throttled and never raising, so progress reporting cannot fail a long job.
* ``configure_console``: the logging set-up of our command lines, and Ray's own logs kept out of the
  default view (they stay complete in Ray's session folder; ``verbose=True`` shows everything).

Ray's own set-up (the runtime environment, starting or joining a cluster, SIGTERM) is :mod:`core.ray_runtime`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

logger = logging.getLogger(__name__)

# Loggers of this project; configure_console sends them to the console.
PROJECT_LOGGERS = ("core", "labeler", "pipeline", "trainer")
LOG_INTERVAL_S = 15.0


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stdout) is an interactive terminal (not a pipe, file or job log)."""
    stream = stream or sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Progress of one stage: ``done`` of ``total`` units, a rate, an ETA and free-form fields.

    Args:
        desc: the stage's name, e.g. ``"labeling"`` or ``"round_1_student"``.
        total: the units expected (images, epochs); ``None`` when unknown (no ETA then).
        unit: the unit's name, e.g. ``"img"`` or ``"epoch"``.
        initial: units already done before this display started (a resumed job).
        interval_s: in a log, seconds between lines (a terminal redraws up to 10 times a second).
        stream: where a terminal bar goes (default stdout); log lines go to this module's logger.
    """

    def __init__(
        self,
        desc: str,
        total: float | None = None,
        unit: str = "it",
        initial: float = 0,
        interval_s: float = LOG_INTERVAL_S,
        stream: TextIO | None = None,
    ):
        self.desc, self.total, self.unit, self.interval_s = desc, total, unit, interval_s
        self.n, self.initial, self.fields = initial, initial, {}
        self.printed_n: float | None = None  # the count of the last log line (a closing line says something new)
        self.start = self.last_line = time.monotonic()
        self.bar = None
        self.closed = False
        stream = stream or sys.stdout
        if is_terminal(stream):
            self.bar = tqdm(
                total=total, desc=desc, unit=unit, initial=initial, file=stream, dynamic_ncols=True, mininterval=0.2
            )

    def restart_clock(self, initial: float | None = None, since: float | None = None) -> None:
        """Count the rate and ETA from now (e.g. from the first image, not from the workers' start-up),
        or from ``since`` (a ``time.monotonic()`` value), with ``initial`` units done at that time."""
        now = time.monotonic()
        self.start = now if since is None else since
        if initial is not None:
            self.initial = initial
        if self.bar is not None:
            self.bar.last_print_t = self.bar._time()
            self.bar.start_t = self.bar.last_print_t - (now - self.start)
            self.bar.initial = self.bar.last_print_n = self.initial

    def set_total(self, total: float | None) -> None:
        """Set the units expected once known (a remote task counts them); None leaves it as it is."""
        if total is None or total == self.total:
            return
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def update(self, n: float | None = None, **fields: Any) -> None:
        """Set the units done to ``n`` (absolute, not an increment) and the shown ``fields``."""
        if n is not None:
            self.n = n
        self.fields.update({k: v for k, v in fields.items() if v is not None})
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.update(self.n - self.bar.n)  # tqdm redraws at most every mininterval
        elif time.monotonic() - self.last_line >= self.interval_s:
            self._line()

    def close(self, message: str | None = None) -> None:
        """End the display (a last line in a log); ``message``, if any, is logged after it."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
            logger.debug(self.text())  # for log files (RUN_DIR/run.log); the terminal has the bar
        elif self.printed_n != self.n:  # else the last line already showed the final count
            self._line()
        if message:
            logger.info(message)

    def text(self) -> str:
        """The current state in tqdm's format, without the bar."""
        elapsed = time.monotonic() - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 and self.n > self.initial else None
        return tqdm.format_meter(
            self.n, self.total, elapsed, ncols=0, prefix=self.desc, unit=self.unit, rate=rate, postfix=self._postfix()
        )

    def _line(self) -> None:
        self.last_line, self.printed_n = time.monotonic(), self.n
        logger.info(self.text())

    def _postfix(self) -> str:
        return ", ".join(f"{k} {_short(v)}" for k, v in self.fields.items())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class ProgressChannel:
    """Progress events from Ray workers or actors to the driver.

    The driver creates it (``ProgressChannel.create()``) and passes it to the remote code, which
    calls ``send`` (throttled to one event per ``min_interval_s`` unless ``force``); the driver
    reads the events with ``drain``. Sending never raises: a lost event only delays the display.
    """

    def __init__(self, queue, min_interval_s: float = 1.0):
        self.queue, self.min_interval_s = queue, min_interval_s
        self._last = 0.0
        self._pending: dict = {}

    @classmethod
    def create(cls, min_interval_s: float = 1.0) -> ProgressChannel:
        """A new channel; needs ``ray.init()`` first. Its queue actor takes no CPU and lives on the driver's
        node, which lasts as long as the driver: on any other node, losing that node would lose the display."""
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        return cls(Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here}), min_interval_s)

    def send(self, event: dict, force: bool = False) -> None:
        """Queue ``event`` (a small dict); events of the same ``kind`` in between are merged by ``merge``."""
        self._pending = event if not self._pending else merge(self._pending, event)
        now = time.monotonic()
        if not force and now - self._last < self.min_interval_s:
            return
        try:
            self.queue.actor.put_nowait.remote(self._pending)  # fire and forget: never blocks the caller
        except Exception:  # a dead queue actor must not fail labeling or training
            logger.debug("progress event lost", exc_info=True)
        self._pending, self._last = {}, now

    def drain(self) -> list[dict]:
        """Every event queued so far (driver side); ``[]`` when none or when the queue is gone."""
        try:
            n = self.queue.qsize()
            return self.queue.get_nowait_batch(n) if n else []
        except Exception:
            logger.debug("progress queue unreadable", exc_info=True)
            return []

    def shutdown(self) -> None:
        try:
            self.queue.shutdown(force=True)
        except Exception:  # already gone with its cluster
            logger.debug("progress queue already gone", exc_info=True)


def merge(old: dict, new: dict) -> dict:
    """Two events as one: counts named in ``new['add']`` are summed, everything else is the newer value."""
    out = {**old, **new}
    for key in new.get("add", ()):
        out[key] = old.get(key, 0) + new.get(key, 0)
    return out


class _Stdout(logging.StreamHandler):
    """A handler on whatever ``sys.stdout`` is when a record is written (pytest swaps it per test)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Console(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        if record.exc_info and record.levelno >= logging.ERROR:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure_console(verbose: bool = False, stream: TextIO | None = None) -> None:
    """Our loggers to ``stream`` (default stdout) as plain lines; Ray's own logs only when ``verbose``.

    Default: INFO from this project, WARNING and above from Ray's driver-side loggers; Ray Data's
    progress bars and per-dataset execution logs off (their full text stays in Ray's session folder,
    ``ray-data.log``). Call before ``ray.init``; ``ray_init_kwargs`` gives the matching init options.
    """
    handler = logging.StreamHandler(stream) if stream is not None else _Stdout()
    handler.setFormatter(_Console())
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler._noisy_student = True
    for name in PROJECT_LOGGERS:
        log = logging.getLogger(name)
        log.handlers = [h for h in log.handlers if not getattr(h, "_noisy_student", False)]
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)  # debug lines reach file handlers (RUN_DIR/run.log); the console filters
        log.propagate = False
    os.environ["NOISY_STUDENT_VERBOSE"] = "1" if verbose else "0"
    quiet_ray(verbose)


class log_file:  # noqa: N801 (a context manager used like a function)
    """Our loggers' full output (debug lines included) also to the local file ``path`` while in the block."""

    def __init__(self, path: str):
        self.handler = logging.FileHandler(path)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handler.setLevel(logging.DEBUG)

    def __enter__(self) -> log_file:
        for name in PROJECT_LOGGERS:
            logging.getLogger(name).addHandler(self.handler)
        return self

    def __exit__(self, *exc) -> None:
        for name in PROJECT_LOGGERS:
            logging.getLogger(name).removeHandler(self.handler)
        self.handler.close()


def verbose() -> bool:
    """Whether the console was configured verbose (``--verbose``)."""
    return os.environ.get("NOISY_STUDENT_VERBOSE") == "1"


def quiet_ray(verbose: bool = False) -> None:
    """Ray Data's progress bars and INFO logs off in the default view; untouched when ``verbose``."""
    if verbose:
        return
    import ray.data
    from ray.util.debug import log_once

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # off on purpose: skip Ray Data's hint on how to turn them on
    ctx.enable_operator_progress_bars = False
    if hasattr(ctx, "enable_rich_progress_bars"):
        ctx.enable_rich_progress_bars = False
    for name in ("ray.data", "ray.train", "ray.tune", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
