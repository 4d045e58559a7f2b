"""The ops lowprec quantizes, by name and kind, and the ``op:<kind>`` override patterns that select them.

Every op a converted model runs has a name (``linear``, ``conv_transpose2d``, ``bmm``, ``attention``,
``layer_norm``...) and a kind (``linear``, ``conv``, ``matmul``, ``embedding``, ``attention``, ``norm``,
``recurrent``, ``elementwise``: a module's own Parameter multiplied or added elementwise, as a hand-written
norm does). A policy override whose pattern is ``op:<selector>`` applies to every op whose name or kind
matches the selector (fnmatch), in whichever module it runs: ``op:attention: activations=bf16,grads=bf16``
keeps both products of every attention in bf16, ``op:norm: activations=none,params=none,grads=none`` keeps the
norms in fp32, ``op:conv_transpose*: weight=int16`` widens the transposed convolutions only.
"""

from __future__ import annotations

import fnmatch

__all__ = ["OP_KINDS", "OP_PREFIX", "op_matches", "check_op_selector"]

#: Op name -> op kind, for every op the op-level emulation and the converted layers quantize.
OP_KINDS: dict[str, str] = {
    "linear": "linear",
    **{f"conv{d}d": "conv" for d in (1, 2, 3)},
    **{f"conv_transpose{d}d": "conv" for d in (1, 2, 3)},
    **{name: "matmul" for name in ("matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "mv", "dot", "inner",
                                   "outer", "tensordot", "vecdot", "addmv", "addr", "addbmm", "multi_dot")},
    "bilinear": "linear",
    "embedding": "embedding",
    "embedding_bag": "embedding",
    "attention": "attention",
    **{name: "norm" for name in ("layer_norm", "group_norm", "rms_norm", "batch_norm")},
    **{name: "elementwise" for name in ("mul", "div", "add", "sub", "addcmul", "prelu")},
    **{name: "recurrent" for name in ("lstm", "gru", "rnn", "lstm_cell", "gru_cell", "rnn_cell")},
}

#: The prefix of an override pattern that selects ops rather than modules.
OP_PREFIX = "op:"


def op_matches(selector: str, op: str | None) -> bool:
    """Whether ``op`` (an op name, or None for "no op") is selected by ``selector`` (an op name, a kind, or an
    fnmatch pattern over either)."""
    if op is None:
        return False
    return fnmatch.fnmatchcase(op, selector) or fnmatch.fnmatchcase(OP_KINDS.get(op, op), selector)


def check_op_selector(selector: str) -> None:
    """ValueError unless ``selector`` selects at least one known op (a typo would silently select nothing)."""
    if not any(op_matches(selector, op) for op in OP_KINDS):
        kinds = sorted(set(OP_KINDS.values()))
        raise ValueError(
            f"override pattern 'op:{selector}' selects no op; use an op kind ({', '.join(kinds)}) or an op name "
            f"({', '.join(OP_KINDS)}), e.g. 'op:attention: activations=bf16'"
        )
