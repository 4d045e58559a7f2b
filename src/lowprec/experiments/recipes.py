"""Recipes: a precision policy plus the model/training changes that go with it.

A recipe is written as ``PRESET[+key=value,...]`` or a path to a TOML file:

* ``int8-lazy``                          a policy preset as it is
* ``mixed-fp16+loss_scale=static:8``     a preset with policy roles/settings changed (read by ``Policy.parse``,
                                         the one parser of ``PRESET+...`` that lowprec.convert shares)
* ``wrpn-4-4+width=2``                   model arguments (``width``) and training settings (``lr``,
                                         ``epochs``, ``batch_size``, ``loss_multiplier``) are recognised
* ``weight=fp16,grads=fp16``             no preset: a policy string (``Policy.parse``)
* ``recipes/my.toml``                    ``label = "..."``, ``preset = "..."`` or ``policy = "..."``,
                                         and optional tables ``[policy_roles]``, ``[model]``, ``[train]``,
                                         ``[overrides.PATTERN]`` (roles of the modules or ops PATTERN
                                         selects, e.g. ``[overrides."op:attention"]``, ``[overrides.head]``)
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..policy import Policy
from ..policy.policy import split_top
from ..policy.presets import PRESETS, is_preset
from .validate import check_value

__all__ = ["Recipe", "parse_recipe", "MODEL_KEYS", "TRAIN_KEYS"]

MODEL_KEYS = {"width": float}
TRAIN_KEYS = {"lr": float, "epochs": int, "batch_size": int, "loss_multiplier": float, "momentum": float,
              "weight_decay": float}
#: Longest recipe text an error message repeats whole; a longer one is shown by its start and its length.
SHOWN = 80


def shown(text: str) -> str:
    """``text`` quoted for an error message, cut to its first ``SHOWN`` characters if longer."""
    return repr(text) if len(text) <= SHOWN else f"{text[:SHOWN]!r}... ({len(text):,} characters)"


@dataclass(frozen=True)
class Recipe:
    """A labelled policy with model and training overrides."""

    label: str
    policy: Policy
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


def _split(assignments: dict[str, Any]) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """The ``key=value`` assignments of a recipe: (policy items ``key=value`` for ``Policy.parse``, model
    arguments, training settings), the last two checked (``validate.check_value``)."""
    policy, model, train = [], {}, {}
    for key, value in assignments.items():
        if key in MODEL_KEYS:
            model[key] = check_value(key, value)
        elif key in TRAIN_KEYS:
            train[key] = check_value(key, value)
        else:
            policy.append(f"{key}={value}")
    return policy, model, train


def _with(policy: Policy, roles: dict[str, Any]) -> Policy:
    return policy.with_roles(**roles) if roles else policy


def parse_recipe(text: str) -> Recipe:
    """Parse a recipe string or TOML file path (see the module docstring); ValueError on anything else."""
    if not isinstance(text, str):
        raise ValueError(f"a recipe is a string (preset, PRESET+key=value,..., policy string or .toml path), got "
                         f"{type(text).__name__}")
    text = text.strip()
    if text.endswith(".toml"):
        return _from_toml(Path(text))
    head, plus, tail = text.partition("+")
    try:
        if is_preset(head):
            items = split_top(tail, ",")
            if plus and (not items or any("=" not in item for item in items)):
                raise ValueError("expected key=value,... after '+'")
            assignments = dict((part.strip() for part in item.split("=", 1)) for item in items)
            policy, model, train = _split(assignments)
            return Recipe(text, Policy.parse(head + ("+" + ",".join(policy) if policy else "")), model, train)
        if "=" not in text:
            raise ValueError(f"unknown recipe: give a preset ({', '.join(PRESETS)}, wrpn-<w>-<a>, dfx-<p>-<u>), "
                             "PRESET+key=value,..., a policy string (weight=int8,...) or a .toml file")
        return Recipe(text, Policy.parse(text))
    except ValueError as err:
        raise ValueError(f"recipe {shown(text)}: {_shortened(str(err))}") from None


def _shortened(message: str) -> str:
    """``message`` with every quoted value longer than ``SHOWN`` characters cut (the parsers quote what they
    were given, and a recipe can be any length)."""
    return re.sub(rf"'([^']{{{SHOWN + 1},}})'", lambda m: shown(m.group(1)), message)

def _from_toml(path: Path) -> Recipe:
    if not path.exists():
        raise FileNotFoundError(f"recipe file not found: {path}")
    if not path.is_file():
        raise ValueError(f"recipe {path} is not a file (a folder?): give the path of a .toml file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    try:
        return _recipe_from(data, path.stem)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _recipe_from(data: dict[str, Any], stem: str) -> Recipe:
    """The recipe a TOML document describes (see the module docstring); ValueError naming a bad key or value."""
    unknown = set(data) - {"label", "preset", "policy", "policy_roles", "overrides", "model", "train"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; a recipe has label, preset or policy, and the tables "
                         "[policy_roles], [overrides], [model], [train]")
    if ("preset" in data) == ("policy" in data):
        raise ValueError("give exactly one of 'preset' or 'policy'")
    for key in ("label", "preset", "policy"):
        if key in data and not (isinstance(data[key], str) and data[key].strip()):
            raise ValueError(f"{key} must be a non-empty string, got {data[key]!r}")
    tables = {key: data.get(key, {}) for key in ("policy_roles", "overrides", "model", "train")}
    for key, table in tables.items():
        if not isinstance(table, dict):
            raise ValueError(f"{key} must be a table ([{key}]), got {table!r}")
    for role, value in tables["policy_roles"].items():
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"[policy_roles] {role} must be a string or a number, got {value!r}")
    for name, known in (("model", MODEL_KEYS), ("train", TRAIN_KEYS)):
        unknown = set(tables[name]) - set(known)
        if unknown:
            raise ValueError(f"unknown keys in [{name}]: {sorted(unknown)}; [model] takes {', '.join(MODEL_KEYS)}, "
                             f"[train] takes {', '.join(TRAIN_KEYS)}")
    if "preset" in data and not is_preset(data["preset"]):
        raise ValueError(f"unknown preset {shown(data['preset'])}; presets: {', '.join(PRESETS)}, wrpn-<w>-<a>")
    policy = Policy.preset(data["preset"]) if "preset" in data else Policy.parse(data["policy"])
    policy = _with(policy, dict(tables["policy_roles"]))
    for pattern, roles in tables["overrides"].items():
        if not isinstance(roles, dict):
            raise ValueError(f'[overrides] takes tables of role = format, e.g. [overrides."op:attention"] '
                             f'activations = "bf16"; got {pattern} = {roles!r}')
        policy = policy.override(pattern, **roles)
    _, model, train = _split({**tables["model"], **tables["train"]})
    return Recipe(data.get("label", stem), policy, model, train)
