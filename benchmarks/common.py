"""What the benchmark scripts share: the machine and source they ran on, interference, QPyTorch, tables."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

import torch
from rich.console import Console
from rich.table import Table

import lowprec as lp

Row = list[str]


def others_busy_seconds() -> float:
    """CPU time (s) spent by every other process since boot: /proc/stat's busy time minus this process's."""
    try:
        fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:  # not Linux: interference is not measured
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK") - own.user - own.system


def load_qtorch(disabled: bool) -> tuple[ModuleType | None, str]:
    """QPyTorch's quant module (its C++ extension compiles on first import), or None and the reason."""
    if disabled:
        return None, "skipped (--no-qtorch)"
    try:
        import qtorch.quant
    except Exception as err:  # noqa: BLE001 (not installed, no compiler, ABI mismatch with this torch, ...)
        lines = str(err).strip().splitlines()
        return None, f"not available ({type(err).__name__}: {lines[-1] if lines else 'no message'})"
    return qtorch.quant, f"qtorch {importlib.metadata.version('qtorch')}, CPU extension"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads), Python {platform.python_version()}, {platform.system()}"
    )


def lowprec_source() -> str:
    """lowprec's version and a hash of its source files (the working tree need not be committed)."""
    root = Path(lp.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return f"lowprec {lp.__version__}, source sha256 {digest.hexdigest()[:12]}"


def markdown_table(header: Row, rows: list[Row]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(title: str, header: Row, rows: list[Row]) -> None:
    table = Table(title=title)
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def write_section(path: Path, name: str, section: str) -> None:
    """Replace the block between ``<!-- name:begin -->`` and ``<!-- name:end -->`` of ``path`` (or append it;
    create the file if missing), so that several benchmark scripts share one markdown file."""
    BEGIN, END = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    text = path.read_text() if path.exists() else "# lowprec benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
