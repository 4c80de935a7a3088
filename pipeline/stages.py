"""The stages of a run_dir and what made each: a finished stage is reused only when its inputs are the same.

Every stage of the loop (the first teacher, each round's labels, balanced set and student, and the
evaluation of every model) has a record of its inputs (:class:`Stage`): the settings that shape it,
fingerprints of the data it reads (``core.fingerprint``: paths, sizes and modification times) and the
digest of the record of the stage it reads from. Records depend on inputs only, so every stage's
expected record is known before anything runs, and :func:`check_stages` compares them all with what
the run_dir holds before Ray starts:

* a stage that is not there runs;
* a stage whose record is the same is reused when finished, resumed when not;
* a stage whose record differs (or that has none: written by an older version), or that reads from a
  stage that will run again, is stale: the run stops with :class:`core.fingerprint.OutputMismatch`
  naming each stale stage and what changed, before anything is computed; with ``overwrite`` the stale
  stages are deleted and made again.

The record is written when a stage starts (:func:`start_stage`), so an interrupted stage is resumed only
with the same inputs too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from core.fingerprint import OutputMismatch, differences, file_sha256, record_digest, tree_fingerprint
from core.model import SPEC_FILE, WEIGHTS_FILE
from core.storage import absolute, canonical, delete_file, delete_tree, exists, join, read_json, write_json
from labeler.api import ROW_SETTINGS
from pipeline.config import student_archs, train_settings
from pipeline.split import Splits

logger = logging.getLogger(__name__)

__all__ = ["Stage", "check_stages", "label_options", "plan_stages", "recorded_floor", "start_stage"]


@dataclass
class Stage:
    """One stage of a run_dir.

    ``name``: how messages name it (``round_1/labels``); ``record``: its inputs; ``record_file``: where
    the record is kept; ``owns``: the folders and files it writes (deleted with ``overwrite``);
    ``done_file``: present when it finished; ``upstream``: the names of the stages it reads;
    ``resumable``: an interrupted run is continued (labeling by unit, training from its checkpoints), so
    it must have the same inputs; a stage that is not (balancing, evaluation) is redone from scratch
    when unfinished, whatever its record said. ``floor``: a labels stage's image-bytes floor (the
    balance threshold it keeps image bytes from); predictions made with a lower floor serve any higher
    threshold, so the floor is recorded beside the record and only a higher recorded one is stale.
    """

    name: str
    record: dict
    record_file: str
    owns: list[str]
    done_file: str
    upstream: list[str] = field(default_factory=list)
    resumable: bool = True
    floor: float | None = None

    def __post_init__(self) -> None:
        self.record = json.loads(json.dumps(self.record))  # as it reads back from its file (tuples as lists)

    @property
    def digest(self) -> str:
        """A digest of the record: what a downstream stage records of this one."""
        return record_digest(self.record)

    def exists(self) -> bool:
        """Whether anything of this stage is in the run_dir."""
        return any(exists(p) for p in [self.record_file, *self.owns])

    def finished(self) -> bool:
        return exists(self.done_file)


# training settings that change how fast a model trains, not what it learns: a run may resume with others
EXECUTION_SETTINGS = ("cpus_per_worker", "use_gpu")
FLOOR_KEY = "image_bytes_floor"


def _fingerprint(uri: str | None) -> dict | None:
    return {"uri": canonical(uri), **tree_fingerprint(uri)} if uri else None


def _training(settings) -> dict:
    """A model's ``TrainSettings`` as its record holds them (locations canonical, execution settings out)."""
    values = {k: v for k, v in settings.to_dict().items() if k not in EXECUTION_SETTINGS}
    for key in ("checkpoint", "pretrained"):
        if values.get(key) and values[key] != "timm":
            values[key] = canonical(values[key])
    return values


def label_options(cfg: DictConfig, floor: float | None = None):
    """The ``LabelOptions`` the loop labels with: ``label:`` plus the image bytes of every prediction at or
    above ``floor`` (default ``balance.threshold``), so the balanced set carries its images and students read
    them from any corpus format."""
    floor = cfg.balance.threshold if floor is None else floor
    options = OmegaConf.to_object(cfg.label)
    return dataclasses.replace(options, keep_image_bytes=True, image_bytes_min_confidence=floor)


def recorded_floor(stage: Stage) -> float | None:
    """The image-bytes floor a labels stage was started with (its record file), else its own."""
    record = _read_record(stage)
    return record.get(FLOOR_KEY, stage.floor) if record else stage.floor


def _read_record(stage: Stage) -> dict | None:
    """The stage's record file, or None when there is none or it is not JSON (cut off mid-write)."""
    try:
        return read_json(stage.record_file) if exists(stage.record_file) else None
    except ValueError:
        return None


def _supplied(cfg: DictConfig) -> dict | None:
    """The supplied first teacher's file and its SHA-256 (the weights; a folder's model.json too)."""
    uri = cfg.teacher.checkpoint
    if not uri:
        return None
    uri = canonical(uri)
    if exists(join(uri, SPEC_FILE)):
        digest = {"weights": file_sha256(join(uri, WEIGHTS_FILE)), "spec": file_sha256(join(uri, SPEC_FILE))}
    else:
        digest = {"weights": file_sha256(uri)}
    return {"uri": uri, **digest, "classes": list(cfg.teacher.classes), "reset": cfg.teacher.reset_classifier}


def _set_prints(cfg: DictConfig, data: Splits) -> dict:
    """The fingerprints of the labeled set, the validation split (None when carved), the test split and each
    ``eval.extra`` set: each set listed once per plan, whatever the number of records that hold it."""
    return {
        "labeled": _fingerprint(data.classes_from),
        "val": None if data.carve else _fingerprint(data.val),
        "test": _fingerprint(data.test),
        "extra": {k: _fingerprint(absolute(v)) for k, v in cfg.eval.extra.items()},
    }


def _model_stages(cfg: DictConfig, sets: dict, name: str, folder: str, record: dict, upstream: list[str]) -> list:
    """A trained (or supplied) model's stage and its evaluation's (``sets``: :func:`_set_prints`)."""
    run_dir = cfg.run_dir
    train_name = name.replace("/", "_")
    model = Stage(
        name,
        record,
        join(folder, "stage.json"),
        [folder, join(run_dir, "ray_train", train_name), join(run_dir, "tensorboard", train_name)],
        join(folder, "final.json"),
        upstream,
    )
    return [model, _eval_stage(cfg, sets, name, folder, model)]


def _eval_stage(cfg: DictConfig, sets: dict, name: str, folder: str, model: Stage) -> Stage:
    record = {
        "stage": "eval",
        "model": model.digest,
        "test": sets["test"],
        "extra": sets["extra"],
        "label_column": cfg.data.label_column,
        "seed": cfg.seed,
    }
    eval_file = join(folder, "eval.json")
    record_file = join(folder, "eval_stage.json")
    return Stage(f"{name} evaluation", record, record_file, [eval_file], eval_file, [model.name], resumable=False)


def _dedup_record(cfg: DictConfig, data: Splits, sets: dict) -> dict:
    """What a round's near-duplicate step reads besides its predictions: its settings and the sets it compares
    with (the validation split as given or as carved, the test split, ``eval.extra``, the labeled set;
    ``sets``: :func:`_set_prints`)."""
    carved = {"fraction": cfg.data.val_fraction, "seed": cfg.seed} if data.carve else None
    return {
        **OmegaConf.to_container(cfg.dedup),
        "val": carved or sets["val"],
        "test": sets["test"],
        "extra": sets["extra"],
        "labeled": sets["labeled"],
    }


def plan_stages(
    cfg: DictConfig, data: Splits, classes: list[str], specs: dict, corpus: str | None = None
) -> list[Stage]:
    """Every stage of the run ``cfg`` describes, in order, with the record it would have.

    ``data``: the splits before any carving (``pipeline.loop.split_paths``: ``classes_from`` the labeled
    set as given, ``val``, ``test``, ``unlabeled``, ``carve``: whether validation is carved); ``specs``:
    ``{"round_0/teacher": ModelSpec, "round_1/student": ...}``, each model's spec; ``classes``: the labeled
    set's classes; ``corpus``: the unlabeled corpus's digest (``labeler.units.corpus_digest``). Reads the
    data's listings (paths, sizes, modification times), and the supplied teacher's bytes for its digest.
    """
    run_dir = cfg.run_dir
    carve = data.carve
    sets = _set_prints(cfg, data)
    data_record = {
        "labeled": sets["labeled"],
        "val": sets["val"],
        "carved_val": {"fraction": cfg.data.val_fraction, "seed": cfg.seed} if carve else None,
        "label_column": cfg.data.label_column,
        "classes": list(classes),
    }
    teacher = train_settings(cfg.teacher, cfg.seed)
    trained = not cfg.teacher.checkpoint or cfg.teacher.reset_classifier  # a supplied model is not trained
    record = {"stage": "teacher", **data_record, "settings": _training(teacher) if trained else None}
    record.update(supplied=_supplied(cfg), spec=dataclasses.asdict(specs["round_0/teacher"]))
    stages = _model_stages(cfg, sets, "round_0/teacher", join(run_dir, "round_0", "teacher"), record, [])
    stages[0].owns.append(join(run_dir, "splits"))  # a carved validation split is made with the first teacher
    if cfg.teacher.checkpoint:
        stages[0].owns.append(join(run_dir, "round_0", "supplied"))
    model = stages[0]
    options = label_options(cfg)
    label_settings = {name: getattr(options, name) for name in ROW_SETTINGS if name != "image_bytes_min_confidence"}
    for it, arch in enumerate(student_archs(cfg), start=1):
        round_dir = join(run_dir, f"round_{it}")
        labels_record = {"stage": "labels", "teacher": model.digest, "unlabeled": canonical(data.unlabeled)}
        labels_record.update(corpus=corpus, label=label_settings)
        labels_dir = join(round_dir, "labels")
        labels = Stage(
            f"round_{it}/labels",
            labels_record,
            join(labels_dir, "stage.json"),
            [labels_dir],
            join(labels_dir, "manifest.json"),
            [model.name],
            floor=cfg.balance.threshold,
        )
        balance_record = {"stage": "balanced", "labels": labels.digest, "num_classes": len(classes)}
        balance_record["balance"] = OmegaConf.to_container(cfg.balance)
        balance_record["dedup"] = _dedup_record(cfg, data, sets) if cfg.dedup.enabled else None
        owned = [join(round_dir, n) for n in ("balanced", "balance_stats.json", "class_counts.png", "dedup")]
        balanced = Stage(
            f"round_{it}/balanced",
            balance_record,
            join(round_dir, "balance_stage.json"),
            owned,
            join(round_dir, "balance_stats.json"),
            [labels.name],
            resumable=False,
        )
        settings = train_settings(cfg.student, cfg.seed + it, arch)
        student_record = {"stage": "student", **data_record, "teacher": model.digest, "balanced": balanced.digest}
        student_record.update(settings=_training(settings), hard=cfg.label.hard)
        student_record["spec"] = dataclasses.asdict(specs[f"round_{it}/student"])
        student_record["student"] = {
            k: cfg.student[k] for k in ("init_from_teacher", "as_long_as_teacher")
        }  # the student-only keys that change training
        name = f"round_{it}/student"
        student = _model_stages(
            cfg, sets, name, join(round_dir, "student"), student_record, [model.name, balanced.name]
        )
        stages += [labels, balanced, *student]
        model = student[0]
    return stages


def check_stages(stages: list[Stage], overwrite: bool = False, dry_run: bool = False) -> list[str]:
    """Compare each stage's record with the run_dir (see the module docstring); returns one line per
    stage saying what the run will do with it (``reuse``, ``resume``, ``run``, ``redo``). Deletes what a
    run would delete first (stale stages with ``overwrite``, unfinished balancing or evaluation), unless
    ``dry_run`` (``noisy-student check``: nothing is changed).

    Raises:
        OutputMismatch: stale stages and ``overwrite`` false: names each, what changed, how to start fresh.
    """
    will_run: set[str] = set()
    lines, stale = [], []
    for st in stages:
        if st.exists() and not st.resumable and not st.finished():  # redone from scratch anyway
            if not dry_run:
                _delete(st, quiet=True)
            will_run.add(st.name)
            lines.append(f"{st.name}: run (unfinished before)")
            continue
        if not st.exists():
            will_run.add(st.name)
            lines.append(f"{st.name}: run")
            continue
        recorded = _read_record(st)
        floor = recorded.pop(FLOOR_KEY, None) if recorded else None
        rerun = [u for u in st.upstream if u in will_run]
        low = st.floor is not None and floor is not None and floor > st.floor
        if recorded != st.record or rerun or low:
            why = (
                "no record of its inputs (written by an older version)"
                if recorded is None
                else "; ".join(map(_readable, differences(recorded, st.record)))
                if recorded != st.record
                else f"it reads {', '.join(rerun)}, which will be made again"
                if rerun
                else f"balance.threshold {st.floor} is below {floor}, the confidence from which these predictions "
                "kept their image bytes: the predictions in between carry none, so students could not read them"
            )
            stale.append(f"{st.name}: {why}")
            will_run.add(st.name)
            lines.append(f"{st.name}: redo ({why})")
            if overwrite and not dry_run:
                _delete(st)
            continue
        if st.finished():
            lines.append(f"{st.name}: reuse (same inputs)")
        else:
            will_run.add(st.name)
            lines.append(f"{st.name}: resume (same inputs)")
    if stale and not overwrite:
        raise OutputMismatch(
            "the run_dir holds stages made from other inputs, and nothing has been computed:\n  "
            + "\n  ".join(stale)
            + "\nTo start fresh, use a new run_dir, or run again with --overwrite, which deletes the stages above "
            "(and only them) and makes them again."
        )
    return lines


# record keys whose values are digests, as a person reads a change in them
_DIGESTS = {
    "corpus": "the unlabeled corpus changed (files added, removed or rewritten since it was labeled)",
    "teacher": "its teacher is another model (made from other inputs)",
    "labels": "the labels it reads were made from other inputs",
    "balanced": "the balanced set it trains on was made from other inputs",
    "model": "the model it evaluates was made from other inputs",
}


def _readable(change: str) -> str:
    """A ``differences`` line, with a digest's change said in words."""
    key = change.split(":", 1)[0]
    return _DIGESTS.get(key, change)


def _delete(stage: Stage, quiet: bool = False) -> None:
    for path in [*stage.owns, stage.record_file]:
        delete_tree(path)
        delete_file(path)
    if not quiet:
        logger.info(f"--overwrite: deleted {stage.name}")


def start_stage(stage: Stage) -> None:
    """Record the stage's inputs as it starts (an interrupted stage resumes only with the same ones)."""
    if not exists(stage.record_file):
        floor = {FLOOR_KEY: stage.floor} if stage.floor is not None else {}
        write_json(stage.record_file, {**stage.record, **floor})
