"""The inputs of a run, checked before Ray starts: what can be known in seconds is never found after training.

:func:`check_inputs` reads every split's class set (class folders: the listing; Parquet: the label
column alone, ``trainer.data.read_class_set``), the supplied teacher's file and classes, and the
unlabeled corpus's format and files (``labeler.sources.plan_units``), and collects every problem
before raising one :class:`InputError` that lists them all. The rules:

* the labeled set has at least two classes, none of them empty, and every row has a label;
* labels are class names or class indices (whole numbers, also when stored as floats);
* the validation and test splits hold exactly the labeled set's classes; an ``eval.extra`` set may hold
  a subset (ImageNet-A style) but no class the labeled set lacks;
* a supplied teacher's file is real (not empty, not a Git LFS pointer), and its classes are the labeled
  set's, in any order (it is reordered), unless ``teacher.reset_classifier``; a bare state dict with
  class names that are numbers in text order gets a warning (``teacher.classes`` says the order);
* the unlabeled corpus exists, its format is known, and its Parquet files have the columns asked for.

``noisy-student check CONFIG`` prints the same report without running anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig

from core.checkpoint_import import STATE_DICT_SUFFIXES, head_width, text_order_warning, text_ordered_numbers
from core.model import SPEC_FILE, WEIGHTS_FILE, check_weights_file, load_spec
from core.storage import exists, join
from labeler.sources import plan_units, scratch_listing, unit_rows
from labeler.units import corpus_digest
from pipeline.split import Splits
from trainer.data import ClassSet, read_class_set

__all__ = ["CheckReport", "InputError", "check_inputs"]


class InputError(ValueError):
    """Inputs a run cannot use; the message lists every problem found, each naming the setting to change."""


@dataclass
class CheckReport:
    """What the checks found (``found``), what deserves attention (``warnings``) and what stops a run
    (``problems``), one line each; ``classes``: the labeled set's classes (None when unreadable); ``corpus``:
    the unlabeled corpus's ``plan_units`` result and ``corpus_digest`` its digest (None without rounds)."""

    found: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    classes: ClassSet | None = None
    corpus: tuple | None = None
    corpus_digest: str | None = None

    def text(self) -> str:
        """The report as a person reads it."""
        parts = [*self.found]
        parts += [f"WARNING: {w}" for w in self.warnings]
        parts += [f"PROBLEM: {p}" for p in self.problems]
        return "\n".join(parts)

    def raise_for_problems(self) -> None:
        """Raise :class:`InputError` listing every problem; log the warnings either way.

        Raises:
            InputError: there is at least one problem.
        """
        if self.problems:
            raise InputError(
                f"{len(self.problems)} problem(s) with the run's inputs; nothing was run:\n  "
                + "\n  ".join(self.problems)
            )


def _read(report: CheckReport, key: str, root: str, label_column: str) -> ClassSet | None:
    try:
        return read_class_set(root, label_column)
    except (OSError, ValueError) as err:  # OSError: missing, no permission, S3 access denied
        report.problems.append(f"{key}: {err}")
        return None


def _describe(key: str, cs: ClassSet) -> str:
    counts = list(cs.counts.values())  # an empty class shows as 0
    spread = f", {min(counts)}-{max(counts)} per class" if counts else ""
    kind = "class folders" if cs.kind == "folders" else "Parquet"
    return f"{key}: {cs.root} ({kind}): {cs.images} images in {len(cs.classes)} classes{spread}"


def _names(classes) -> str:
    classes = list(classes)
    return ", ".join(map(repr, classes[:10])) + (f" and {len(classes) - 10} more" if len(classes) > 10 else "")


def _check_labeled(report: CheckReport, root: str, label_column: str) -> ClassSet | None:
    cs = _read(report, "data.labeled", root, label_column)
    if cs is None:
        return None
    report.found.append(_describe("data.labeled", cs))
    if len(cs.classes) < 2:
        report.problems.append(
            f"data.labeled {root} holds {len(cs.classes)} class ({_names(cs.classes)}); a classifier needs at least "
            "two (one folder per class, or two label values)"
        )
    if cs.empty:
        where, fix = (
            ("class folders without images", "remove the folders")
            if cs.kind == "folders"
            else ("class indices that no row uses", "renumber the classes 0..K-1 without gaps")
        )
        report.problems.append(
            f"data.labeled {root}: classes {_names(cs.empty)} hold no images ({where}); add their images, or {fix}"
        )
    _check_unlabeled_rows(report, "data.labeled", cs, label_column)
    return cs


def _check_unlabeled_rows(report: CheckReport, key: str, cs: ClassSet, label_column: str) -> None:
    if cs.unlabeled:
        report.problems.append(
            f"{key} {cs.root}: {cs.unlabeled} of {cs.images + cs.unlabeled} rows have no label (null or NaN in "
            f"column {label_column!r}); label them or drop them"
        )
    if cs.unclassified:
        report.warnings.append(
            f"{key} {cs.root}: {cs.unclassified} files lie directly under it, in no class folder; they are not used"
        )


def _check_split(report: CheckReport, key: str, root: str, labeled: ClassSet, label_column: str, subset: bool):
    """A split's classes against the labeled set's: the same (``subset``: no class the labeled set lacks)."""
    cs = _read(report, key, root, label_column)
    if cs is None:
        return
    report.found.append(_describe(key, cs))
    _check_unlabeled_rows(report, key, cs, label_column)
    present = {c for c, n in cs.counts.items() if n}
    unknown, missing = sorted(present - set(labeled.classes)), sorted(set(labeled.classes) - present)
    if not present:
        report.problems.append(f"{key} {root} holds no images")
    elif unknown or (missing and not subset):
        parts = [f"classes the labeled set does not have: {_names(unknown)}"] if unknown else []
        parts += [f"no images of the labeled classes {_names(missing)}"] if missing and not subset else []
        hint = " (a label column of floats or integers names classes by index: 0..K-1)" if cs.kind == "parquet" else ""
        report.problems.append(
            f"{key} {root} has {'; '.join(parts)}; its classes must be those of data.labeled "
            f"({_names(labeled.classes)}){hint}"
        )


def _check_teacher(report: CheckReport, cfg: DictConfig, labeled: ClassSet) -> None:
    """A supplied teacher: a real file, and classes that are the labeled set's (or said to be reset)."""
    uri = cfg.teacher.checkpoint
    if not uri:
        return
    names = list(cfg.teacher.classes)
    try:
        if uri.endswith(STATE_DICT_SUFFIXES):
            check_weights_file(uri)
            source, what = names or None, "a bare state dict"
            outputs = head_width(uri, cfg.teacher.arch, len(labeled.classes))
        elif exists(join(uri, SPEC_FILE)):
            check_weights_file(join(uri, WEIGHTS_FILE))
            source, what = load_spec(uri).classes, "a checkpoint folder"
            outputs = len(source)
            if names and names != list(source):
                report.problems.append(
                    f"teacher.classes {_names(names)} differs from the classes {uri}/{SPEC_FILE} records for its "
                    "outputs; remove teacher.classes (the folder says its order)"
                )
        else:
            report.problems.append(
                f"teacher.checkpoint {uri} is neither a checkpoint folder (with {SPEC_FILE}) nor a state dict file "
                f"({', '.join(STATE_DICT_SUFFIXES)})"
            )
            return
    except (OSError, ValueError) as err:
        report.problems.append(f"teacher.checkpoint: {err}")
        return
    report.found.append(f"teacher.checkpoint: {uri} ({what}, {outputs} outputs)")
    if names and outputs is not None and len(names) != outputs:
        report.problems.append(
            f"teacher.classes names {len(names)} classes but {uri} has {outputs} outputs; name one class per output"
        )
    if outputs is not None and outputs != len(labeled.classes) and not cfg.teacher.reset_classifier:
        report.problems.append(
            f"teacher.checkpoint {uri} has a classifier for {outputs} classes, but the labeled set has "
            f"{len(labeled.classes)}; supply a model of these classes, or set teacher.reset_classifier=true to "
            "re-initialise its head and fine-tune it"
        )
        return
    if source is None:
        if text_ordered_numbers(labeled.classes):
            report.warnings.append(f"teacher.checkpoint: {text_order_warning(uri, labeled.classes)}")
        return
    if sorted(source) != sorted(labeled.classes) and not cfg.teacher.reset_classifier:
        report.problems.append(
            f"teacher.checkpoint {uri} predicts classes {_names(source)}, not the labeled set's "
            f"{_names(labeled.classes)}; supply a model of these classes, name its outputs with teacher.classes, or "
            "set teacher.reset_classifier=true to re-initialise its head and fine-tune it"
        )
    elif list(source) != list(labeled.classes) and sorted(source) == sorted(labeled.classes):
        report.found.append("  its outputs are the labeled classes in another order: its head is reordered")


def _check_corpus(report: CheckReport, cfg: DictConfig, unlabeled: str, listing: str | None) -> None:
    """The unlabeled corpus's format and files: its plan (``labeler.sources.plan_units``; a folder is listed
    into ``listing``, default a scratch file) and digest (``labeler.units.corpus_digest``) go to the report."""
    opts = cfg.label
    try:
        listing = listing or scratch_listing(unlabeled, opts.files_per_unit)
        plan = plan_units(unlabeled, opts.format, opts.image_column, opts.id_column, opts.files_per_unit, listing)
    except (OSError, ValueError) as err:
        report.problems.append(f"data.unlabeled: {err}")
        return
    fmt, units, _ = plan
    report.corpus, report.corpus_digest = plan, corpus_digest(fmt, units)
    rows = unit_rows(fmt, units)
    count = f"{rows} images in " if rows is not None else ""
    report.found.append(f"data.unlabeled: {unlabeled} ({fmt}): {count}{len(units)} input units")


def check_inputs(
    cfg: DictConfig, data: Splits, listing: str | None = None, report: CheckReport | None = None
) -> CheckReport:
    """Every check of the module docstring on a run's splits (``pipeline.loop.split_paths``'s ``data``).

    The unlabeled corpus is planned as the labeler reads it (a folder is listed into ``listing``, default a
    scratch file); the plan and its digest are in the report (``corpus``, ``corpus_digest``) for the run to
    label from. Returns the report (``report``, filled in, when given); call
    :meth:`CheckReport.raise_for_problems` to stop on problems.
    """
    report = report if report is not None else CheckReport()
    column = cfg.data.label_column
    labeled = _check_labeled(report, data.classes_from, column)
    report.classes = labeled
    if labeled is not None:
        if data.val and not data.carve:
            _check_split(report, "data.val", data.val, labeled, column, subset=False)
        if data.test:
            _check_split(report, "data.test", data.test, labeled, column, subset=False)
        for name, root in cfg.eval.extra.items():
            _check_split(report, f"eval.extra.{name}", root, labeled, column, subset=True)
        _check_teacher(report, cfg, labeled)
    if cfg.iterations > 0:
        _check_corpus(report, cfg, data.unlabeled, listing)
    return report
