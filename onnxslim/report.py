"""Render result dataclasses as terminal tables, JSON and Markdown. Renders only; computes nothing."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from onnxslim.model_info import ModelInfo

__all__ = ["to_jsonable", "to_json", "format_count", "format_bytes", "format_table", "render_inspect", "inspect_json"]


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

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)]).rstrip()


def _looks_numeric(text: str) -> bool:
    return bool(text) and (text[0].isdigit() or text[0] in "-+.") and text not in ("-",)


def _shape_text(shape: Sequence[int | str] | None) -> str:
    return "?" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def render_inspect(info: ModelInfo, *, top: int = 10) -> str:
    """The `inspect` report for a terminal."""
    storage = info.weight_storage
    lines = [
        f"model      {info.path}  ({format_bytes(info.size_bytes)})",
        f"producer   {info.producer}   IR {info.ir_version}   opsets "
        + ", ".join(f"{d} {v}" for d, v in info.opsets.items()),
        "",
        format_table(
            ["", "name", "dtype", "shape"],
            [("input", t.name, t.dtype, _shape_text(t.shape)) for t in info.inputs]
            + [("output", t.name, t.dtype, _shape_text(t.shape)) for t in info.outputs],
        ),
        "",
        "analysis shapes  " + ", ".join(f"{n}:{','.join(map(str, s))}" for n, s in info.analysis_shapes.items()),
        f"params     {format_count(info.params)}",
        f"MACs       {format_count(info.macs)}   (Conv/ConvTranspose/Gemm/MatMul at the analysis shapes)",
        "weights    "
        + ", ".join(
            f"{label} {count} tensors / {format_count(elements)} values"
            for label, (count, elements) in (
                ("initializers", storage.initializers),
                ("Constant nodes", storage.constant_nodes),
                ("computed by constant subgraphs", storage.computed),
            )
            if count
        )
        + (f"   ({info.folded_nodes} constant nodes folded at load)" if info.folded_nodes else ""),
        "",
        "ops        " + ", ".join(f"{op} {n}" for op, n in info.ops.items()),
    ]
    heavy = sorted((layer for layer in info.cost.layers if layer.macs), key=lambda layer: -layer.macs)[:top]
    if heavy:
        total = max(info.macs, 1)
        lines += [
            "",
            f"top {len(heavy)} layers by MACs",
            format_table(
                ["layer", "op", "MACs", "share", "params"],
                [
                    (layer.name, layer.op_type, format_count(layer.macs), f"{100 * layer.macs / total:.1f}%",
                     format_count(layer.params))
                    for layer in heavy
                ],
            ),
        ]
    return "\n".join(lines)


def inspect_json(info: ModelInfo) -> dict[str, Any]:
    """The `inspect --json` object."""
    return {
        "path": info.path,
        "size_bytes": info.size_bytes,
        "producer": info.producer,
        "ir_version": info.ir_version,
        "opsets": info.opsets,
        "inputs": to_jsonable(info.inputs),
        "outputs": to_jsonable(info.outputs),
        "analysis_shapes": to_jsonable(info.analysis_shapes),
        "ops": info.ops,
        "params": info.params,
        "macs": info.macs,
        "elementwise": info.cost.elementwise,
        "weight_storage": {
            kind: {"tensors": count, "values": values}
            for kind, (count, values) in (
                ("initializers", info.weight_storage.initializers),
                ("constant_nodes", info.weight_storage.constant_nodes),
                ("computed", info.weight_storage.computed),
            )
        },
        "folded_nodes": info.folded_nodes,
        "layers": [
            {"name": layer.name, "op_type": layer.op_type, "macs": layer.macs, "params": layer.params}
            for layer in info.cost.layers
            if layer.macs or layer.params
        ],
    }
