"""Shared test harness: log every aten GEMM, convolution and fused attention call (operands and phase) and check
each operand lies on its role's number grid."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
GEMMS = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default, aten.convolution.default,
         aten.convolution_backward.default}
FUSED = ("attention", "transformer", "multi_head")  # aten names of fused attention / transformer kernels
GRIDS = {"bf16": [torch.bfloat16], "e4m3": [torch.float8_e4m3fn], "e5m2": [torch.float8_e5m2], "int8": ["int8"]}


class GemmLog(TorchDispatchMode):
    """Every aten GEMM, convolution and attention call (and of the aten ops in ``also``), with its floating-point
    operands and the phase."""

    def __init__(self, also: tuple = ()) -> None:
        super().__init__()
        self.phase = "forward"
        self.also = set(also)
        self.calls: list[tuple[str, str, list[torch.Tensor]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if func in GEMMS or func in self.also or any(fused in name for fused in FUSED):
            operands = [a.detach().clone() for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            self.calls.append((self.phase, name, operands))
        return func(*args, **(kwargs or {}))


def on_int8_grid(x: torch.Tensor) -> bool:
    """Whether x is an 8-bit integer times one power of two (dynamic fixed point dfx<8>, any exponent)."""
    peak = x.abs().max()
    if peak == 0:
        return True
    finest = torch.exp2(torch.ceil(torch.log2(peak / 128)))  # two's complement: -128 * step is on the grid
    for step in (finest, 2 * finest):
        scaled = x / step
        if (scaled == scaled.round()).all() and scaled.min() >= -128 and scaled.max() <= 127:
            return True
    return False


def on_grid(x: torch.Tensor, dtypes: list) -> bool:
    """Whether every element of x is exactly representable in one of the grids (torch dtypes or "int8")."""
    return any(on_int8_grid(x) if d == "int8" else bool((x == x.to(d).float()).all()) for d in dtypes)


def grids_of(formats: str) -> list:
    """The grids of "|"-separated format names, e.g. "e4m3|e5m2"."""
    return sum((GRIDS[f] for f in formats.split("|")), [])


def log_forward_backward(forward: Callable[[], torch.Tensor]) -> GemmLog:
    """Run forward() and the backward of a fixed non-uniform weighting of its output, logging both phases."""
    with GemmLog() as log:
        y = forward()
        log.phase = "backward"
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return log


def off_grid(log: GemmLog, forward: str, backward: str) -> list[tuple[str, str, int]]:
    """(phase, op, operand index) of every logged operand off the grids of its phase's formats."""
    grids = {"forward": grids_of(forward), "backward": grids_of(backward)}
    return [(phase, op, i) for phase, op, operands in log.calls for i, t in enumerate(operands)
            if not on_grid(t, grids[phase])]
