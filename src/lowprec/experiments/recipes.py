"""Recipes: a precision policy plus the model/training changes that go with it.

A recipe is written as ``PRESET[+key=value,...]`` or a path to a TOML file:

* ``int8-lazy``                          a policy preset as it is
* ``mixed-fp16+loss_scale=static:8``     a preset with policy roles/settings changed (read by ``Policy.parse``,
                                         the one parser of ``PRESET+...`` that lowprec.convert shares)
* ``wrpn-4-4+width=2``                   model arguments (``width``) and training settings (``lr``,
                                         ``epochs``, ``batch_size``, ``loss_multiplier``) are recognised
* ``weight=fp16,grads=fp16``             no preset: a policy string (``Policy.parse``)
* ``recipes/my.toml``                    ``label = "..."``, ``preset = "..."`` or ``policy = "..."``,
                                         and optional tables ``[policy_roles]``, ``[model]``, ``[train]``
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..policy import Policy
from ..policy.policy import split_top
from ..policy.presets import PRESETS, is_preset

__all__ = ["Recipe", "parse_recipe", "MODEL_KEYS", "TRAIN_KEYS"]

MODEL_KEYS = {"width": float}
TRAIN_KEYS = {"lr": float, "epochs": int, "batch_size": int, "loss_multiplier": float, "momentum": float,
              "weight_decay": float}


@dataclass(frozen=True)
class Recipe:
    """A labelled policy with model and training overrides."""

    label: str
    policy: Policy
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


def _split(items: list[str]) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """The ``key=value`` items after a preset's '+': (policy items, model settings, training settings)."""
    policy, model, train = [], {}, {}
    for item in items:
        key, _, value = (part.strip() for part in item.partition("="))
        if key in MODEL_KEYS:
            model[key] = MODEL_KEYS[key](value)
        elif key in TRAIN_KEYS:
            train[key] = TRAIN_KEYS[key](value)
        else:
            policy.append(item)
    return policy, model, train


def _with(policy: Policy, roles: dict[str, Any]) -> Policy:
    return policy.with_roles(**roles) if roles else policy


def parse_recipe(text: str) -> Recipe:
    """Parse a recipe string or TOML file path (see the module docstring); ValueError on anything else."""
    text = text.strip()
    if text.endswith(".toml"):
        return _from_toml(Path(text))
    head, plus, tail = text.partition("+")
    if is_preset(head):
        items = split_top(tail, ",")
        if plus and (not items or any("=" not in item for item in items)):
            raise ValueError(f"recipe {text!r}: expected key=value,... after '+'")
        policy, model, train = _split(items)
        return Recipe(text, Policy.parse(head + ("+" + ",".join(policy) if policy else "")), model, train)
    if "=" not in text:
        raise ValueError(
            f"unknown recipe {text!r}: give a preset ({', '.join(PRESETS)}, wrpn-<w>-<a>, dfx-<p>-<u>), "
            "PRESET+key=value,..., a policy string (weight=int8,...) or a .toml file"
        )
    return Recipe(text, Policy.parse(text))


def _from_toml(path: Path) -> Recipe:
    if not path.exists():
        raise FileNotFoundError(f"recipe file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    if ("preset" in data) == ("policy" in data):
        raise ValueError(f"{path}: give exactly one of 'preset' or 'policy'")
    policy = Policy.preset(data["preset"]) if "preset" in data else Policy.parse(data["policy"])
    policy = _with(policy, dict(data.get("policy_roles", {})))
    unknown = set(data.get("model", {})) - set(MODEL_KEYS) | set(data.get("train", {})) - set(TRAIN_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; model: {list(MODEL_KEYS)}, train: {list(TRAIN_KEYS)}")
    return Recipe(data.get("label", path.stem), policy, dict(data.get("model", {})), dict(data.get("train", {})))
