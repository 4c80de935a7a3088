"""`noisy-student ablate` on the shrunk digits config: one variant besides the baseline, sharing its first teacher."""

import json

import pyarrow.parquet as pq
import pytest

from pipeline.ablate import variants
from pipeline.cli import main
from pipeline.config import load_config
from tests.helpers import plant_teacher


@pytest.fixture(scope="module")
def ablation(ray_local, tmp_path_factory):
    """The baseline and one variant, from a random first teacher planted where the baseline trains its own
    (training one adds nothing here; threshold 0, as such a teacher is never 30% sure)."""
    tmp = tmp_path_factory.mktemp("ablate")
    overrides = ["runlocal=true", f"data.root={tmp}/data", "balance.threshold=0.0"]
    plant_teacher(load_config("digits", [*overrides, f"run_dir={tmp}/abl_ablation/baseline"]))
    assert main(["ablate", "digits", f"run_dir={tmp}/abl", *overrides, "--only", "no_balancing"]) == 0
    return tmp / "abl_ablation"


def test_variants_cover_the_papers_ablations():
    names = set(variants(load_config("digits")))
    assert names == {"baseline", "no_student_noise", "hard_labels", "no_balancing", "ratio_1"}
    assert main(["ablate", "digits", "--only", "no_such_variant"]) == 2


def test_ablation_table_and_shared_teacher(ablation):
    rows = json.loads((ablation / "ablation.json").read_text())
    assert [r["variant"] for r in rows] == ["baseline", "no_balancing"]
    assert all(0.0 <= r["test_top1"] <= 1.0 for r in rows)
    assert (ablation / "ablation.md").read_text().count("\n") == 5  # header, rule, teacher, two variants
    teacher = "round_0/teacher/model.safetensors"
    assert (ablation / "baseline" / teacher).read_bytes() == (ablation / "no_balancing" / teacher).read_bytes()
    assert not (ablation / "no_balancing" / "ray_train" / "round_0_teacher").exists()  # copied, not retrained


def test_no_balancing_keeps_each_passing_prediction_once(ablation):
    stats = json.loads((ablation / "no_balancing" / "round_1" / "balance_stats.json").read_text())
    table = pq.read_table(ablation / "no_balancing" / "round_1" / "balanced")
    assert set(table.column("copies").to_pylist()) == {1}
    assert table.num_rows == sum(c["passing"] for c in stats["classes"]) == stats["total_rows"]
