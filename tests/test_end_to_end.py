"""The whole loop on a shrunk digits config, submitted as a user submits it to a cluster: ``ray job submit``
to a head these tests start (tests/job_server.py), with this checkout uploaded as the job's code. The job runs
from the run's folder with relative paths, as users type them (Ray Data and Ray Train workers run elsewhere, so
every path must reach them absolute). Real Ray Data, real TorchTrainer with 2 workers; the job's console output
is checked as well as what it wrote."""

import base64
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.model import ModelSpec, load_checkpoint
from pipeline.cli import main
from pipeline.corruptions import CORRUPTIONS
from pipeline.loop import _check_student_size
from tests.helpers import random_checkpoint
from tests.job_server import job_server

# relative to the run's folder, from where the job and the in-process rerun both start
ARGS = [
    "run", "digits", "run_dir=run", "runlocal=true",  # a shipped config, by name
    "data.labeled=data/labeled", "data.unlabeled=unlabeled", "data.test=data/test", "data.val_fraction=0.4",
    "eval.extra={test_again: data/test}",
]  # fmt: skip
# the job's entry point: from the run's folder ($0), the uploaded checkout's code (where the job started)
FROM_FOLDER = 'cd "$0" && PYTHONPATH="$OLDPWD" exec python -m pipeline "$@"'


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(run_dir, the command's arguments, the job's output)."""
    tmp = tmp_path_factory.mktemp("e2e")
    from pipeline.digits import write_digits_corpus

    paths = write_digits_corpus(str(tmp / "data"), labels_per_class=5, test_fraction=0.3, seed=0)
    unlabeled = tmp / "unlabeled"
    shutil.copytree(paths["unlabeled"], unlabeled)
    (unlabeled / "corrupt.png").write_bytes(b"\x89PNG not really")
    test_image = sorted((tmp / "data" / "test" / "3").iterdir())[0]  # a test image leaked into the corpus
    shutil.copy(test_image, unlabeled / "copy_of_test.png")
    with job_server() as (address, env):
        cmd = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
               "bash", "-c", FROM_FOLDER, str(tmp), *ARGS]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in log, log[-3000:]
    return tmp / "run", ARGS, log


def test_summary_lists_every_model(tiny_run):
    run_dir = tiny_run[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(e["iteration"], e["role"]) for e in summary] == [(0, "teacher"), (1, "student")]
    for e in summary:
        assert 0.0 <= e["test_top1"] <= 1.0 and e["model"] == "test_resnet"


def test_the_student_trains_on_at_least_as_many_labeled_images_as_its_teacher(tiny_run):
    """student.as_long_as_teacher through the loop: the runlocal teacher takes 4 epochs of 1 step; one pass
    over the student's 160 pseudo rows is 1 step, so its 2 epochs must grow to 2 steps each."""
    run_dir = tiny_run[0]
    cfg = json.loads((run_dir / "run_config.json").read_text())["config"]
    teacher = json.loads((run_dir / "round_0" / "teacher" / "final.json").read_text())
    student = json.loads((run_dir / "round_1" / "student" / "final.json").read_text())
    t, s = cfg["teacher"], cfg["student"]
    assert student["steps"] * s["epochs"] * s["batch_size"] >= teacher["steps"] * t["epochs"] * t["batch_size"]
    assert (teacher["steps"], student["steps"]) == (1, 2)


def test_models_are_selected_on_the_carved_validation_split(tiny_run):
    """data.val_fraction=0.4: 2 of each class's 5 labels validate, 3 train; each model's exported epoch
    has the best val_top1 of its run, and a student worse than its teacher is flagged either way."""
    run_dir = tiny_run[0]
    split = json.loads((run_dir / "splits" / "split.json").read_text())["images_per_class"]
    assert set(split["val"].values()) == {2} and set(split["labeled"].values()) == {3}
    teacher, student = json.loads((run_dir / "summary.json").read_text())
    for e, d in ((teacher, "round_0/teacher"), (student, "round_1/student")):
        history = [json.loads(line) for line in (run_dir / d / "metrics.jsonl").read_text().splitlines()]
        best = max(h["val_top1"] for h in history if "val_top1" in h)
        assert e["val_top1"] == best and history[e["exported_epoch"] - 1]["val_top1"] == best
    assert student["worse_than_teacher"] == (student["val_top1"] < teacher["val_top1"])
    page = (run_dir / "report.html").read_text()
    assert ("id='warnings'" in page) == student["worse_than_teacher"]


def test_summary_carries_the_robustness_metrics(tiny_run):
    run_dir = tiny_run[0]
    teacher, student = json.loads((run_dir / "summary.json").read_text())
    assert teacher["mce"] == pytest.approx(1.0) and teacher["mfr"] == pytest.approx(1.0)
    for e in (teacher, student):
        assert 0.0 <= e["test_ece"] <= 1.0 and 0.0 <= e["flip_rate"] <= 1.0 and e["mce"] > 0
        assert set(e["corruption_errors"]) == set(CORRUPTIONS)
        assert all(len(v) == 5 and all(0.0 <= x <= 1.0 for x in v) for v in e["corruption_errors"].values())
        assert set(e["flip_rates"]) == {"gaussian_noise", "translate", "brightness"}
        # the extra set is the test split again: the same numbers, through the extra-set path
        assert e["extra"]["test_again"]["test_again_top1"] == pytest.approx(e["test_top1"])


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.thumbs = {}, []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            a = dict(attrs)
            if a.get("class") == "thumb":
                self.thumbs.append(a["src"])
            else:
                self.images[a["id"]] = a["src"]


PLOTS = {
    "accuracy", "confidence", "class_counts_round_1", "corruptions", "curves_0_teacher", "curves_1_student",
    "per_class", "per_class_change", "confusion_0_teacher", "confusion_1_student",
}  # fmt: skip


def _png(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")  # self-contained: no file next to it needed
    img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    img.load()
    assert img.format == "PNG"
    return img


def test_report_shows_every_plot(tiny_run):
    run_dir = tiny_run[0]
    parser = _Images()
    parser.feed((run_dir / "report.html").read_text())
    assert set(parser.images) == PLOTS
    for src in parser.images.values():
        img = _png(src)
        assert img.width >= 300 and img.height >= 200
    # the gallery: 10 classes x (most confident, just above, just below the threshold), up to 4 each;
    # every unlabeled image here is a readable PNG, so every sampled row has its thumbnail
    assert 10 <= len(parser.thumbs) <= 10 * 3 * 4
    assert all(_png(src).width == 48 for src in parser.thumbs)
    assert main(["report", str(run_dir)]) == 0  # the command alone rewrites it


def test_report_header_and_rejections(tiny_run):
    run_dir = tiny_run[0]
    page = (run_dir / "report.html").read_text()
    info = json.loads((run_dir / "run_config.json").read_text())
    assert info["config"]["runlocal"] is True and info["config"]["student"]["epochs"] == 2  # resolved values
    assert info["versions"]["ray"].startswith("2.60") and "torch" in info["versions"]
    assert "Resolved config" in page and "student:" in page and info["versions"]["timm"] in page
    # the corrupt file is the one rejection, named with its reason and id
    assert "<td>not_an_image</td><td>1</td><td>corrupt.png</td>" in page


def test_report_opens_in_a_real_browser(tiny_run, tmp_path):
    """Headless Chromium: every image decodes to a non-zero size and no script error is raised."""
    from tests.browser import open_page

    result = open_page(tiny_run[0] / "report.html", tmp_path / "report.png")
    assert result["errors"] == []
    assert len(result["images"]) == len(PLOTS) + result["thumbs"] and result["thumbs"] >= 10
    broken = [i for i in result["images"] if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert broken == []
    assert (
        "Pseudo labels, round_1" in result["headings"]
        and "Training curves, 0 teacher test_resnet" in result["headings"]
    )
    assert (tmp_path / "report.png").stat().st_size > 10_000  # it rendered something


def test_tensorboard_lists_every_model(tiny_run):
    """What ``tensorboard --logdir RUN_DIR`` shows, read with TensorBoard's own event loader."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    run_dir = tiny_run[0]
    runs = EventMultiplexer().AddRunsFromDirectory(str(run_dir))
    runs.Reload()
    teacher, student = "tensorboard/round_0_teacher", "tensorboard/round_1_student"
    assert set(runs.Runs()) == {teacher, student}
    # runlocal: 4 teacher epochs, 2 student epochs; inputs: a row of 8 labeled, plus a row of 8 pseudo-labeled
    for run, epochs, rows in ((teacher, 4, 1), (student, 2, 2)):
        acc = runs.GetAccumulator(run)
        tags = acc.Tags()
        assert {"step/loss", "step/lr", "epoch/train_loss", "epoch/lr", "epoch/val_top1"} <= set(tags["scalars"])
        assert [e.step for e in acc.Scalars("epoch/train_loss")] == list(range(1, epochs + 1))
        assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars("epoch/val_top1"))
        assert "epoch/test_top1" not in tags["scalars"]  # the test split is never evaluated per epoch
        assert tags["images"] == ["input/augmented"]
        image = acc.Images("input/augmented")[0]
        assert (image.width, image.height) == (8 * 32, rows * 32)  # 32 x 32 inputs, 8 to a row
        assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")


def test_checkpoints_load_through_the_labeler(tiny_run):
    run_dir = tiny_run[0]
    for d in ("round_0/teacher", "round_1/student"):
        model, spec = load_checkpoint(str(run_dir / d))
        assert spec.classes == [str(i) for i in range(10)] and not model.training
        assert (run_dir / d / "metrics.jsonl").read_text().count("\n") >= 1


def test_every_unlabeled_image_is_accounted_for(tiny_run):
    run_dir = tiny_run[0]
    manifest = json.loads((run_dir / "round_1" / "labels" / "manifest.json").read_text())
    n_files = len(os.listdir(run_dir.parent / "unlabeled"))
    assert manifest["rows"] == n_files and manifest["rejected"] == 1
    assert manifest["reject_reasons"] == {"not_an_image": 1}


def test_balanced_set_has_exactly_per_class_rows(tiny_run):
    run_dir = tiny_run[0]
    stats = json.loads((run_dir / "round_1" / "balance_stats.json").read_text())
    table = pq.read_table(run_dir / "round_1" / "balanced").to_pandas()
    per_label = table.groupby("label")["copies"].sum()
    nonempty = [c["class"] for c in stats["classes"] if c["passing"] > 0]
    assert sorted(per_label.index) == nonempty
    assert (per_label == stats["per_class"]).all()
    assert (table["confidence"] >= stats["threshold"]).all()


def test_a_copy_of_a_test_image_never_reaches_the_student(tiny_run):
    run_dir = tiny_run[0]
    stats = json.loads((run_dir / "round_1" / "balance_stats.json").read_text())["dedup"]
    excluded = {r["id"]: r for r in pq.read_table(run_dir / "round_1" / "dedup" / "excluded").to_pylist()}
    leaked = sorted((run_dir.parent / "data" / "test" / "3").iterdir())[0].name
    assert excluded["copy_of_test.png"]["eval_id"] == f"3/{leaked}" and excluded["copy_of_test.png"]["distance"] == 0
    assert excluded["copy_of_test.png"]["eval_set"] == "test"  # the first set named (also in eval.extra)
    assert stats["max_distance"] == 2 and stats["near_duplicates_of_eval"]["rows"] == len(excluded)
    assert set(stats["eval_images"]) == {"val", "test", "extra/test_again"}  # the carved val split too
    assert (
        stats["eval_images"]["val"]["hashed"] > 0
        and stats["hashed"] == len(os.listdir(run_dir.parent / "unlabeled")) - 1
    )
    balanced = set(pq.read_table(run_dir / "round_1" / "balanced", columns=["id"])["id"].to_pylist())
    assert not balanced & set(excluded)
    # each compared set hashed once, under its fingerprint: val, test (eval.extra's test_again is the same
    # folder, so the same file) and the training part of the labeled set
    assert len(list((run_dir / "hashes").glob("*.parquet"))) == 3
    page = (run_dir / "report.html").read_text()
    assert "Near-duplicates of evaluation images, round_1" in page and "copy_of_test.png" in page


def test_rerun_skips_finished_stages(ray_local, tiny_run):
    """The same command again, in-process, from the same folder: every stage is reused."""
    run_dir, args, _ = tiny_run
    before = (run_dir / "summary.json").read_text()
    log_before = (run_dir / "run.log").read_text()
    cwd = os.getcwd()
    os.chdir(run_dir.parent)
    try:
        assert main(args) == 0
    finally:
        os.chdir(cwd)
    rerun = (run_dir / "run.log").read_text()[len(log_before) :]  # the rerun's lines, from the log file it appends to
    assert "already trained, skipping" in rerun and "test_top1" in rerun
    assert (run_dir / "summary.json").read_text() == before


def test_smaller_student_is_refused(tmp_path):
    random_checkpoint(str(tmp_path / "teacher"), arch="test_resnet")
    small = ModelSpec("test_efficientnet", [str(i) for i in range(10)], 16)
    with pytest.raises(ValueError, match="equal-or-larger"):
        _check_student_size(small, str(tmp_path / "teacher"), allow_smaller=False)
    _check_student_size(small, str(tmp_path / "teacher"), allow_smaller=True)


def test_bad_override_is_a_clear_error(capsys):
    assert main(["run", "digits", "teacher.epoch=3"]) == 2
    assert "did you mean teacher.epochs" in capsys.readouterr().err


def test_the_jobs_console_shows_every_stage_and_no_noise(tiny_run):
    run_dir, _, log = tiny_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "test_top1" in log  # the job's own printout reached the submitter
    assert (run_dir / "report.html").exists() and len(summary) == 2
    _check_console(log, images=len(list((run_dir.parent / "unlabeled").iterdir())))


# Ray's own output that once drowned the progress: the PlacementGroupCleaner's failed State API
# polls, Ray Train's worker-group chatter, Ray Data's execution logs, and the workers' epoch lines
NOISE = (
    "Failed to query Ray Train Controller actor state", "Reporting training result", "Checkpoint successfully created",
    "Attempting to start training worker group", "Setting up process group", "logging_progress.py",
    "Execution plan of Dataset", "Progress bars disabled", "RayTrainWorker", "epoch=",
)  # fmt: skip


def _check_console(log: str, images: int) -> None:
    """The default console of the tiny loop, as a log: every stage's progress, no noise, no redraws."""
    lines = log.splitlines()
    assert "\r" not in log  # a log, not a terminal: no carriage-return redraws
    for noise in NOISE:
        assert noise not in log, f"{noise!r} in the default output:\n{log[-3000:]}"
    for stage in ("training round_0_teacher", "round_0_teacher: 100% 4/4", f"labeling: 100% {images}/{images}",
                  "balanced in", "round_1_student: 100% 2/2", "evaluated in", "pseudo_rows", "report: "):  # fmt: skip
        assert stage in log, f"{stage!r} missing from the output:\n{log[-3000:]}"
    job = [line for line in lines if line.strip() and not line.startswith(("20", "-", "Job ", "Next steps", "  "))]
    assert len(set(job)) == len(job), "a line printed twice"
    # the job's own lines; the submitter's CLI adds its own (packaging notes grow with the cache folders
    # a checkout holds: .ruff_cache, .pytest_cache, .hypothesis), which are not the job's output
    assert len(job) < 40, f"{len(job)} lines from the job:\n{log}"
    assert len(lines) < 100, f"{len(lines)} lines:\n{log}"
