"""cluster.yaml, checked offline: Ray's own schema validation plus the invariants we rely on."""

import copy

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config


@pytest.fixture(scope="module")
def cluster():
    with open("cluster.yaml") as f:
        return yaml.safe_load(f)


def _validated(cfg: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_ray_schema_accepts_it(cluster):
    prepared = _validated(cluster)
    assert prepared["provider"]["type"] == "aws"


def test_schema_validation_catches_a_typo(cluster):
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu_worker"]["max_wrokers"] = 4
    with pytest.raises(Exception, match="max_wrokers"):
        _validated(bad)


def test_head_runs_no_work(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}


def test_workers_have_gpus_and_s3_rights(cluster):
    workers = {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}
    assert any(w["resources"].get("GPU", 0) > 0 for w in workers.values()), "no GPU worker type"
    assert any(w["resources"].get("GPU", 0) == 0 and w["resources"]["CPU"] > 0 for w in workers.values())
    for name, w in workers.items():
        assert w["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
        assert w["min_workers"] == 0, f"{name} should scale to zero when idle"


def test_image_and_setup(cluster):
    assert cluster["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert cluster["idle_timeout_minutes"] > 0
    assert any("pip install" in c and "noisy-student" in c for c in cluster["setup_commands"])
