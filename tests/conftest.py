import os

import pytest
import ray

from tests.s3_server import start_for_session

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


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
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()
