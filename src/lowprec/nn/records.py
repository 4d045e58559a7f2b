"""What the precision plan records of one op: its operands' roles and formats, how it ran, and why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..policy import Quantizer

__all__ = ["OperandRecord", "OpRecord"]


@dataclass(frozen=True)
class OperandRecord:
    """One tensor of an op as the plan shows it: its name, role and format (``fp32`` with ``quantized`` False:
    the role is not quantized; the policy may also round a role to the fp32 format, which is exact)."""

    name: str
    role: str
    format: str
    quantized: bool = False

    @classmethod
    def of(cls, name: str, role: str, quantizer: Quantizer) -> OperandRecord:
        """The record of a tensor ``name`` rounded by ``quantizer`` in ``role`` (``fp32`` where it is disabled)."""
        return cls(name, role, str(quantizer.quant) if quantizer.enabled else "fp32", quantizer.enabled)


@dataclass
class OpRecord:
    """One op a forward ran (every call of the same op at the same place counted once, in ``calls``).

    ``index``: which call of ``op`` in one forward of ``module`` (MultiheadAttention runs linear 0 and 1);
    ``path``: "op emulation" (intercepted and quantized), "layer swap" (a converted layer), "unquantized"
    (``note`` says why); ``backward``: whether its quantized backward ran.
    """

    module: str
    op: str
    path: str
    operands: list[OperandRecord]
    note: str = ""
    calls: int = 0
    backward: bool = False
    index: int = 0  # the how-manieth call of this op in one forward of the module (0: the first)

    @property
    def quantized(self) -> bool:
        return any(o.quantized for o in self.operands)
