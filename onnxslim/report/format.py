"""Shared formatting for every renderer: JSON values, counts, bytes, tables, the plotting check."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["to_jsonable", "to_json", "format_count", "format_bytes", "format_table", "shape_text", "format_ms", "format_fraction", "format_percent", "format_change", "format_ratio", "format_points", "require_plotting"]


def to_jsonable(value: Any) -> Any:
    """Dataclasses, tuples, numpy scalars, paths and enums as plain JSON values (NaN/inf become null)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    return value

def to_json(value: Any) -> str:
    return json.dumps(to_jsonable(value), indent=2)

def format_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}" if isinstance(n, float) else str(n)

def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"

def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, markdown: bool = False) -> str:
    """A plain aligned table (numbers right-aligned), or a Markdown table."""
    cells = [[str(c) for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(_looks_numeric(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True))

    return "\n".join(line(r).rstrip() for r in [list(headers), ["-" * w for w in widths], *cells])

def _looks_numeric(text: str) -> bool:
    return bool(text) and (text[0].isdigit() or text[0] in "-+.") and text not in ("-",)

def shape_text(shape: Sequence[int | str] | None) -> str:
    return "?" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"

def format_ms(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.1f}"

def format_fraction(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.2f}%"

def format_change(before: float, after: float) -> str:
    return f"{100 * (after - before) / before:+.1f}%" if before else "-"

def format_percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"

def require_plotting() -> None:
    """Raise a UsageError before any work when --plot is asked for and matplotlib is not installed."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        from onnxslim.errors import UsageError

        raise UsageError("--plot needs matplotlib: pip install 'onnxslim[plot]' (or pip install matplotlib)")

def format_ratio(before: float | None, after: float | None, better: str, worse: str) -> str:
    if not before or not after:
        return "-"
    ratio = before / after
    return f"{ratio:.2f}x {better}" if ratio >= 1 else f"{1 / ratio:.2f}x {worse}"

def format_points(before: float | None, after: float | None) -> str:
    return "-" if before is None or after is None else f"{100 * (after - before):+.2f} pt"
