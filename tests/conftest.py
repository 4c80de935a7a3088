import os
import random

import numpy as np
import pytest
import ray
import torch

from core.ray_runtime import worker_runtime_env
from tests.s3_server import free_port, start_for_session

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

# modules whose tests start Ray in a subprocess (no fixture to see it by)
RAY_SUBPROCESS_MODULES = {"test_labeler_stall", "test_multinode"}
# fixtures that start Ray (directly, or by running a stage that calls ray.init)
RAY_FIXTURES = {"ray_local", "tiny_run"}  # tiny_run: the loop submitted to a job server it starts
# modules whose fixtures run a whole Noisy Student loop, a simulated multi-node cluster or a job server
SLOW_MODULES = {"test_ablate", "test_end_to_end", "test_multinode", "test_s3_end_to_end"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``ray`` every test that starts a Ray cluster, so ``-m "not ray"`` is the fast subset; and
    ``slow`` the modules that run whole loops or clusters (``-m "not slow"``: everything else)."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if RAY_FIXTURES & set(item.fixturenames) or module in RAY_SUBPROCESS_MODULES:
            item.add_marker(pytest.mark.ray)
        if module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seeded_and_ray_marked(request):
    """Every test starts from the same RNG state (Python's ``random``, which timm's RandAugment draws
    from, numpy's global RNG and torch's), so no test depends on an unseeded draw; and a test that
    starts Ray in this process without the ``ray`` marker fails, so the fast subset stays Ray-free."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    ray_before = ray.is_initialized()
    yield
    if not ray_before and ray.is_initialized() and request.node.get_closest_marker("ray") is None:
        pytest.fail(f"{request.node.nodeid} started Ray without the `ray` marker; use the ray_local fixture")


@pytest.fixture(scope="session")
def s3():
    """moto's standalone S3 server on loopback; the AWS settings in the environment point at it."""
    server = start_for_session()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_local(s3):
    """One local 2-CPU Ray cluster for the session; shut down only that one.

    Started after the S3 server so Ray's workers inherit its endpoint and test credentials.
    """
    # as the project's own clusters (core.ray_runtime.start_or_join_ray): workers pinned to this cluster,
    # a dashboard port of its own, so the other clusters tests start cannot disturb its training runs
    env = worker_runtime_env()
    ray.init(address="local", num_cpus=2, include_dashboard=False, dashboard_port=free_port(), log_to_driver=False,
             runtime_env=env)  # fmt: skip
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture
def project_caplog(caplog, monkeypatch):
    """``caplog`` that sees the project's loggers also after a test configured the console (which stops
    them propagating to the root logger, where ``caplog`` listens)."""
    import logging

    from core.console import PROJECT_LOGGERS

    for name in PROJECT_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
    caplog.set_level(logging.DEBUG)
    return caplog
