"""`onnxslim inspect`: what is in a model."""

from __future__ import annotations

from typing import Any

from onnxslim.model_info import ModelInfo
from onnxslim.report.format import format_bytes, format_count, format_table, shape_text, to_jsonable
from onnxslim.report.groups import groups_json, render_groups

__all__ = ["render_inspect", "inspect_json"]


def render_inspect(info: ModelInfo, *, top: int = 10, verbose: bool = False) -> str:
    """The `inspect` report for a terminal."""
    storage = info.weight_storage
    lines = [
        f"model      {info.path}  ({format_bytes(info.size_bytes)})",
        f"producer   {info.producer}   IR {info.ir_version}   opsets "
        + ", ".join(f"{d} {v}" for d, v in info.opsets.items()),
        "",
        format_table(
            ["", "name", "dtype", "shape"],
            [("input", t.name, t.dtype, shape_text(t.shape)) for t in info.inputs]
            + [("output", t.name, t.dtype, shape_text(t.shape)) for t in info.outputs],
        ),
        "",
        "analysis shapes  " + ", ".join(f"{n}:{','.join(map(str, s))}" for n, s in info.analysis_shapes.items()),
        f"params     {format_count(info.params)}",
        f"MACs       {format_count(info.macs)}   (Conv/ConvTranspose/Gemm/MatMul and LSTM/GRU/RNN at the analysis shapes)"
        + (f"; unknown for {len(info.cost.unknown)} layers whose shapes could not be inferred: "
           + ", ".join(info.cost.unknown[:5]) + (" ..." if len(info.cost.unknown) > 5 else "") if info.cost.unknown else ""),
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
    heavy = info.cost.top_layers(top)
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
    if info.quantized_ops:
        lines += [
            "",
            "quantized  already: " + ", ".join(f"{op} x{n}" for op, n in info.quantized_ops.items())
            + "; prune and quantize refuse it (start from the fp32 model)",
        ]
    if info.groups:
        lines += ["", render_groups(info.groups, verbose=verbose)]
    elif not info.quantized_ops:
        lines += ["", "channel groups  none found (no Conv, Gemm or MatMul with constant weights)"]
    lines += _tensor_lines(info, top)
    return "\n".join(lines)


def _tensor_lines(info: ModelInfo, top: int) -> list[str]:
    """With --data: the tensors hardest to round to int8 (widest range for their spread) and any that are
    not finite."""
    if info.data is None:
        return []
    lines = ["", f"tensors    {len(info.tensors)} float tensors on {info.data}"]
    broken = [t for t in info.tensors if t.nonfinite]
    if broken:
        lines.append(
            f"NOT FINITE {len(broken)} tensors hold NaN or infinite values: "
            + ", ".join(f"{t.name} ({t.nonfinite})" for t in broken[:5]) + (" ..." if len(broken) > 5 else "")
        )
    ranked = sorted(info.tensors, key=lambda t: -t.outlier_ratio if t.outlier_ratio == t.outlier_ratio else 0.0)
    if ranked and top:
        lines += [
            f"widest ranges for their spread (max |x| / std: int8 spends its 255 steps on the range), top {min(top, len(ranked))}",
            format_table(
                ["tensor", "op", "min", "max", "mean", "std", "max|x|/std", "zeros"],
                [
                    (t.name, t.op_type, f"{t.minimum:.4g}", f"{t.maximum:.4g}", f"{t.mean:.4g}", f"{t.std:.4g}",
                     f"{t.outlier_ratio:.1f}", f"{100 * t.zeros:.0f}%")
                    for t in ranked[:top]
                ],
            ),
        ]
    return lines

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
        "macs_unknown_layers": list(info.cost.unknown),
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
        "groups": groups_json(info.groups),
        "quantized_ops": info.quantized_ops,
        "data": info.data,
        "tensors": [{**to_jsonable(t), "outlier_ratio": t.outlier_ratio} for t in info.tensors],
    }
