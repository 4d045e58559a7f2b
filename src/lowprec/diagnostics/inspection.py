"""``lp.inspect(model, batch, policy)``: what a policy's formats would do to a model's numbers, before training.

The model is converted under the policy (a deep copy: the caller's model is untouched, and conversion warns
as it would for training, e.g. about the classifier rule), then trained for ``steps`` steps in float32 with
every quantizer of every converted layer replaced by a recorder: each role's tensor, exactly where the layer
would round it (its input x, weight W, bias b, output z in forward; dE/dz, dE/dx, dE/dW, dE/db in backward),
goes into a census (``census.py``) and on unchanged. So does each operand of every op the op-level emulation
quantizes outside the converted layers (attention products, functional ops, norms: ``lowprec.nn.emulate``),
recorded under its call site, ``module:op[index]`` (``.scores`` / ``.out`` for an attention's two products),
with the role it has there and its blocks where that op's call runs them (its reduction dimension); an
elementwise op's census holds only its parameter's roles, the ones it quantizes. After each optimizer step its
buffers (momentum, Adam's moments) are censused as the parameter's layer's ``optimizer_state``. Nothing is
stored but the counts.

The gradients are recorded unscaled (the loss is not multiplied): the census counts them at every loss scale
2**k at once, as MPT Fig. 3 shows the float32 histogram against the fp16 range. The values are those of
float32 training; in a low-precision run each layer's input has itself been rounded, so the counts describe
the formats' first-order effect, not a low-precision run's exact tensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..formats import Format, parse_format
from ..nn import QuantizedModule, convert, emulation_of
from ..nn.resolve import recorded_resolution
from ..policy import LAYER_ROLES, Policy, Quant, Quantizer, Role, as_policy
from ..train import cross_entropy
from .advice import GRADIENT_ROLES, LossScaleAdvice, advise_loss_scale, start_exponents
from .blocks import Rounding
from .census import LOG2_MIN, Census, census

__all__ = ["ROLES", "Entry", "InspectReport", "inspect"]

#: The roles an inspection records, in table order.
ROLES = LAYER_ROLES + (Role.OPTIMIZER_STATE.value,)

Batch = tuple[Any, Tensor]


@dataclass(frozen=True)
class Entry:
    """The census of one role of one module; ``format`` is the policy's format for it (None: float32)."""

    module: str
    role: str
    format: str | None
    census: Census


class _Recorder(Quantizer):
    """A role's quantizer while inspecting: hands every tensor to ``record`` and returns it unchanged (no
    straight-through masking: the run is plain float32)."""

    def __init__(self, record: Callable[[Tensor, int | None], None]):
        super().__init__(None)
        self._record = record

    @property
    def enabled(self) -> bool:  # the layer must call it even for roles the policy leaves in float32
        return True

    def __call__(self, x: Tensor, axis: int | None = None) -> Tensor:
        self._record(x, axis)
        return x

    def round(self, x: Tensor) -> Tensor:
        return x


def cross_entropy_loss(model: nn.Module, batch: Batch) -> Tensor:
    """The default loss: ``lowprec.train.cross_entropy`` of ``model(*inputs)`` (in float32) against ``labels``
    (one per example, or one per position of a language model: classes in the last dimension). ValueError
    saying to pass ``loss_fn=`` when it cannot score the model's output (a tuple, labels of another shape)."""
    try:
        inputs, labels = batch
    except (TypeError, ValueError):
        raise ValueError(
            f"lp.inspect's default loss takes each batch as (inputs, labels), got {type(batch).__name__}; pass "
            "loss_fn=, a function (model, batch) -> scalar loss, for batches of another form"
        ) from None
    inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    out = model(*inputs)
    try:
        return cross_entropy(out, labels)
    except (RuntimeError, ValueError, IndexError, TypeError, AttributeError) as err:
        shown = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else f"a {type(out).__name__}"
        labels_shown = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(
            f"lp.inspect's default loss, cross-entropy of model(*inputs) (classes in the last dimension) against "
            f"labels, cannot score this model's output ({shown}) against labels {labels_shown}: {err}. Pass "
            "loss_fn=, a function (model, batch) -> scalar loss; e.g. for (batch, classes, time) logits: "
            "loss_fn=lambda m, b: F.cross_entropy(m(b[0]).float(), b[1])"
        ) from err


class _Sums:
    """Running censuses per (module, role), in first-seen order."""

    def __init__(self, extra: Sequence[Format], observe: Callable[[str, str, Tensor], None] | None):
        self.extra, self.observe = extra, observe
        self.entries: dict[tuple[str, str], tuple[str | None, Census]] = {}

    def recorder(self, module: str, role: str, quant: Quant | None,
                 block_axis: int | None = None) -> Callable[[Tensor, int | None], None]:
        """``record(x, axis=None)``: add x's census to (module, role); scaled formats blocked as the quantizer's
        call with that ``axis`` would block them."""
        fmt = None if quant is None else repr(quant.format)
        fmts = list(dict.fromkeys(([quant.format] if quant else []) + list(self.extra)))

        def record(x: Tensor, axis: int | None = None) -> None:
            if self.observe is not None:
                self.observe(module, role, x.detach())
            _, total = self.entries.get((module, role), (fmt, Census()))
            self.entries[module, role] = (fmt, total + census(x, fmts, axis=axis, block_axis=block_axis))

        return record


def _record_layers(model: nn.Module, sums: _Sums) -> dict[str, Quant | None]:
    """Swap every converted layer's quantizers for recorders; returns the optimizer_state format of every module
    whose optimizer state is recorded: each weight layer of the model's plan gets its resolved format, as the
    Trainer stores it (``nn.resolve.Resolution.update_policies``), the other converted layers fp32."""
    state_formats: dict[str, Quant | None] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedModule):
            module.quantizers = {role: _Recorder(sums.recorder(name, role, q.quant, q.block_axis))
                                 for role, q in module.quantizers.items() if role in LAYER_ROLES}
            module.accumulator = None  # float32 accumulation
            state_formats[name] = None
    plan = recorded_resolution(model)
    if plan is not None:
        state_formats.update((n, p.get("optimizer_state")) for n, p in plan.update_policies(model).items())
    return state_formats


def _record_ops(model: nn.Module, sums: _Sums) -> None:
    """Let the op-level emulation (attention products, functional ops: ``lowprec.nn.emulate``) of ``model`` run
    its ops in float32 with recorders for quantizers, as the swapped layers do: each op call site's roles
    censused under the site's name (an elementwise op: only the roles it quantizes, its parameter's)."""
    emulation = emulation_of(model)
    if emulation is None:
        return

    def recorder(site: str, role: str, quant: Quant | None, kind: str) -> Quantizer | None:
        if quant is None and kind == "elementwise":
            return None  # the op itself is float32: nothing of it is rounded
        return _Recorder(sums.recorder(site, role, quant))

    emulation.observe_only = True  # no straight-through masks, no exponent statistics
    emulation.make_quantizer = recorder


def inspect(
    model: nn.Module,
    batch: Batch | Sequence[Batch],
    policy: Policy | str = "fp32",
    *,
    steps: int = 3,
    formats: Iterable[Format | str] = (),
    loss_fn: Callable[[nn.Module, Batch], Tensor] = cross_entropy_loss,
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    max_lost: float = 1e-3,
    observe: Callable[[str, str, Tensor], None] | None = None,
) -> InspectReport:
    """Train a float32 copy of ``model`` for ``steps`` steps and census every role of every converted layer
    (module docstring) in its ``policy`` format and in each of ``formats``.

    ``batch``: ``(inputs, labels)`` (inputs a tensor or a tuple of tensors), or a list of them used in turn.
    ``loss_fn(model, batch)``: default cross-entropy with the classes in dimension 1 (``cross_entropy_loss``,
    which raises ValueError naming ``loss_fn=`` when it cannot score the model's output: pass your own for a
    sequence model or batches of another form). ``policy``: a Policy, preset name, policy string or
    ``PRESET+role=format,...``. ``optimizer(parameters)``: default lowprec's SGD with
    lr 0.01 and momentum 0.9. ``max_lost``: the share of non-zero gradients the loss-scale advice may lose.
    ``observe(module, role, tensor)``, if given, sees every recorded tensor (e.g. to keep some for analysis).
    """
    from ..train import SGD

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    pol = as_policy(policy)
    batches = list(batch) if isinstance(batch, list) else [batch]
    work = convert(model, replace(pol, path="emulated") if getattr(pol, "path", "emulated") != "emulated" else pol)
    sums = _Sums([parse_format(f) if isinstance(f, str) else f for f in formats], observe)
    state_formats = _record_layers(work, sums)
    _record_ops(work, sums)
    opt = optimizer(work.parameters()) if optimizer else SGD(work.parameters(), lr=0.01, momentum=0.9)
    owners = {p: name.rpartition(".")[0] for name, p in work.named_parameters()}
    work.train()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(work, batches[step % len(batches)]).backward()
        opt.step()
        for p, state in opt.state.items():
            owner = owners.get(p)
            if owner not in state_formats:
                continue
            record = sums.recorder(owner, "optimizer_state", state_formats[owner])
            for buffer, value in sorted(state.items()):
                if buffer != "step" and isinstance(value, Tensor) and value.is_floating_point():
                    record(value)
    order = {name: i for i, (name, _) in enumerate(work.named_modules())}
    seen: dict[str, int] = {}  # an op site after its module's layer roles, op sites in the order first called
    for site, _ in sums.entries:
        seen.setdefault(site, len(seen))

    def place(key: tuple[str, str]) -> tuple[int, int, int]:
        site, role = key
        return order[site.partition(":")[0]], seen[site] if ":" in site else -1, ROLES.index(role)

    entries = tuple(Entry(module, role, fmt, c) for (module, role), (fmt, c) in sorted(sums.entries.items(),
                                                                                        key=lambda kv: place(kv[0])))
    raw = [(e.module, e.role, e.format, e.census) for e in entries]
    return InspectReport(
        model=type(model).__name__, policy=pol.name or pol.spec() or "fp32", steps=steps, entries=entries,
        advice=advise_loss_scale(raw, max_lost), exponents=tuple(sorted(start_exponents(raw).items())),
    )


@dataclass(frozen=True)
class InspectReport:
    """What ``inspect`` found: one Entry per (module, role), the loss-scale advice and the dfx exponents."""

    model: str
    policy: str
    steps: int
    entries: tuple[Entry, ...]
    advice: LossScaleAdvice
    exponents: tuple[tuple[tuple[str, str], int], ...]  # ((module, role), r): dfx starting exponents

    def entry(self, module: str, role: str) -> Entry:
        for e in self.entries:
            if (e.module, e.role) == (module, role):
                return e
        raise KeyError(f"no census for {module!r} {role!r}")

    def by_role(self) -> list[tuple[str, str | None, Census]]:
        """(role, format, census summed over the modules with that format), in role order."""
        groups: dict[tuple[str, str | None], Census] = {}
        for e in self.entries:
            groups[e.role, e.format] = groups.get((e.role, e.format), Census()) + e.census
        return sorted(((r, f, c) for (r, f), c in groups.items()), key=lambda g: (ROLES.index(g[0]), str(g[1])))

    def rows(self, per_module: bool = False) -> list[dict[str, str]]:
        """Table rows, per role (summed over the modules with the same format) or per module and role: values,
        % exactly zero, and in the format (shares of the non-zero values) % lost to zero, % subnormal,
        % overflowing at S = 1 and, for gradients, % lost at the advised S; the SQNR in dB (census.Rounding);
        for scaled formats the % of blocks that clip and that flush (``blocks.BlockCounts``)."""
        groups = ([(e.module, e.role, e.format, e.census) for e in self.entries] if per_module
                  else [("all", r, f, c) for r, f, c in self.by_role()])
        scale = self.advice.scale
        rows = []
        for module, role, fmt, c in groups:
            row = {"module": module, "role": role, "format": fmt or "fp32", "values": f"{c.total:,}",
                   "zero %": _pct(c.zeros, c.total), "lost %": "", "subnormal %": "", "overflow %": "",
                   "lost % at S": "", "SQNR dB": "", "clip blocks %": "", "flush blocks %": ""}
            if fmt is not None:
                lost, sub, over = c.counts(fmt).at(1.0)
                row.update({"lost %": _pct(lost, c.nonzero), "subnormal %": _pct(sub, c.nonzero),
                            "overflow %": _pct(over, c.nonzero)})
                if role in GRADIENT_ROLES and scale is not None:
                    row["lost % at S"] = _pct(c.counts(fmt).at(scale)[0], c.nonzero)
                rounding = c.counts(fmt).rounding
                row["SQNR dB"] = _db(rounding.sqnr_db)
                if rounding.blocks is not None:
                    row.update({"clip blocks %": _pct(rounding.blocks.clipped, rounding.blocks.blocks),
                                "flush blocks %": _pct(rounding.blocks.flushed, rounding.blocks.blocks)})
            rows.append(row if per_module else {k: v for k, v in row.items() if k != "module"})
        return rows

    def table(self, per_module: bool = False) -> str:
        """The rows as aligned text, then the advice."""
        rows = self.rows(per_module)
        columns = list(rows[0]) if rows else []
        widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in columns}
        lines = ["  ".join(k.ljust(widths[k]) for k in columns)]
        lines += ["  ".join(r[k].ljust(widths[k]) for k in columns) for r in rows]
        return "\n".join(lines + self.notes())

    def notes(self) -> list[str]:
        """The advice as sentences."""
        notes = [self.advice.summary()]
        if self.exponents:
            notes.append("dfx starting exponents (max-abs): " + ", ".join(
                f"{m or '(root)'}.{r}={e}" for (m, r), e in self.exponents))
        return notes

    def to_json(self, path: str | Path) -> Path:
        """Write the report as JSON (histograms as {log2_min, counts}, counts at S = 1 and the advised S)."""
        scales = sorted({1.0} | ({self.advice.scale} if self.advice.scale else set()))
        doc = {
            "model": self.model, "policy": self.policy, "steps": self.steps,
            "advice": {"loss_scale": self.advice.__dict__ | {"formats": list(self.advice.formats)},
                       "dfx_start_exponents": [{"module": m, "role": r, "int_bits": e}
                                               for (m, r), e in self.exponents]},
            "entries": [_entry_json(e, scales) for e in self.entries],
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1))
        return path

    def plot(self, directory: str | Path) -> list[Path]:
        """One PNG per role (MPT Fig. 3 style, the format's range shaded): ``<directory>/<role>.png``; where a
        role has a scaled format, the histogram of its block scales: ``<directory>/block_scales.png``."""
        from .plots import plot_block_scales, plot_role

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for role in ROLES:
            groups = [(f, c) for r, f, c in self.by_role() if r == role]
            if groups:
                scale = self.advice.scale if role in GRADIENT_ROLES else None
                paths.append(plot_role(directory / f"{role}.png", self, role, groups, scale))
        blocks = [(role, fmt, c.counts(fmt).rounding.blocks) for role, fmt, c in self.by_role()
                  if fmt is not None and c.counts(fmt).rounding.blocks is not None]
        if blocks:
            paths.append(plot_block_scales(directory / "block_scales.png", self, blocks))
        return paths


def _pct(n: int, of: int) -> str:
    return f"{100 * n / of:.3f}" if of else "-"


def _db(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _json_number(v: float | None) -> float | str | None:
    """A float for JSON: +-inf and NaN as the strings "inf", "-inf", "nan" (JSON has neither)."""
    return v if v is None or math.isfinite(v) else str(v)


def _rounding_json(r: Rounding) -> dict[str, Any]:
    doc: dict[str, Any] = {"sqnr_db": _json_number(r.sqnr_db), "signal": r.signal, "noise": _json_number(r.noise)}
    b = r.blocks
    if b is not None:
        lo, hi = (b.scale_log2[0][0], b.scale_log2[-1][0]) if b.scale_log2 else (0, -1)
        hist = dict(b.scale_log2)
        doc["blocks"] = {
            "blocks": b.blocks, "clipped": b.clipped, "flushed": b.flushed, "clipped_share": b.share("clipped"),
            "flushed_share": b.share("flushed"), "zero_scale": b.zero_scale, "nan_scale": b.nan_scale,
            "empty": b.empty,
            "scale_log2_histogram": {"log2_min": lo, "counts": [hist.get(e, 0) for e in range(lo, hi + 1)]},
        }
    return doc


def _entry_json(e: Entry, scales: list[float]) -> dict[str, Any]:
    c = e.census
    nonempty = [i for i, n in enumerate(c.log2_counts) if n]
    lo, hi = (nonempty[0], nonempty[-1] + 1) if nonempty else (0, 0)
    return {
        "module": e.module, "role": e.role, "format": e.format, "values": c.total, "zeros": c.zeros,
        "nonfinite": c.nonfinite, "int_bits": c.int_bits,
        "log2_histogram": {"log2_min": LOG2_MIN + lo, "counts": list(c.log2_counts[lo:hi])},
        "formats": {fc.format: {f"{s:g}": dict(zip(("lost", "subnormal", "overflow"), fc.at(s))) for s in scales}
                    | _rounding_json(fc.rounding) for fc in c.formats},
    }
