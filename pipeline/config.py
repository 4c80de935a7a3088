"""The one config system: a YAML file plus command-line ``key=value`` overrides.

Overrides use dotted keys (``teacher.epochs=5``) and YAML values (``data.test=null``,
``student.archs=[a,b]``). A key that is not in the file is an error, so a typo never
silently does nothing.
"""

from __future__ import annotations

import copy
import difflib

import yaml


def _flat_keys(cfg: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys += _flat_keys(v, prefix + k + ".")
    return keys


def apply_override(cfg: dict, item: str) -> None:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value (for example teacher.epochs=5)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            close = difflib.get_close_matches(key, _flat_keys(cfg), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"unknown config key {key!r}{hint}")
        if i == len(parts) - 1:
            node[part] = yaml.safe_load(raw) if raw != "" else None
        else:
            node = node[part]


def load_config(path: str, overrides: list[str] | None = None) -> dict:
    with open(path) as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a YAML mapping at the top level")
    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        apply_override(cfg, item)
    return cfg
