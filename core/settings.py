"""Settings dataclasses shared by the Python API, the YAML config and the command line.

A setting is a dataclass field made with :func:`setting`: its name, type, default and help text are
written once, and the labeler's command-line options (:func:`add_arguments`), the loop's typed
config (``pipeline.config``, OmegaConf structured configs) and docs/configuration.md's table are all
generated from it. ``Literal[...]`` types are the allowed values of a choice (OmegaConf checks them
when a config is loaded; :func:`check_choices` checks objects built in Python).

Why our own ~80 lines and not a library (simple-parsing, tyro, jsonargparse): the labeler is meant
to install and run on its own with few dependencies, and OmegaConf (the loop's config library)
builds no argparse parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, Union

__all__ = ["setting", "add_arguments", "from_args", "check_choices", "choices_of", "field_default"]


def setting(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help text in ``metadata["help"]`` (shown by ``--help`` and docs/configuration.md)."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def field_default(f: dataclasses.Field) -> Any:
    """The field's default value (calling its ``default_factory`` when it has one)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """``Optional[X]`` / ``X | None`` -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def choices_of(tp: Any) -> tuple | None:
    """The allowed values of a ``Literal[...]`` (or optional ``Literal``) type, else None."""
    tp, _ = _unwrap(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def check_choices(obj: Any, where: str = "") -> None:
    """Check every ``Literal``-typed field of the dataclass instance ``obj``.

    Raises:
        ValueError: naming ``<where><field>``, the value and the allowed values.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        choices, (_, optional) = choices_of(hints[f.name]), _unwrap(hints[f.name])
        value = getattr(obj, f.name)
        if choices and value not in choices and not (optional and value is None):
            raise ValueError(f"{where}{f.name} must be one of {', '.join(map(str, choices))}, not {value!r}")


def add_arguments(parser: argparse.ArgumentParser, cls: type, only: tuple[str, ...] | None = None) -> None:
    """Add one ``--option-name`` per field of the dataclass ``cls`` (or of the fields in ``only``).

    ``int``/``float``/``str`` fields (optional or not) take a value, ``Literal`` fields take one of their
    values, ``bool`` fields become ``--name`` / ``--no-name``. The option's dest is the field name.

    Raises:
        TypeError: for a field type with no command-line form (say how to give it one).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        tp, _ = _unwrap(hints[f.name])
        default = field_default(f)
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata.get("help", "").replace("%", "%%")
        choices = choices_of(tp)
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif choices:
            parser.add_argument(flag, dest=f.name, choices=choices, default=default, help=text)
        elif tp in (int, float, str):
            parser.add_argument(flag, dest=f.name, type=tp, default=default, help=f"{text} (default: {default})")
        else:
            raise TypeError(
                f"{cls.__name__}.{f.name} has type {hints[f.name]!r}, which has no command-line form; "
                "use int, float, str, bool or Literal, or pass only= to add_arguments without it"
            )


def from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """An instance of ``cls`` from the parsed options :func:`add_arguments` added (plus ``extra`` fields)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **extra})
