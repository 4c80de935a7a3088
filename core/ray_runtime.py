"""Ray set-up for every command and job of the project: starting or joining a cluster, the workers' runtime
environment, and stopping cleanly on SIGTERM.

* ``start_or_join_ray``: join a cluster, or start a local one with a dashboard port of its own;
* ``worker_runtime_env`` / ``ray_init_kwargs``: the job-level ``runtime_env`` (allocator settings, a setup
  hook that pins each worker's ``RAY_ADDRESS`` to its own cluster) and the console-mode ``ray.init`` options;
* ``Stopped`` / ``stop_running_datasets``: SIGTERM as an exception in the main thread (exit status 143), and
  Ray Data's running executions stopped before Ray shuts down;
* ``keeps_sigterm_status``: a command's entry point exits with 143 after SIGTERM, also when the signal landed
  inside ``ray.get``.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


# Every Ray worker of our jobs allocates Arrow memory from the system allocator instead of pyarrow's
# default (mimalloc): mimalloc kept the memory freed by Arrow's own threads (Parquet reads, the
# partitioned write_dataset of labeling), so a reused task worker grew with every Arrow-heavy task it
# ran, with the corpus size. benchmarks/scale_run.py, 20,000 and 200,000 images in one Ray session:
# the largest worker (one task worker, reused throughout) grew 508 -> 819 -> 1,292 -> 1,353 MB (USS)
# over labeling and balancing at the two sizes with the default pool, 502 -> 626 -> 692 -> 756 MB with
# this. Two glibc arenas keep glibc from spreading the same memory over one arena per thread.
WORKER_ENV = {"ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_ARENA_MAX": "2"}


def worker_runtime_env() -> dict:
    """The job-level ``runtime_env`` of our ``ray.init`` calls: :data:`WORKER_ENV`, without overriding a
    value the environment already sets (a task's or actor's own ``env_vars`` still win over both), and
    a setup hook run in every worker process as it starts (:func:`_ray_address_pin`)."""
    return {
        "env_vars": {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()},
        "worker_process_setup_hook": _ray_address_pin(),
    }


def _ray_address_pin() -> Callable[[], None]:
    """A worker setup hook: ``RAY_ADDRESS`` in the worker is the address of the cluster it belongs to.

    Without it, a worker that asks Ray's State API about its own cluster without naming it finds
    "the" cluster the way the ``ray`` command does: ``RAY_ADDRESS``, else the newest cluster started on
    the machine (Ray's ``/tmp/ray/ray_current_cluster``). Ray Train's ``PlacementGroupCleaner`` (a
    detached actor on the head) asks every second whether the run's controller is alive that way. When
    another Ray cluster was started on the same machine (a ``labeler`` run in another shell), it asked
    that cluster, did not find the controller there, judged it dead and removed the training workers'
    placement group: the workers were killed and training began again from the last checkpoint.

    The hook is a closure so that Ray pickles it by value: the hook runs before a worker has the
    driver's ``sys.path``, where this package may not be importable yet (a hook that fails to load
    stops the worker). It swallows its own errors for the same reason.
    """

    def pin_ray_address() -> None:
        try:
            import ray

            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        except Exception:  # noqa: BLE001 - never stop a worker from starting; unpinned is Ray's default
            pass

    return pin_ray_address


def start_or_join_ray(address: str | None = None, verbose: bool = False, **local: Any) -> bool:
    """``ray.init`` for our commands: join ``address`` (else ``RAY_ADDRESS``) when there is one, else start
    a local cluster for this process with ``local`` (``num_cpus``, ``include_dashboard``). Returns whether
    a local cluster was started. Both use :func:`ray_init_kwargs`.

    A local cluster gets a dashboard port of its own, free when it starts, whether or not it runs a
    dashboard. Ray records the dashboard's address in the cluster (8265 by default) even without one, and
    Ray's State API asks that address: once another cluster on the machine serves its dashboard on 8265,
    Ray Train's ``PlacementGroupCleaner`` asked that cluster about this one's training controller, was
    told it does not exist, and removed the workers' placement group (see :func:`_ray_address_pin`).
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **ray_init_kwargs(verbose))
    else:
        ray.init(address="local", dashboard_port=_free_port(), **local, **ray_init_kwargs(verbose))
        _STARTED_HERE.append(ray.get_runtime_context().gcs_address)
    _stop_cleanly_on_sigterm()
    return not address


class Stopped(SystemExit):
    """SIGTERM (``ray job stop``, a spot instance's notice, ``kill``): the job unwinds and exits with 143."""


_stopped_by: list[int] = []  # the signal number, once the handler of _stop_cleanly_on_sigterm has run


def keeps_sigterm_status(command: Callable) -> Callable:
    """Decorate a command's entry point so that it exits with 128 + the signal's number (143) after SIGTERM.

    The handler raises :class:`Stopped` in the main thread; when that thread is blocked in ``ray.get`` (a
    training run's ``fit`` is, throughout), Ray's signal check catches the exception and raises a plain
    ``SystemExit(1)`` in its place, so the job seemed to fail. Seen 1 run in 3 of the training job stopped
    by SIGTERM; reproduced by ``test_sigterm_inside_ray_get_exits_with_143``."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        _stopped_by.clear()  # a signal that stopped an earlier call in this process is not this call's
        try:
            return command(*args, **kwargs)
        except SystemExit as err:
            if _stopped_by and err.code not in (0, None) and not isinstance(err, Stopped):
                raise Stopped(128 + _stopped_by[0]) from err
            raise

    return run


def _stop_cleanly_on_sigterm() -> None:
    """SIGTERM ends the job as an exception in the main thread, so every ``finally`` runs (a labeling job's
    written units and a training run's checkpoints are kept; the same command resumes), and the process
    exits with 143. Ray's own handling printed a crash dump and exited with 134 (SIGABRT), and a thread
    still running after Ray had shut down connected to another cluster on the machine, the newest, as Ray
    connects a process that calls it without ``ray.init``; that automatic connection is turned off here."""
    import signal
    import threading

    import ray._private.auto_init_hook as auto_init

    auto_init.enable_auto_connect = False  # private, and read at each call: the only switch after import
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame) -> None:
        _stopped_by.append(signum)
        logger.warning(
            "stopped by SIGTERM: finished units and checkpoints are kept; run the same command again to resume"
        )
        raise Stopped(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    atexit.register(stop_running_datasets, 15.0)  # runs before Ray's own shutdown (registered earlier)


def stop_running_datasets(timeout_s: float = 120.0) -> int:
    """Force-stop every Ray Data execution of this process (its tasks cancelled, its actors killed);
    returns how many there were. Used when a job stalls after a node loss, and at exit: a Ray Data
    thread still running when Ray shuts down calls into it, and Ray ends the process with status 1.

    Ray Data has no public way to stop a running ``write_parquet``; its executor is a thread of this
    process, which has ``shutdown(force=True)`` (run here in a thread of its own, with ``timeout_s``:
    Ray's forced shutdown waits on its actors without a limit)."""
    import threading

    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    executors = [t for t in threading.enumerate() if isinstance(t, StreamingExecutor) and t.is_alive()]
    for executor in executors:
        stopper = threading.Thread(target=executor.shutdown, kwargs={"force": True}, daemon=True)
        stopper.start()
        stopper.join(timeout_s)
    return len(executors)


_STARTED_HERE: list[str] = []  # the GCS addresses of the local clusters start_or_join_ray started


def started_here() -> bool:
    """Whether the cluster this process is connected to is a local one it started (it cannot grow)."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().gcs_address in _STARTED_HERE


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_init_kwargs(verbose: bool = False) -> dict:
    """``ray.init`` options for the console mode.

    Default: ``log_to_driver=False``. Every worker's and actor's output stays in Ray's session folder
    (``<temp dir>/session_latest/logs``) instead of being echoed here. Two things made the echo
    unusable (1,175 lines for the demo): Ray Train's ``PlacementGroupCleaner`` actor polls the
    controller's state through the State API every second, and that API is served by the dashboard,
    which a cluster started without it (``include_dashboard=False``, or a ``pip install ray`` without
    ``ray[default]``) does not have, so it warns "Failed to query Ray Train Controller actor state"
    once per poll; and Ray Train V2 patches ``print`` in its workers to go through its own logging
    (``RAY_TRAIN_ENABLE_PRINT_PATCH``), and the epoch lines rank 0 printed came out twice. Our workers
    now log instead of printing (once each, checked with ``--verbose``), and progress reaches the
    driver through ``ProgressChannel``. ``verbose``: Ray's defaults (everything echoed). Both set the
    workers' allocator environment (:func:`worker_runtime_env`).
    """
    env = {"runtime_env": worker_runtime_env()}
    if verbose:
        return {"log_to_driver": True, **env}
    return {"log_to_driver": False, "logging_level": logging.WARNING, **env}
