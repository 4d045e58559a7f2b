"""The diagnostics' pictures (matplotlib, Agg backend: no display needed).

* ``plot_role``: MPT Fig. 3 for one role: the share of values per binade floor(log2|x|) (exact zeros as a bar
  of their own at the left), with the format's ranges shaded from its real thresholds (``census``): rounds to
  zero, subnormal, normal, overflows. For gradients, the histogram moved by the advised loss scale is drawn
  as an outline.
* ``plot_block_scales``: for the roles with a scaled format (MX, NVFP4, scaled floats), the number of blocks
  per binade of their decode scale, with the shares of blocks that clip and flush in the legend.
* ``plot_memory``: Park Fig. 4 as stacked bars, one per recipe: estimated bytes per component, the measured
  peak as a marker.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..formats import Format, parse_format  # noqa: E402
from .census import LOG2_MIN, Census, _thresholds  # noqa: E402

if TYPE_CHECKING:
    from .blocks import BlockCounts
    from .inspection import InspectReport
    from .footprint import MemoryEstimate

__all__ = ["plot_role", "plot_block_scales", "plot_memory"]

_RANGES = (("rounds to 0", "#d62728"), ("subnormal", "#ff7f0e"), ("normal", "#2ca02c"), ("overflows", "#7f7f7f"))


def _log2(v: float) -> float:
    return math.log2(v) if v > 0 else -math.inf


def _shade(ax, fmt: Format, int_bits: int, left: float, right: float) -> None:
    """Shade the format's ranges (positive side) between x = left and x = right (log2 magnitudes)."""
    fmt = fmt.fixed_at(int_bits)  # a dfx group at its max-abs exponent
    if fmt is None:  # an exponent per block: no one range to shade
        return
    zero, normal, over = _thresholds(fmt)[0]
    edges = [left, _log2(zero), _log2(normal) if normal else _log2(zero), _log2(over), right]
    for i in range(1, len(edges)):  # inside [left, right], non-decreasing
        edges[i] = min(max(edges[i], edges[i - 1]), right)
    for (label, color), a, b in zip(_RANGES, edges, edges[1:]):
        if b > a:
            ax.axvspan(a, b, color=color, alpha=0.12, label=f"{label} in {fmt!r}")


def plot_role(path: Path, report: InspectReport, role: str, groups: Sequence[tuple[str | None, Census]],
              scale: float | None) -> Path:
    """One role's histogram (all modules), shaded with its most common format's ranges."""
    counts = [sum(c.log2_counts[i] for _, c in groups) for i in range(len(groups[0][1].log2_counts))]
    total = sum(c.total for _, c in groups)
    zeros = sum(c.zeros for _, c in groups)
    nonempty = [i for i, n in enumerate(counts) if n]
    lo, hi = (nonempty[0], nonempty[-1]) if nonempty else (-LOG2_MIN - 8, -LOG2_MIN + 8)
    shift = round(math.log2(scale)) if scale and scale > 1 else 0
    lo, hi = LOG2_MIN + lo - 4, LOG2_MIN + hi + shift + 4
    fig, ax = plt.subplots(figsize=(9, 4.2))
    main = max((g for g in groups if g[0] is not None), key=lambda g: g[1].total, default=None)
    if main is not None:
        _shade(ax, parse_format(main[0]), main[1].int_bits, lo - 3, hi + 1)
    xs = [LOG2_MIN + i for i, n in enumerate(counts) if n]
    ys = [100 * counts[x - LOG2_MIN] / total for x in xs]
    ax.bar(xs, ys, width=1.0, align="edge", color="#1f77b4", label="float32 values")
    ax.bar([lo - 3], [100 * zeros / total], width=1.0, align="edge", color="#000000", label="exactly 0")
    if shift and xs:
        dense = list(range(xs[0], xs[-1] + 1))
        heights = [100 * counts[x - LOG2_MIN] / total for x in dense]
        ax.step([x + shift for x in dense] + [dense[-1] + shift + 1], heights + heights[-1:], where="post",
                color="#9467bd",
                label=f"gradients x S = 2^{shift} (advised)")
    ax.set_xlim(lo - 3, hi + 1)
    ax.set_yscale("log")
    shown = [y for y in ys + [100 * zeros / total] if y > 0]
    ax.set_ylim(min(shown, default=1e-3) / 3, 300)
    ax.set_xlabel("log2(|value|)  (bin b holds [2^b, 2^(b+1)); leftmost bar: exact zeros)")
    ax.set_ylabel("% of all values (log scale)")
    fmt_note = f", {main[0]}" if main is not None else ""
    ax.set_title(f"{report.model}: {role} ({total:,} values, {report.steps} float32 steps, policy "
                 f"{report.policy}{fmt_note})", fontsize=10)
    if main is not None:
        fmt, c = main
        lost1 = c.counts(fmt).at(1.0)[0] / max(c.nonzero, 1)
        text = f"zero in fp32: {100 * zeros / total:.1f} %\nlost in {fmt}: {100 * lost1:.2f} % of non-zero"
        if shift:
            text += f"\nat S = 2^{shift}: {100 * c.counts(fmt).at(scale)[0] / max(c.nonzero, 1):.3f} %"
        ax.text(0.06, 0.97, text, transform=ax.transAxes, va="top", fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "#cccccc"})
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_block_scales(path: Path, report: InspectReport,
                      roles: Sequence[tuple[str, str, BlockCounts]]) -> Path:
    """The block-scale histograms of ``roles`` ((role, format, BlockCounts), all modules together)."""
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(roles)
    for i, (role, fmt, b) in enumerate(roles):
        xs = [e + i * width for e, _ in b.scale_log2]
        label = (f"{role} ({fmt}): {b.blocks:,} blocks, clip {100 * (b.share('clipped') or 0):.2f} %, "
                 f"flush {100 * (b.share('flushed') or 0):.2f} %")
        ax.bar(xs, [n for _, n in b.scale_log2], width=width, align="edge", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("floor(log2(block decode scale))  (NVFP4: e4m3 block scale x tensor scale; MX: 2^e)")
    ax.set_ylabel("blocks (log scale)")
    ax.set_title(f"{report.model}: block scales ({report.steps} float32 steps, policy {report.policy})", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_memory(path: Path, estimates: Sequence[MemoryEstimate], title: str) -> Path:
    """Stacked bars of the estimated bytes per component for each recipe, emulated and ideal side by side,
    with the measured peak (where measured) as a black marker on the emulated bar."""
    from .footprint import COMPONENTS

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(estimates) + 2), 4.5))
    colors = plt.get_cmap("tab10").colors
    width = 0.38
    for i, est in enumerate(estimates):
        for j, (view, offset) in enumerate(((est.emulated, -width / 2), (est.ideal, width / 2))):
            bottom = 0.0
            for k, comp in enumerate(COMPONENTS):
                mb = view[comp] / 2**20
                ax.bar(i + offset, mb, width, bottom=bottom, color=colors[k], alpha=1.0 if j == 0 else 0.55,
                       edgecolor="white", linewidth=0.5, label=comp if i == 0 and j == 0 else None)
                bottom += mb
        if est.measured is not None:
            ax.plot([i - width], [est.measured / 2**20], marker=">", color="black", markersize=8,
                    label="measured peak" if i == 0 else None)
    ax.set_xticks(range(len(estimates)))
    ax.set_xticklabels([f"{e.recipe}\nemulated | ideal" for e in estimates], fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
