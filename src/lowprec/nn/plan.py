"""``plan(model, policy, example_inputs)``: every op one training step runs, with each operand's role and format.

>>> p = lp.plan(model, "mixed-bf16", (x,))
>>> print(p)                    # rich table: module, op, path, operands (role=format), backward, note
>>> p.unquantized               # the ops and parameters that ran in fp32, each with the reason
>>> p.to_json()                 # the same, as JSON

The plan converts a copy of ``model`` under ``policy`` (the original is untouched), runs one forward on
``example_inputs`` and one backward of the sum of its floating-point outputs, and records what the op-level
emulation and the swapped layers did: one row per op call site (module path, op name, call index), counting
repeated calls. An op is "op emulation" (intercepted and quantized), "layer swap" (a layer ``convert``
replaced) or "unquantized" with the reason (the policy keeps it in fp32, an op lowprec cannot quantize, a
parameter that reaches no quantized op). The warnings the conversion and the step raised are kept in ``warnings``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..policy import Policy, Role, as_policy
from .convert import convert
from .emulate import attach, emulation_of
from .records import OperandRecord, OpRecord
from .resolve import Resolution

__all__ = ["Plan", "plan"]
_GRADIENTS = frozenset(Role.select(gradient=True))


@dataclass
class Plan:
    """What one training step ran, op by op (see the module docstring)."""

    policy: str
    ops: list[OpRecord]
    warnings: list[str] = field(default_factory=list)

    @property
    def unquantized(self) -> list[OpRecord]:
        """The ops (and parameters) that ran with every tensor in fp32, with the reason in ``note``."""
        return [r for r in self.ops if not r.quantized]

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "ops": [asdict(r) | {"quantized": r.quantized} for r in self.ops],
                "warnings": list(self.warnings)}

    def to_json(self, indent: int | None = 2) -> str:
        """The plan as JSON: ``{"policy", "ops": [{module, op, path, operands: [{name, role, format}], note,
        calls, backward, quantized}], "warnings"}``."""
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> Any:
        """A ``rich.table.Table``: one row per op."""
        from rich.table import Table

        table = Table(title=f"precision plan: {self.policy}")
        for column in ("module", "op", "path", "forward: operand (role) = format",
                       "backward: gradient (role) = format", "bwd ran", "calls", "note"):  # role where not obvious
            table.add_column(column, overflow="fold")
        for r in self.ops:
            forward, backward = (", ".join(_show(o) for o in r.operands if (o.role in _GRADIENTS) == grads)
                                 for grads in (False, True))
            op = f"{r.op}[{r.index}]" if r.index else r.op
            table.add_row(r.module or "(root)", op, r.path, forward, backward, "yes" if r.backward else "-",
                          str(r.calls), r.note, style=None if r.quantized else "yellow")
        return table

    def __rich__(self) -> Any:
        return self.table()

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=200, record=True, file=_Null())
        console.print(self.table())
        for w in self.warnings:
            console.print(f"warning: {w}")
        return console.export_text()


#: Operand names whose role goes without saying (the plan shows the role of the others: a product's operands).
_OBVIOUS = {"input": "activation", "weight": "weight", "bias": "bias", "result": "output", "d result": "output_grad",
            "d input": "activation_grad", "d weight": "weight_grad", "d bias": "bias_grad"}


def _show(o: OperandRecord) -> str:
    return f"{o.name}={o.format}" if _OBVIOUS.get(o.name) == o.role else f"{o.name} ({o.role})={o.format}"


class _Null:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass


def _float_tensors(out: Any) -> Iterator[Tensor]:
    if isinstance(out, Tensor):
        if out.is_floating_point() and out.requires_grad:
            yield out
    elif isinstance(out, dict):
        for v in out.values():
            yield from _float_tensors(v)
    elif isinstance(out, (list, tuple)):
        for v in out:
            yield from _float_tensors(v)


def plan(model: nn.Module, policy: Policy | str, example_inputs: Any) -> Plan:
    """The precision plan of ``model`` under ``policy`` for ``example_inputs`` (a tensor or a tuple of forward
    arguments): one forward and backward of a converted copy; see the module docstring."""
    policy = as_policy(policy)
    if policy.path == "native":
        raise ValueError("lp.plan shows the emulated path; a native policy runs torch's own ops in its dtype "
                         f"(use the emulated version of {policy.name or policy.spec()!r}, without path=native)")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = convert(model, policy)
        emulation = emulation_of(converted) or attach(converted, Resolution(policy))
        emulation.records = {}
        try:
            outputs = list(_float_tensors(converted(*inputs)))
            if outputs:
                torch.stack([o.float().sum() for o in outputs]).sum().backward()
            records = list(emulation.records.values())
        finally:
            emulation.records = None
    modules = dict(converted.named_modules())
    for r in records:
        if r.path == "layer swap":
            r.backward = any(p.grad is not None for p in modules[r.module].parameters(recurse=False))
    for w in caught:  # the plan keeps lowprec's warnings; others go on as they came
        if not issubclass(w.category, UserWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    messages = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)))
    return Plan(policy.name or policy.spec() or "fp32", records, messages)
