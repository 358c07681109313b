"""Parameters and multiply-accumulates per node at given input shapes.

`macs` counts only the multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul (and their int8
QOperator forms), and the gate matrix products of LSTM, GRU and RNN at every time step: the numbers channel
pruning changes and the ones latency follows. Everything else is
counted separately as `elementwise`: the number of elements each other node writes, a rough measure of
memory-bound work. `params` counts the elements of floating-point initializers and of quantized weights
(integer initializers a DequantizeLinear reads, or the weight and bias inputs of QOperator and dynamically
quantized nodes: ConvInteger, DynamicQuantizeLSTM, ...), each
once (attributed to its first reader), but not quantization scales and zero points: an int8 model has the
params of its float original. A MAC layer whose shapes are unknown is listed in `unknown`, never silently
counted as zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx

from onnxslim.io import TensorInfo

__all__ = ["LayerCost", "ModelCost", "MAC_OPS", "compute_cost"]


@dataclass(frozen=True)
class LayerCost:
    """Cost of one node."""

    name: str
    op_type: str
    macs: int
    params: int
    elementwise: int


@dataclass(frozen=True)
class ModelCost:
    """Cost of a whole model at the analysis shapes."""

    layers: tuple[LayerCost, ...]
    params: int
    macs: int
    elementwise: int
    unknown: tuple[str, ...] = ()  # MAC layers whose shapes are unknown: `macs` leaves them out

    def top_layers(self, count: int) -> list[LayerCost]:
        """The `count` layers with the most MACs, most first."""
        return sorted((layer for layer in self.layers if layer.macs), key=lambda layer: -layer.macs)[:count]

    def by_name(self) -> dict[str, LayerCost]:
        return {layer.name: layer for layer in self.layers}


def _shape(infos: Mapping[str, TensorInfo], name: str) -> tuple[int, ...] | None:
    info = infos.get(name)
    return info.shape if info is not None else None


def _conv_macs(node: onnx.NodeProto, infos: Mapping[str, TensorInfo], weight_input: int = 1) -> int | None:
    out, weight = _shape(infos, node.output[0]), _shape(infos, node.input[weight_input])
    if out is None or weight is None:
        return None
    # weight [C_out, C_in / group, k...]: each output element reads C_in/group * prod(k) inputs
    return int(np.prod(out)) * int(np.prod(weight[1:]))


def _conv_transpose_macs(node: onnx.NodeProto, infos: Mapping[str, TensorInfo]) -> int | None:
    x, weight = _shape(infos, node.input[0]), _shape(infos, node.input[1])
    if x is None or weight is None:
        return None
    # weight [C_in, C_out / group, k...]: each input element is scattered into C_out/group * prod(k) outputs
    return int(np.prod(x)) * int(np.prod(weight[1:]))


def _gemm_macs(node: onnx.NodeProto, infos: Mapping[str, TensorInfo]) -> int | None:
    a, out = _shape(infos, node.input[0]), _shape(infos, node.output[0])
    if a is None or out is None:
        return None
    trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
    inner = a[0] if trans_a else a[1]
    return int(np.prod(out)) * int(inner)


def _matmul_macs(node: onnx.NodeProto, infos: Mapping[str, TensorInfo]) -> int | None:
    a, out = _shape(infos, node.input[0]), _shape(infos, node.output[0])
    if a is None or out is None:
        return None
    inner = a[-1] if len(a) >= 1 else 1
    return int(np.prod(out)) * int(inner)


def _recurrent_macs(node: onnx.NodeProto, infos: Mapping[str, TensorInfo]) -> int | None:
    """LSTM, GRU, RNN (and DynamicQuantizeLSTM): at every time step of every sequence of the batch, each
    direction multiplies the step's input by W [dirs, gates·H, I] and the hidden state by R [dirs, gates·H, H]
    (the int8 form stores them transposed: the same products). The element-wise gate arithmetic is not
    counted, as a Conv's activation is not."""
    x = _shape(infos, node.input[0])
    weights = [_shape(infos, node.input[i]) if i < len(node.input) and node.input[i] else None for i in (1, 2)]
    if x is None or len(x) < 2 or any(w is None for w in weights):
        return None
    steps = int(x[0]) * int(x[1])  # [seq, batch, I] (layout 0) or [batch, seq, I] (layout 1): both axes count
    return steps * sum(int(np.prod(w)) for w in weights if w is not None)


_MAC_DOMAINS = ("", "ai.onnx", "com.microsoft")

# The inputs of int8 nodes that can be weights (when they are initializers): op type -> input indices. Their
# other initializer inputs are scales and zero points, which are not counted as parameters.
QUANTIZED_WEIGHT_INPUTS: Mapping[str, tuple[int, ...]] = {
    "QuantizeLinear": (0,),
    "DequantizeLinear": (0,),
    "QLinearConv": (3, 8),  # w, bias
    "QLinearMatMul": (0, 3),  # a, b
    "QGemm": (0, 3, 6),  # A, B, C
    "QLinearAdd": (0, 3),
    "QLinearMul": (0, 3),
    "ConvInteger": (0, 1),
    "MatMulInteger": (0, 1),
    # dynamically quantized models (com.microsoft): int8 weights beside float biases
    "DynamicQuantizeLSTM": (1, 2, 3, 7),  # W, R, B, P
    "DynamicQuantizeMatMul": (1, 4),  # B, bias
    "MatMulIntegerToFloat": (0, 1, 6),  # A, B, bias
    "QAttention": (1, 2),  # weight, bias
    "MatMulNBits": (1, 5),  # packed B, bias
}

MAC_OPS: Mapping[str, Callable[[onnx.NodeProto, Mapping[str, TensorInfo]], int | None]] = {
    "Conv": _conv_macs,
    "ConvTranspose": _conv_transpose_macs,
    "Gemm": _gemm_macs,
    "MatMul": _matmul_macs,
    # int8 forms written by QOperator quantization: the same arithmetic, so the same count
    "ConvInteger": _conv_macs,
    "QLinearConv": partial(_conv_macs, weight_input=3),  # x, x_scale, x_zero_point, w, ...
    "QGemm": _gemm_macs,  # com.microsoft
    "MatMulInteger": _matmul_macs,
    "QLinearMatMul": _matmul_macs,
    # recurrent layers: every time step multiplies by the input and recurrent weights
    "LSTM": _recurrent_macs,
    "GRU": _recurrent_macs,
    "RNN": _recurrent_macs,
    "DynamicQuantizeLSTM": _recurrent_macs,  # com.microsoft
}


def compute_cost(model: onnx.ModelProto, infos: Mapping[str, TensorInfo]) -> ModelCost:
    """Params and MACs of every node of `model`'s main graph, at the shapes in `infos`."""
    int8_nodes = [n for n in model.graph.node if n.op_type in QUANTIZED_WEIGHT_INPUTS or n.op_type.startswith("QLinear")]
    quantized = {n.input[i] for n in int8_nodes for i in QUANTIZED_WEIGHT_INPUTS.get(n.op_type, ()) if i < len(n.input)}
    quantization_parameters = {name for n in int8_nodes for name in n.input} - quantized
    weights = {
        t.name: int(np.prod(t.dims))
        for t in model.graph.initializer
        if (np.issubdtype(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)), np.floating) or t.name in quantized)
        and t.name not in quantization_parameters
    }
    counted: set[str] = set()
    layers = []
    unknown = []
    for node in model.graph.node:
        params = 0
        for name in node.input:
            if name in weights and name not in counted:
                counted.add(name)
                params += weights[name]
        mac_rule = MAC_OPS.get(node.op_type) if node.domain in _MAC_DOMAINS else None
        found = mac_rule(node, infos) if mac_rule is not None else 0
        if found is None:
            unknown.append(node.name)
        macs = found or 0
        elementwise = 0
        if mac_rule is None:
            elementwise = sum(int(np.prod(s)) for o in node.output if o and (s := _shape(infos, o)) is not None)
        layers.append(LayerCost(node.name, node.op_type, macs, params, elementwise))
    return ModelCost(
        layers=tuple(layers),
        params=sum(layer.params for layer in layers),
        macs=sum(layer.macs for layer in layers),
        elementwise=sum(layer.elementwise for layer in layers),
        unknown=tuple(unknown),
    )
