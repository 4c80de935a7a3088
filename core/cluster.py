"""The inference actor pool's size, fitted to what the cluster has or can grow to.

Ray Data's actor pool is given a minimum of one actor, an initial size of ``num_actors`` and a maximum
of ``max_actors``. A minimum of one is what lets labeling outlive a lost node: an actor that was on
the node is restarted by Ray wherever it fits, and with a larger minimum the pool waited for those
restarts while they took the CPUs the read tasks needed, so nothing was read and the job stalled
(``tests/test_cluster_faults.py``: two 2-CPU nodes, two 1-CPU actors, one node removed mid-job). The
initial size is also cut to what fits beside one read task before the job starts, so a job run again
on a smaller cluster starts instead of stalling the same way.

The fit is counted in totals (CPUs and GPUs summed over nodes), which is what Ray reports for the
whole cluster; a node too small for an actor still counts. On an autoscaling cluster that reports
its node types to Ray (autoscaler v2) the totals are what it may grow to. Ray's default autoscaler does
not report them; a cluster with no CPU, or no GPU for GPU actors, is then taken to be one that grows
(the ``cluster.yaml`` shape: a CPU-less head, GPU workers from zero), and the pool is not cut.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolSize:
    """What :func:`fit_pool` decided: GPUs per actor, the pool's initial and maximum size."""

    gpus_per_actor: float
    initial: int
    maximum: int


def cluster_resources() -> tuple[dict[str, float], dict[str, float] | None]:
    """(the running cluster's total resources, the most its autoscaler may provide or None when the
    cluster does not autoscale). Needs ``ray.init()``."""
    import ray

    try:
        most = ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - an older or unusual cluster: treat it as fixed
        most = None
    return ray.cluster_resources(), ({k: float(v) for k, v in most.items()} if most else None)


def whole_gpu(resources: dict[str, float], most: dict[str, float] | None = None) -> int:
    """1 when the cluster has, or its autoscaler may add (``most``), at least one whole GPU, else 0: a
    request for a whole GPU could never be scheduled on less and would wait forever."""
    return 1 if max(resources.get("GPU", 0), (most or {}).get("GPU", 0)) >= 1 else 0


def fit_pool(
    num_actors: int,
    max_actors: int | None,
    cpus_per_actor: float,
    gpus_per_actor: float | None,
    read_cpus: float,
    resources: dict[str, float],
    most: dict[str, float] | None = None,
    fixed: bool = False,
) -> PoolSize:
    """The pool for ``num_actors`` (initial) to ``max_actors`` actors of ``cpus_per_actor`` CPUs and
    ``gpus_per_actor`` GPUs (None: 1 where the cluster has or may get a whole GPU, else 0), beside read
    tasks of ``read_cpus`` CPUs, on a cluster of ``resources`` (``ray.cluster_resources()``) that may
    grow to ``most`` (None: unknown; Ray's default autoscaler does not say). The initial size is lowered to
    what fits, with a WARNING; so is the maximum when the cluster is ``fixed`` (a local cluster this
    process started), elsewhere the pool may grow onto nodes that join.

    Raises:
        ValueError: not even one actor fits beside a read task; the message says what to change.
    """
    capacity = most if most is not None else resources
    gpus = whole_gpu(resources, most) if gpus_per_actor is None else gpus_per_actor
    maximum = max(num_actors, max_actors or num_actors)
    where = _describe(resources, most)
    if most is None and _none_yet(capacity, cpus_per_actor, gpus):
        # no CPU at all, or GPU actors and no GPU: no fixed cluster could run anything, so this one grows
        # (an autoscaler that does not report its node types, as Ray's default one): wait for its nodes
        # Every actor of the pool is asked for at once: each pending one is demand the autoscaler adds a node
        # for. Asked for one at a time, Ray Data's pool stayed at one actor while the cluster grew (seen here).
        logger.warning(
            f"labeler: {where} has no room for an inference actor yet; waiting for its autoscaler to add nodes "
            f"for the pool's {maximum} actor(s) (labeling starts with the first)"
        )
        return PoolSize(gpus, maximum, maximum)
    fits = _actors_that_fit(capacity, cpus_per_actor, gpus, read_cpus)
    if fits < 1:
        raise ValueError(
            f"one inference actor ({cpus_per_actor:g} CPU{f', {gpus:g} GPU' if gpus else ''}) and one read task "
            f"({read_cpus:g} CPU) do not fit on {where}; lower cpus_per_actor or decode_cpus (label.cpus_per_actor, "
            "label.decode_cpus; --cpus-per-actor, --decode-cpus), or add nodes"
        )
    # the maximum too on a cluster that cannot grow; elsewhere the nodes an autoscaler adds are the pool's
    size = PoolSize(gpus, min(num_actors, fits), min(maximum, fits) if fixed else maximum)
    if size.initial < num_actors or size.maximum < maximum:
        grows = f"grows to at most {size.maximum}" if fixed else f"grows to {size.maximum} as nodes join"
        logger.warning(
            f"labeler: {num_actors} inference actors ({cpus_per_actor:g} CPU{f', {gpus:g} GPU' if gpus else ''} "
            f"each) do not fit beside reading ({read_cpus:g} CPU) on {where}; the pool starts with {size.initial} "
            f"and {grows}"
        )
    return size


def _none_yet(capacity: dict[str, float], cpus: float, gpus: float) -> bool:
    return (cpus > 0 and capacity.get("CPU", 0) <= 0) or (gpus > 0 and capacity.get("GPU", 0) <= 0)


def _actors_that_fit(capacity: dict[str, float], cpus: float, gpus: float, read_cpus: float) -> int:
    by_cpu = math.floor((capacity.get("CPU", 0) - read_cpus) / cpus + 1e-9) if cpus > 0 else math.inf
    by_gpu = math.floor(capacity.get("GPU", 0) / gpus + 1e-9) if gpus > 0 else math.inf
    fits = min(by_cpu, by_gpu)
    return 1_000_000 if fits == math.inf else max(0, int(fits))


def _describe(resources: dict[str, float], most: dict[str, float] | None) -> str:
    have = f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"
    if most is None:
        return f"this cluster ({have})"
    return f"this cluster ({have} now; its autoscaler may grow it to {_describe_most(most)})"


WAIT_NOTICE_S = 15.0  # how long a job waits for workers or actors before it says what it is waiting for
WAIT_REPEAT_S = 60.0  # and how often it says so again while it still waits


def waiting_for(what: str, count: int, cpus: float, gpus: float, placement_group: bool = False) -> str | None:
    """What a job still waiting for ``count`` ``what`` (each ``cpus`` CPUs and ``gpus`` GPUs) lacks on the
    running cluster, as a sentence for the log; None when nothing of the kind is waiting to be placed
    (``placement_group``: a pending placement group, as Ray Train's workers; else a pending actor), or when
    they would fit in what is free now (then the wait is not for resources). Needs ``ray.init()``."""
    import ray

    if not _placement_pending(placement_group):
        return None  # placed, and starting up: a model or a data set loading, not a wait for nodes
    free, now = ray.available_resources(), ray.cluster_resources()
    _, most = cluster_resources()
    need = {"CPU": count * cpus, "GPU": count * gpus}
    short = [k for k, v in need.items() if v > 0 and free.get(k, 0) + 1e-9 < v]
    if not short:
        return None
    have = ", ".join(f"{free.get(k, 0):g} of {now.get(k, 0):g} {k}s free" for k in short)
    grow = (
        f"; its autoscaler may add nodes up to {_describe_most(most)}"
        if most
        else " (an autoscaling cluster adds nodes for them; on a fixed one, add nodes or ask for fewer)"
    )
    each = f"{cpus:g} CPU" + (f", {gpus:g} GPU" if gpus else "")
    return f"waiting for {count} {what} ({each} each) to be placed: the cluster has {have}{grow}"


def _placement_pending(placement_group: bool) -> bool:
    """Whether a placement group (or an actor) of the cluster is waiting for resources (read from Ray's
    control service; its private state module is the only reader that needs no dashboard)."""
    import ray

    if placement_group:
        return any(pg.get("state") in ("PENDING", "RESCHEDULING") for pg in ray.util.placement_group_table().values())
    actors = ray._private.state.actors()
    return any(a.get("State") in ("PENDING_CREATION", "DEPENDENCIES_UNREADY", "RESTARTING") for a in actors.values())


def _describe_most(most: dict[str, float]) -> str:
    return f"{most.get('CPU', 0):g} CPUs, {most.get('GPU', 0):g} GPUs"
