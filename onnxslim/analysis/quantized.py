"""What counts as an already quantized model, and the one refusal every command gives it.

Quantizing twice is never what a user wants, and channel pruning reads float weights: `prune`, `quantize`
and `optimize` all refuse a model that holds any quantization node, in its main graph or in a subgraph
(`If`/`Loop` bodies), with the same message naming what was found and what to do instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import onnx

from onnxslim.errors import UnsupportedModelError

__all__ = ["QUANTIZED_OP_TYPES", "all_nodes", "find_quantized_nodes", "quantized_ops", "refuse_quantized"]

# Ops that mean a model is already quantized (besides every QLinear* op).
QUANTIZED_OP_TYPES = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "ConvInteger",
        "MatMulInteger",
        "QGemm",
        "QAttention",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "MatMulIntegerToFloat",
        "MatMulNBits",
    }
)


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of `graph`, then of its subgraphs, depth first."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from all_nodes(sub)


def _is_quantized(node: onnx.NodeProto) -> bool:
    return node.op_type in QUANTIZED_OP_TYPES or node.op_type.startswith("QLinear")


def find_quantized_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes that show the model is already quantized (QDQ pairs, QLinear*, integer convolutions ...)."""
    return [node for node in all_nodes(model.graph) if _is_quantized(node)]


def quantized_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Op type → count of the nodes that show `model` is already quantized, most frequent first."""
    return dict(Counter(node.op_type for node in find_quantized_nodes(model)).most_common())


def refuse_quantized(model: onnx.ModelProto, advice: str) -> None:
    """Raise UnsupportedModelError (exit 1) when `model` is already quantized, naming the ops found and
    `advice` (what the user should do instead, which depends on the command)."""
    found = quantized_ops(model)
    if found:
        ops = ", ".join(f"{op} x{count}" for op, count in found.items())
        raise UnsupportedModelError(f"the model is already quantized ({ops}): {advice}")
