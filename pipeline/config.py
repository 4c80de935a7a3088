"""The run configuration: typed dataclasses (the one place defaults live), YAML files that hold only
what differs, and command-line ``key=value`` overrides, merged and checked by OmegaConf structured
configs (what Hydra and torchtune use) before anything starts.

Layers, later ones win:

1. the dataclass defaults (:class:`RunConfig`; ``teacher``/``student`` are ``trainer.settings.TrainSettings``,
   ``label`` is ``labeler.api.LabelOptions``);
2. the config file, after the file named by its ``base:`` key (a shipped config's name such as ``digits``,
   or a path relative to the file), recursively;
3. the ``runlocal`` overlay (:data:`RUNLOCAL`) when ``runlocal`` is true in the file or on the command line;
4. command-line overrides: dotted keys, YAML values (``teacher.epochs=5``, ``data.test=null``,
   ``student.archs=[a,b]``).

The ``train:`` section holds training keys shared by teacher and student: each of ``teacher`` and
``student`` is ``train`` with its own section's keys on top within one layer, and later layers win
(``runlocal=true train.epochs=10`` trains teacher and student 10 epochs; ``student.epochs`` in the
same file as ``train.epochs`` beats it).

A config names a file (``path/to/mine.yaml``, used when it exists) or a config shipped in
``pipeline/configs/`` (``digits``, ``imagenet_jft``; ``configs/digits.yaml`` also finds the shipped one).
Wrong types, unknown keys (with a did-you-mean), values outside a choice and the rules between keys
raise :class:`ConfigError` naming the key path, before Ray starts.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from core.model import SPEC_FILE, ModelSpec, count_parameters, create_model, load_spec
from core.settings import choices_of, field_default, setting
from core.storage import exists, join
from labeler.api import LabelOptions
from labeler.dedup import DedupOptions
from trainer.settings import TrainSettings

__all__ = [
    "BalanceConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "RUNLOCAL",
    "RayConfig",
    "RunConfig",
    "StudentSettings",
    "TeacherSettings",
    "as_config",
    "check_model_sizes",
    "check_rules",
    "config_table",
    "load_config",
    "parameter_count",
    "resolve_config_path",
    "shipped_configs",
    "student_archs",
    "train_settings",
]

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
EVAL_BATCH = 256  # trainer.data.EVAL_BATCH (not imported: loading a config should not import torch)


class ConfigError(ValueError):
    """A config that cannot run: the message names the key path and what to change."""


@dataclass
class DataConfig:
    """The three splits and the model input (``data:``)."""

    labeled: str | None = setting(
        None, help="labeled class folders or Parquet; null (with unlabeled): the digits corpus"
    )
    unlabeled: str | None = setting(
        None, help="any corpus the labeler reads (folder tree, Parquet, .tar shards, manifest)"
    )
    test: str | None = setting(
        None,
        help="test class folders or Parquet, evaluated once per finished model and never selected on; "
        "null with the digits corpus: its test split",
    )
    val: str | None = setting(
        None, help="validation class folders or Parquet: selects each model's exported checkpoint (export: best)"
    )
    label_column: str = setting(
        "label",
        help="Parquet labeled sets (data.labeled, data.val, data.test, eval.extra): the column with the labels "
        "(class names, or class indices 0..K-1)",
    )
    val_fraction: float = setting(
        0.0,
        help="> 0 (and no data.val): carve this share of each class of data.labeled as validation, seeded; "
        "the carved images are not trained on",
    )
    root: str = setting("runs/data/digits", help="where the embedded digits corpus is written")
    labels_per_class: int = setting(5, help="digits corpus only: labeled images per class")
    test_fraction: float = setting(0.3, help="digits corpus only: share of each class held out for test")
    val_per_class: int = setting(
        10, help="digits corpus only: a val/ split of this many per class, taken from the unlabeled pool"
    )
    image_size: int = setting(32, help="model input size (stored in the checkpoint)")
    mean: list[float] = setting(default_factory=lambda: [0.5, 0.5, 0.5], help="input normalisation mean (per channel)")
    std: list[float] = setting(default_factory=lambda: [0.5, 0.5, 0.5], help="input normalisation std (per channel)")


@dataclass
class RayConfig:
    """The Ray cluster to join or start (``ray:``)."""

    address: str | None = setting(None, help="join this cluster; null: RAY_ADDRESS if set, else start a local one")
    num_cpus: int | None = setting(None, help="CPUs of a local cluster; null: all cores")


@dataclass
class BalanceConfig:
    """Confidence filter and per-class balancing (``balance:``; also ``noisy-student balance``'s options)."""

    enabled: bool = setting(True, help="false: confidence filter only, every passing prediction once (an ablation)")
    threshold: float = setting(0.3, help="keep predictions with confidence >= threshold (paper: 0.3)")
    per_class: int = setting(0, help="N rows per class; 0: the mean number of predictions per class")
    duplicate: bool = setting(True, help="fill small classes by duplicating rows; false only trims large ones")


@dataclass
class EvalConfig:
    """Evaluation of every trained model (``eval:``)."""

    extra: dict[str, str] = setting(
        default_factory=dict, help="more class-folder test sets for every model, e.g. {imagenet_a: s3://b/imagenet-a}"
    )
    batch_size: int = setting(EVAL_BATCH, help="images per evaluation batch (also the trainer's per-epoch validation)")


@dataclass
class TeacherSettings(TrainSettings):
    """The first teacher's settings: ``TrainSettings`` plus the class order of a supplied model (``teacher:``)."""

    classes: list[str] = setting(
        default_factory=list,
        help="with checkpoint: the class of each output of the supplied model, in order (a bare state dict "
        "does not say); its head is reordered into the labeled set's class order. Empty: the model.json's "
        "classes, or for a state dict the labeled set's order",
    )


@dataclass
class StudentSettings(TrainSettings):
    """A student's training settings: ``TrainSettings`` plus the per-round architectures (``student:``)."""

    archs: list[str] = setting(
        default_factory=list, help="student architecture of round i+1 (the last repeats); empty: the teacher's arch"
    )
    init_from_teacher: bool = setting(False, help="start each student from its teacher's weights (same arch needed)")
    as_long_as_teacher: bool = setting(
        True,
        help="the student trains on at least as many labeled images as its teacher did (labeled epochs >= the "
        "teacher's, as google-research/noisystudent trains students at least as long); its steps per epoch grow "
        "to reach that (not with steps_per_epoch set, nor after a supplied teacher that was not fine-tuned here)",
    )


@dataclass
class RunConfig:
    """The whole run (a ``noisy-student`` config); every default of every key is here or in the section classes."""

    run_dir: str = setting("runs/noisy_student", help="where everything is written (local or s3://)")
    seed: int = setting(0, help="seeds data splits, model init, augmentation and data order")
    iterations: int = setting(1, help="Noisy Student rounds (students trained; the paper's best: 3)")
    runlocal: bool = setting(False, help="merge the RUNLOCAL overlay (a quick plumbing check) under the overrides")
    allow_smaller_student: bool = setting(False, help="permit a student with fewer parameters than its teacher")
    data: DataConfig = setting(default_factory=DataConfig, help="")
    ray: RayConfig = setting(default_factory=RayConfig, help="")
    label: LabelOptions = setting(default_factory=LabelOptions, help="")
    balance: BalanceConfig = setting(default_factory=BalanceConfig, help="")
    dedup: DedupOptions = setting(default_factory=DedupOptions, help="")
    eval: EvalConfig = setting(default_factory=EvalConfig, help="")
    train: TrainSettings = setting(default_factory=TrainSettings, help="")
    teacher: TeacherSettings = setting(default_factory=TeacherSettings, help="")
    student: StudentSettings = setting(default_factory=StudentSettings, help="")


SECTION_HELP = {
    "data": "the three splits and the model input",
    "ray": "the Ray cluster",
    "label": "pseudo labeling (labeler.api.LabelOptions; the `labeler` command's options)",
    "balance": "confidence filter and per-class balancing",
    "dedup": "near-duplicates of evaluation images in the unlabeled corpus (labeler.dedup.DedupOptions; "
    "`labeler dedup`'s options)",
    "eval": "evaluation of every trained model (top-1/5, ECE, corruptions, flips)",
    "train": "training keys shared by teacher and student (trainer.settings.TrainSettings)",
    "teacher": "the first teacher: `train` plus these keys on top, and `classes`",
    "student": "every student: `train` plus these keys on top, and `archs`, `init_from_teacher`, `as_long_as_teacher`",
}

# big_vision-style switch: the same config, shrunk to a quick CPU plumbing check (accuracy meaningless).
# Merged after the config file and before command-line overrides, so `runlocal=true teacher.epochs=10` trains 10.
RUNLOCAL: dict = {
    "iterations": 1,
    "balance": {"per_class": 16},
    "teacher": {"epochs": 4, "checkpoint_every": 2},
    # 0: one pass over the shrunk pseudo set; the smallest student (the teacher's arch) for speed
    "student": {"epochs": 2, "checkpoint_every": 1, "steps_per_epoch": 0, "archs": []},
}

# keys a user may not set, and why (the loop sets them itself)
_RESERVED = {
    "train.seed": "set the top-level seed (the teacher trains with seed, round i's student with seed + i)",
    "teacher.seed": "set the top-level seed (the teacher trains with seed, round i's student with seed + i)",
    "student.seed": "set the top-level seed (the teacher trains with seed, round i's student with seed + i)",
    "student.arch": "the student's architecture is student.archs (one per round, the last repeats), e.g. "
    "student.archs=[resnet18]",
    "label.keep_image_bytes": "the loop always keeps the image bytes of predictions that pass balance.threshold",
    "label.image_bytes_min_confidence": "the loop keeps image bytes at balance.threshold",
}
# renamed keys: old name -> what to write instead
_RENAMED = {
    "label.soft": "label.hard (the opposite switch: label.soft=false is label.hard=true)",
    "balance.trim_only": "balance.duplicate=false",
}


# --- finding config files -------------------------------------------------------------------------------


def shipped_configs() -> list[str]:
    """Names of the configs shipped in ``pipeline/configs/`` (``digits``, ``imagenet_jft``)."""
    return sorted(f[: -len(".yaml")] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def resolve_config_path(ref: str, relative_to: str | None = None) -> str:
    """The file a config reference means: an existing path (relative to ``relative_to``'s folder if given,
    else to the working directory), else a shipped config's name (``digits``, ``digits.yaml`` and
    ``configs/digits.yaml`` all name the shipped one).

    Raises:
        ConfigError: when it is neither, listing the shipped names.
    """
    candidates = [ref]
    if relative_to and not os.path.isabs(ref):
        candidates.insert(0, os.path.join(os.path.dirname(relative_to), ref))
    for path in candidates:
        if os.path.isfile(path):
            return path
    name = os.path.basename(ref)
    name = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if name in shipped_configs() and os.path.dirname(ref) in ("", "configs"):
        return os.path.join(CONFIG_DIR, name + ".yaml")
    raise ConfigError(
        f"no config file {ref!r} and no shipped config of that name; give a path to a YAML file or one of "
        f"{', '.join(shipped_configs())}"
    )


def _read_layers(ref: str, relative_to: str | None = None, seen: tuple[str, ...] = ()) -> list[dict]:
    """The config file's mappings, its ``base:`` chain first."""
    path = os.path.abspath(resolve_config_path(ref, relative_to))
    if path in seen:
        raise ConfigError(f"config {path} names itself in its base: chain ({' -> '.join(seen)})")
    data = _load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a YAML mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return [data]
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a config name or a path, not {base!r}")
    return _read_layers(base, path, (*seen, path)) + [data]


def _load_yaml(path: str) -> Any:
    """The YAML value in the file at ``path``.

    Raises:
        ConfigError: the file is not valid YAML or not UTF-8 text, naming the file, line and column, the
            problem, and (for the most common one) what to do.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text ({err}); save the config as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else path
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        hint = ""
        if "'\\t'" in problem:  # PyYAML names a tab as '\t'
            hint = "; YAML indents with spaces only: replace the tab with spaces"
        raise ConfigError(f"{where}: not valid YAML: {problem}{hint}") from None


def _parse_override(item: str) -> dict:
    """``a.b=value`` -> ``{"a": {"b": value}}`` (the value parsed as YAML; empty means null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (for example teacher.epochs=5)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({problem}); quote it, e.g. {key}='\"...\"'"
        ) from None
    for part in reversed(key.strip().split(".")):
        if not part:
            raise ConfigError(f"override {item!r} has an empty key part")
        value = {part: value}
    return value


# --- merging and checking -----------------------------------------------------------------------------


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append(prefix + str(k))
            if k != "extra":
                out += _flat_keys(v, f"{prefix}{k}.")
    return out


def _schema_keys() -> list[str]:
    return _flat_keys(OmegaConf.to_container(OmegaConf.structured(RunConfig)))


def _explain(err: OmegaConfBaseException) -> ConfigError:
    """An OmegaConf error as a one-line message with the key path and, for unknown keys, a suggestion."""
    key = getattr(err, "full_key", None) or "?"
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, ConfigKeyError) or "not in" in first:
        if key in _RENAMED:
            return ConfigError(f"unknown config key {key!r}; it is now {_RENAMED[key]}")
        close = difflib.get_close_matches(key, _schema_keys(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; docs/configuration.md lists every key"
        return ConfigError(f"unknown config key {key!r}{hint}")
    return ConfigError(f"config key {key}: {first}")


def _merge(*layers: Any) -> Any:
    try:
        return OmegaConf.merge(*layers)
    except OmegaConfBaseException as err:
        raise _explain(err) from None


def _check_reserved(user: dict) -> None:
    for dotted, why in _RESERVED.items():
        section, key = dotted.split(".")
        if isinstance(user.get(section), dict) and key in user[section]:
            raise ConfigError(f"config key {dotted} cannot be set: {why}")


def _fold_train(layer: dict) -> dict:
    """One layer with ``teacher`` and ``student`` = its ``train`` keys, its own section keys on top.

    Folded per layer, before the layers merge: so a later layer's ``train.x`` beats an earlier layer's
    ``teacher.x`` (``runlocal=true train.epochs=10`` trains 10 epochs), and within one layer the
    section's own key beats ``train``. An ``lr`` a layer sets clears the ``lr_per_256`` of earlier layers.
    """
    folded = copy.deepcopy(layer)
    train = layer.get("train") or {}
    for where, keys in (("train", train), *((s, layer.get(s) or {}) for s in ("teacher", "student"))):
        if "lr" in keys and "lr_per_256" in keys:
            raise ConfigError(f"set {where}.lr or {where}.lr_per_256, not both (lr_per_256 computes lr)")
    for section in ("teacher", "student"):
        own = layer.get(section) or {}
        merged = {**copy.deepcopy(train), **copy.deepcopy(own)}
        if "lr" in own or ("lr" in train and "lr_per_256" not in own):  # an explicit lr beats lr_per_256
            merged["lr_per_256"] = None
        if merged:
            folded[section] = merged
    return folded


def _resolve(user: dict, layers: list[dict] | None = None) -> DictConfig:
    """Validate the merged user layers against :class:`RunConfig`, fold ``train`` into each layer, apply
    the cross-field rules. ``layers``: the layers ``user`` merges, in order (default: ``user`` alone)."""
    _check_reserved(user)
    for section in ("teacher", "student"):  # both set for one section, in any layers: which one is meant?
        if {"lr", "lr_per_256"} <= set(user.get(section) or {}):
            raise ConfigError(f"set {section}.lr or {section}.lr_per_256, not both (lr_per_256 computes lr)")
    schema = OmegaConf.structured(RunConfig)
    _merge(schema, user)  # types, unknown keys, choices: reported at the path the user wrote
    cfg = _merge(schema, *[OmegaConf.create(_fold_train(x)) for x in (layers or [user])])
    for section in ("train", "teacher", "student"):
        node = cfg[section]
        if node.lr_per_256 is not None:  # derived: lr for the section's batch size
            node.lr = node.lr_per_256 * node.batch_size / 256
    check_rules(cfg)
    return cfg


def load_config(config: str, overrides: list[str] | None = None) -> DictConfig:
    """The typed run config: ``config`` (a path or a shipped name) with its ``base:`` chain, the ``runlocal``
    overlay when on, then ``overrides`` (``key=value``).

    Returns a DictConfig backed by :class:`RunConfig` (attribute and item access; assignments are
    type-checked); ``OmegaConf.to_object`` turns it into a ``RunConfig``.

    Raises:
        ConfigError: unknown file or key, wrong type, value outside a choice, or a broken rule between keys.
    """
    layers = _read_layers(config)
    cli = [_parse_override(item) for item in overrides or []]
    user = OmegaConf.to_container(_merge(*[OmegaConf.create(x) for x in layers + cli]))
    runlocal = _merge(OmegaConf.structured(RunConfig), {"runlocal": user.get("runlocal", False)}).runlocal
    ordered = [*layers, RUNLOCAL, *cli] if runlocal else [*layers, *cli]
    user = OmegaConf.to_container(_merge(*[OmegaConf.create(x) for x in ordered]))
    return _resolve(user, [OmegaConf.to_container(OmegaConf.create(x)) for x in ordered])


def as_config(cfg: DictConfig | RunConfig | dict) -> DictConfig:
    """A checked copy of ``cfg``: a loaded config, a ``RunConfig`` or a plain dict of what differs from the defaults.

    A ``RunConfig`` object is read as the values in it that differ from the defaults, folded like a file
    (``train`` reaches teacher and student unless they differ from the default themselves; a section
    value equal to its default cannot beat ``train``: pass a dict for that).

    Raises:
        ConfigError: as :func:`load_config`.
    """
    if isinstance(cfg, DictConfig):  # already folded and derived: type-check and check the rules
        checked = _merge(OmegaConf.structured(RunConfig), cfg)
        check_rules(checked)
        return checked
    if isinstance(cfg, RunConfig):  # what differs from the defaults, folded like a file (train.* reaches both)
        cfg = _differences(OmegaConf.to_container(OmegaConf.structured(cfg)), _default_tree())
    return _resolve(copy.deepcopy(dict(cfg)))


def _default_tree() -> dict:
    return OmegaConf.to_container(OmegaConf.structured(RunConfig))


def _differences(values: dict, defaults: dict) -> dict:
    """The keys of ``values`` (nested) whose value is not the default's."""
    out = {}
    for key, value in values.items():
        base = defaults.get(key)
        if isinstance(value, dict) and isinstance(base, dict):
            if sub := _differences(value, base):
                out[key] = sub
        elif value != base:
            out[key] = value
    return out


def check_rules(cfg: DictConfig) -> None:
    """The rules between keys, checked once before anything runs.

    Raises:
        ConfigError: naming the keys and what to change.
    """
    data = cfg.data
    if bool(data.labeled) != bool(data.unlabeled):
        raise ConfigError("set both data.labeled and data.unlabeled, or neither (to use the embedded digits corpus)")
    if len(data.mean) != len(data.std):
        raise ConfigError(f"data.mean has {len(data.mean)} values and data.std {len(data.std)}; give one per channel")
    if not 0.0 <= data.val_fraction < 1.0:
        raise ConfigError(
            f"data.val_fraction must be in [0, 1) (0: no carved validation split), not {data.val_fraction}"
        )
    if cfg.iterations < 0:
        raise ConfigError(f"iterations must be >= 0, not {cfg.iterations}")
    if not 0.0 <= cfg.balance.threshold <= 1.0:
        raise ConfigError(f"balance.threshold must be in [0, 1], not {cfg.balance.threshold}")
    if cfg.balance.per_class < 0:
        raise ConfigError(f"balance.per_class must be >= 0 (0: the mean per class), not {cfg.balance.per_class}")
    if not 0 <= cfg.dedup.max_distance <= 32:
        raise ConfigError(
            f"dedup.max_distance must be within 0..32 (bits of 64), not {cfg.dedup.max_distance}: 8 (the default) "
            "suits photos, 2 images of about 8 px (docs/near-duplicates.md)"
        )
    if cfg.dedup.enabled and not cfg.label.phash:
        raise ConfigError(
            "dedup.enabled needs the perceptual hashes the labeler writes with label.phash; set label.phash=true, "
            "or dedup.enabled=false to train on the corpus without excluding near-duplicates of evaluation images"
        )
    if cfg.eval.batch_size < 1:
        raise ConfigError(f"eval.batch_size must be >= 1, not {cfg.eval.batch_size}")
    if cfg.label.num_actors < 1:
        raise ConfigError(f"label.num_actors must be >= 1, not {cfg.label.num_actors}")
    for section in ("teacher", "student"):
        try:
            train_settings(cfg[section], 0).validate(f"{section}.")
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if cfg.student.checkpoint or cfg.student.reset_classifier:
        raise ConfigError(
            "checkpoint and reset_classifier are the first teacher's (a supplied model): set teacher.checkpoint, "
            "not student.checkpoint or train.checkpoint; students always train"
        )
    if cfg.teacher.classes and not cfg.teacher.checkpoint:
        raise ConfigError(
            "teacher.classes names the outputs of a supplied model, in order; set teacher.checkpoint too, or "
            "remove teacher.classes (a teacher trained here predicts the labeled set's classes)"
        )
    if len(set(cfg.teacher.classes)) != len(cfg.teacher.classes):
        raise ConfigError("teacher.classes names a class twice; give each output's class once, in order")
    if cfg.student.init_from_teacher and cfg.student.pretrained:
        raise ConfigError(
            f"student.init_from_teacher=true starts each student from its teacher's weights, so "
            f"student.pretrained={cfg.student.pretrained!r} (set there or through train.pretrained) would be "
            "overwritten; for a pretrained start of the chain set teacher.pretrained, and student.pretrained=null"
        )
    if cfg.student.init_from_teacher:
        previous = ("teacher.arch", cfg.teacher.arch)
        for i, arch in enumerate(student_archs(cfg)):
            if arch != previous[1]:
                raise ConfigError(
                    f"student.init_from_teacher=true loads each teacher's weights into its student, so they need the "
                    f"same architecture, but {previous[0]} is {previous[1]} and student.archs[{i}] is {arch}. "
                    f"Set student.archs=[{cfg.teacher.arch}] or student.init_from_teacher=false."
                )
            previous = (f"student.archs[{i}]", arch)


def student_archs(cfg: DictConfig) -> list[str]:
    """The student architecture of each round (round i+1 uses element i); ``student.archs`` empty: the teacher's."""
    archs = list(cfg.student.archs) or [cfg.teacher.arch]
    return [archs[min(i, len(archs) - 1)] for i in range(cfg.iterations)]


def train_settings(section: DictConfig, seed: int, arch: str | None = None) -> TrainSettings:
    """The ``TrainSettings`` of a ``teacher``/``student`` section (the student-only keys left out)."""
    values = OmegaConf.to_container(section)
    names = {f.name for f in dataclasses.fields(TrainSettings)}
    values = {k: v for k, v in values.items() if k in names}
    values.update(seed=seed, **({"arch": arch} if arch else {}))
    values.pop("lr_per_256", None)  # lr is already derived from it (for this batch size)
    return TrainSettings(**values)


def parameter_count(arch: str, num_classes: int, image_size: int, in_chans: int = 3) -> int:
    """Parameters of a timm architecture, counted on the meta device (shapes only: no memory, even for 480M)."""
    import torch

    with torch.device("meta"):
        return count_parameters(create_model(ModelSpec(arch, [str(i) for i in range(num_classes)], image_size)))


def check_supplied_arch(cfg: DictConfig) -> None:
    """A supplied checkpoint folder keeps its own architecture: ``teacher.arch`` must name it, since the
    student's default, the size rule and ``init_from_teacher`` are all checked against ``teacher.arch``.

    Raises:
        ConfigError: naming both architectures and the setting to change.
    """

    folder = cfg.teacher.checkpoint
    if folder and exists(join(folder, SPEC_FILE)):
        arch = load_spec(folder).arch
        if arch != cfg.teacher.arch:
            raise ConfigError(
                f"teacher.checkpoint {folder} holds a {arch} model but teacher.arch is {cfg.teacher.arch}; "
                f"set teacher.arch={arch}"
            )


def check_model_sizes(cfg: DictConfig, num_classes: int) -> None:
    """Noisy Student's rule: every student is at least as large as its teacher (unless ``allow_smaller_student``).

    Raises:
        ConfigError: naming both architectures and their parameter counts.
    """
    check_supplied_arch(cfg)
    if cfg.allow_smaller_student:
        return
    teacher = ("teacher.arch", cfg.teacher.arch)
    sizes: dict[str, int] = {}
    for i, arch in enumerate(student_archs(cfg)):
        for a in (teacher[1], arch):
            if a not in sizes:
                sizes[a] = parameter_count(a, num_classes, cfg.data.image_size)
        if sizes[arch] < sizes[teacher[1]]:
            raise ConfigError(
                f"student.archs[{min(i, max(len(cfg.student.archs) - 1, 0))}] {arch} has {sizes[arch]:,} parameters, "
                f"fewer than its teacher ({teacher[0]} {teacher[1]}, {sizes[teacher[1]]:,}); Noisy Student needs an "
                "equal-or-larger student. Choose a larger student.archs entry, or set allow_smaller_student=true."
            )
        teacher = (f"student.archs[{i}]", arch)


# --- the configuration table (docs/configuration.md) ------------------------------------------------------


def _format_default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def _type_name(tp: Any) -> str:
    """``int``, ``float or null``, ``sgd/rmsprop/adamw`` (a choice), ``list[str]``."""

    choices = choices_of(tp)
    if choices:
        return "/".join(map(str, choices))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    return tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else str(tp).replace("typing.", "")


def config_table() -> str:
    """The table of docs/configuration.md (Markdown), from the dataclasses: every key, its type, default and help."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        cls = hints[f.name]
        if dataclasses.is_dataclass(cls):
            lines.append(f"| **`{f.name}`** | | | {SECTION_HELP[f.name]} |")
            sub = typing.get_type_hints(cls)
            fields = dataclasses.fields(cls)
            if f.name == "student":  # the TrainSettings keys are listed under train
                fields = [g for g in fields if g.name not in {t.name for t in dataclasses.fields(TrainSettings)}]
            elif f.name == "teacher":
                fields = [g for g in fields if g.name not in {t.name for t in dataclasses.fields(TrainSettings)}]
            for g in fields:
                text = g.metadata.get("help") or ""
                if f"{f.name}.{g.name}" in _RESERVED:
                    text += " (not a config key: the loop sets it)"
                lines.append(
                    f"| `{f.name}.{g.name}` | {_type_name(sub[g.name])} | `{_format_default(field_default(g))}` | "
                    f"{text.replace('|', '/')} |"
                )
        else:
            lines.append(
                f"| `{f.name}` | {_type_name(cls)} | `{_format_default(field_default(f))}` | "
                f"{f.metadata.get('help', '').replace('|', '/')} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m pipeline.config: print docs/configuration.md's table
    print(config_table())
