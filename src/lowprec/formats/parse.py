"""``parse_format``: format strings to format values (the inverse of their ``repr``)."""

from __future__ import annotations

import re

from .types import (
    BF16,
    E4M3,
    E5M2,
    FP16,
    FP32,
    BlockFloat,
    DynamicFixedPoint,
    FixedPoint,
    FloatFormat,
    Format,
    Uniform,
)
from .scaled import ELEMENTS, MXFormat, NVFP4, ScaledFloat

__all__ = ["parse_format", "FORMS", "split_top"]

#: Every accepted spelling, shown in error messages (the options of each: docs/formats.md).
FORMS = (
    "fp32 | bf16 | fp16 | e4m3 | e5m2 | int8 | int16 | float<e=E,m=M[,...]> | fixed<WORD,FRAC> | dfx<BITS> | "
    "uniform<K[,unsigned]> | bfp<BITS,BLOCK> | mxfp8_e4m3 | mxfp8_e5m2 | mxfp6_e2m3 | mxfp6_e3m2 | mxfp4 | mxint8 | "
    "mx<ELEM,BLOCK[,...]> | nvfp4[<...>] | scaled<FLOAT[,...]> (options of each: docs/formats.md)"
)

_MX_ELEMENTS = {"mxfp8_e4m3": "e4m3", "mxfp8_e5m2": "e5m2", "mxfp6_e2m3": "e2m3", "mxfp6_e3m2": "e3m2",
                "mxfp4": "e2m1", "mxfp4_e2m1": "e2m1", "mxint8": "int8"}
_NESTED = re.compile(r"^(?P<kind>mx\w*|nvfp4|scaled)<(?P<args>.*)>$")

_NAMES: dict[str, Format] = {
    "fp32": FP32, "float32": FP32,
    "bf16": BF16, "bfloat16": BF16,
    "fp16": FP16, "float16": FP16, "half": FP16,
    "e4m3": E4M3, "fp8_e4m3": E4M3, "float8_e4m3fn": E4M3,
    "e5m2": E5M2, "fp8_e5m2": E5M2, "float8_e5m2": E5M2,
    "int8": DynamicFixedPoint(8),
    "int16": DynamicFixedPoint(16),
}

_FORM = re.compile(r"^(?P<kind>[a-z]+)\s*<(?P<args>[^<>]*)>$")
_ON = {"on": True, "yes": True, "true": True, "1": True, "off": False, "no": False, "false": False, "0": False}


def _int(text: str, what: str, spec: str) -> int:
    if not re.fullmatch(r"[+-]?\d{1,6}", text):
        raise ValueError(f"{what} must be an integer in {spec!r}, got {text!r}")
    return int(text)


def _float_format(args: list[str], spec: str) -> FloatFormat:
    opts: dict[str, object] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep and key == "finite":
            opts["finite"] = True
        elif key in ("e", "m"):
            opts[key] = _int(value, key, spec)
        elif key == "subnormals" and value in _ON:
            opts["subnormals"] = _ON[value]
        elif key == "overflow" and value in ("inf", "saturate"):
            opts["overflow"] = value
        else:
            raise ValueError(f"unknown float option {arg!r} in {spec!r}; accepted: {FORMS}")
    if "e" not in opts or "m" not in opts:
        raise ValueError(f"a float format needs both e= and m=, e.g. 'float<e=5,m=10>'; got {spec!r}")
    return FloatFormat(
        opts["e"], opts["m"], opts.get("subnormals", True), opts.get("overflow", "inf"), opts.get("finite", False)
    )


def split_top(text: str, sep: str = ",", *, keep_empty: bool = False) -> list[str]:
    """Split on ``sep`` outside angle brackets (an element may be ``float<e=4,m=3>``), each part stripped.

    Empty parts are dropped (a policy string's ``"weight=int8,"``), or, with ``keep_empty``, kept for the caller
    to refuse (a format's ``mx<e4m3,,32>``); an empty ``text`` has no parts either way."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += (ch == "<") - (ch == ">")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts = [p.strip() for p in (*parts, "".join(cur))]
    if keep_empty:
        return parts if text.strip() else []
    return [p for p in parts if p]


def _options(args: list[str], spec: str, known: dict[str, type], flags: tuple[str, ...] = ()) -> dict[str, object]:
    """key=value options (ints or words) and bare flags of a scaled format."""
    opts: dict[str, object] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep and key in flags:
            opts[key] = True
        elif sep and key in known:
            opts[key] = _int(value, key, spec) if known[key] is int else value
        else:
            accepted = ", ".join([f"{k}=" for k in known] + list(flags))
            raise ValueError(f"unknown option {arg!r} in {spec!r}; accepted: {accepted}")
    return opts


_RENAME = {"scale": "scale_rule"}


def _scaled_format(kind: str, args: list[str], spec: str) -> Format:
    if kind in _MX_ELEMENTS or kind == "mx":
        if kind == "mx":
            if len(args) < 2 or args[0] not in ELEMENTS:
                raise ValueError(f"mx<ELEMENT,BLOCK,...> needs an element ({', '.join(ELEMENTS)}) and a block size; "
                                 f"got {spec!r}")
            element, block, args = args[0], _int(args[1], "block", spec), args[2:]
        else:
            element, block = _MX_ELEMENTS[kind], 32
        opts = _options(args, spec, {"scale": str, "axis": int})
        return MXFormat(element, block, **{_RENAME.get(k, k): v for k, v in opts.items()})
    if kind == "nvfp4":
        return NVFP4(**_options(args, spec, {"tile": str, "axis": int}))
    if kind == "scaled" and args:
        element = parse_format(args[0])
        if not isinstance(element, FloatFormat):
            raise ValueError(f"scaled<...> takes a float element format (e4m3, e5m2, float<...>), got {args[0]!r}")
        opts = _options(args[1:], spec, {"history": int, "algo": str, "margin": int, "axis": int},
                        ("delayed", "current", "pow2", "rowwise"))
        scaling = "delayed" if opts.pop("delayed", False) else "current"
        opts.pop("current", None)
        return ScaledFloat(element, scaling, **opts)
    raise ValueError(f"cannot parse number format {spec!r}; accepted: {FORMS}")


def parse_format(spec: str) -> Format:
    """Parse a format string such as ``"fp16"``, ``"float<e=5,m=10>"``, ``"fixed<16,8>"``, ``"dfx<8>"``.

    Case and spaces are ignored. ``repr(parse_format(s))`` parses back to an equal format. Raises ValueError
    naming the accepted forms for anything else.
    """
    if isinstance(spec, Format):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a format is given as a string, got {type(spec).__name__}")
    text = re.sub(r"\s+", "", spec.lower())
    if text in _NAMES:
        return _NAMES[text]
    if text in _MX_ELEMENTS or text == "nvfp4":
        return _scaled_format(text, [], spec)
    nested = _NESTED.match(text)
    if nested and (nested["kind"] in _MX_ELEMENTS or nested["kind"] in ("mx", "nvfp4", "scaled")):
        return _scaled_format(nested["kind"], split_top(nested["args"], keep_empty=True), spec)
    match = _FORM.match(text)
    if not match:
        raise ValueError(f"unknown number format {spec!r}; accepted: {FORMS}")
    kind, args = match["kind"], [a for a in match["args"].split(",")]
    if kind == "float":
        return _float_format(args, spec)
    if kind == "fixed" and len(args) == 2:
        return FixedPoint(_int(args[0], "word", spec), _int(args[1], "frac", spec))
    if kind == "dfx" and len(args) == 1:
        return DynamicFixedPoint(_int(args[0], "bits", spec))
    if kind == "uniform" and len(args) in (1, 2):
        if len(args) == 2 and args[1] not in ("unsigned", "signed"):
            raise ValueError(f"uniform takes 'signed' or 'unsigned' as second argument, got {args[1]!r}")
        return Uniform(_int(args[0], "k", spec), signed=len(args) == 1 or args[1] == "signed")
    if kind == "bfp" and len(args) == 2:
        return BlockFloat(_int(args[0], "bits", spec), _int(args[1], "block", spec))
    raise ValueError(f"cannot parse number format {spec!r}; accepted: {FORMS}")
