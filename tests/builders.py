"""The one module of test models: tiny models built in code, shaped like real exports (shared/PATTERNS.md).

`ModelBuilder` builds the pruning tests' models node by node; below it, hand-made models for the loading,
normalization, cost and command-line tests, classifiers and data files for the calibration, bench and
metrics tests, and the models int8 hurts for the accuracy-guard tests.

Weights can live as initializers, as `Constant` nodes, or be computed by a constant subgraph
(`Reshape(Constant, Constant)`), which `load_model`/`normalize_model` fold. Inputs have a symbolic batch
dim. Weights are random, biases and BN statistics nonzero, so a wrong rewrite changes the outputs.

    b = ModelBuilder((3, 8, 8), opset=13)
    y = b.conv(b.input, 8, k=3)
    y = b.relu(b.bn(y))
    model = b.build(b.conv(y, 4))
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "CLASSES",
    "RECURRENT_GATES",
    "ModelBuilder",
    "OUTLIERS",
    "STORAGES",
    "TOKEN_DIM",
    "classification_npz",
    "constant_weights_model",
    "conv_integer_model",
    "conv_model",
    "conv_transpose_model",
    "crnn_lstm_model",
    "crnn_model",
    "ctc_head",
    "ctc_reader",
    "dynamic_lstm_model",
    "encoder_model",
    "MERGE_TARGETS",
    "SPLIT_TARGETS",
    "gemm_model",
    "image_model",
    "int_input_model",
    "ir3_model",
    "make",
    "matmul_model",
    "mobile_blocks",
    "paddle_dims_model",
    "recurrent_model",
    "save",
    "scaled_classifier",
    "token_model",
    "transformer_classifier",
    "two_input_model",
    "two_output_classifier",
    "unrolled_rnn_model",
    "upsampling_head",
    "yolo_head",
]

STORAGES = ("initializer", "constant", "computed")


class ModelBuilder:
    """Builds an ONNX model node by node, tracking the channel count (axis 1) of every tensor."""

    def __init__(
        self,
        shape: Sequence[int] = (3, 8, 8),
        *,
        opset: int = 13,
        seed: int = 0,
        input_name: str = "input",
        batch: str = "batch",
    ) -> None:
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.input = input_name
        self.inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, *shape])]
        self.channels: dict[str, int] = {input_name: int(shape[0])}
        self._ids = itertools.count()

    # ------------------------------------------------------------------------------------- plumbing

    def name(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids)}"

    def const(self, value: np.ndarray, storage: str = "initializer", prefix: str = "w") -> str:
        """A constant tensor stored as an initializer, a Constant node, or Reshape(Constant) (folded at load)."""
        value = np.asarray(value)
        name = self.name(prefix)
        if storage == "initializer":
            self.initializers.append(numpy_helper.from_array(value, name))
        elif storage == "constant":
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        elif storage == "computed":
            flat, shape = f"{name}_flat", f"{name}_shape"
            self.nodes.append(
                helper.make_node("Constant", [], [flat], value=numpy_helper.from_array(value.reshape(-1), flat))
            )
            self.nodes.append(
                helper.make_node(
                    "Constant", [], [shape], value=numpy_helper.from_array(np.array(value.shape, np.int64), shape)
                )
            )
            self.nodes.append(helper.make_node("Reshape", [flat, shape], [name], name=f"{name}_reshape"))
        else:
            raise ValueError(storage)
        return name

    def random(self, *shape: int, low: float | None = None, high: float | None = None) -> np.ndarray:
        if low is not None and high is not None:
            return self.rng.uniform(low, high, shape).astype(np.float32)
        return (self.rng.standard_normal(shape) * 0.5).astype(np.float32)

    def op(self, op_type: str, inputs: Sequence[str], *, channels: int | None = None, domain: str = "", **attrs: object) -> str:
        """A node with one output; its channel count is `channels` or that of its first input."""
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.name(op_type), domain=domain, **attrs))
        self.channels[out] = channels if channels is not None else self.channels[inputs[0]]
        return out

    def build(self, *outputs: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "test",
            self.inputs,
            [helper.make_empty_tensor_value_info(o) for o in outputs],
            initializer=self.initializers,
        )
        domains = sorted({n.domain for n in self.nodes if n.domain not in ("", "ai.onnx")})
        opsets = [helper.make_opsetid("", self.opset), *(helper.make_opsetid(d, 1) for d in domains)]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = max(8, helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))
        # declare the outputs with the shapes onnx infers (symbolic batch kept), as exporters do
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
        for value in model.graph.output:
            # outputs of custom ops cannot be inferred: declare them as rank-4 with unknown dims
            unknown = helper.make_tensor_value_info(value.name, TensorProto.FLOAT, ["batch", None, None, None])
            value.CopyFrom(inferred.get(value.name, unknown))
        onnx.checker.check_model(model)
        return model

    # ------------------------------------------------------------------------------- sources, sinks

    def conv(
        self,
        x: str,
        out: int,
        k: int = 1,
        *,
        group: int = 1,
        bias: str | None = "input",
        storage: str = "initializer",
    ) -> str:
        """Conv with 'same' padding; bias as the third input, as Add(x, [1,C,1,1] constant), or none."""
        c_in = self.channels[x]
        weight = self.const(self.random(out, c_in // group, k, k), storage)
        inputs = [x, weight]
        if bias == "input":
            inputs.append(self.const(self.random(out), storage, "b"))
        y = self.op("Conv", inputs, channels=out, kernel_shape=[k, k], pads=[k // 2] * 4, group=group)
        if bias == "add":
            y = self.op("Add", [y, self.const(self.random(1, out, 1, 1), storage, "b")])
        return y

    def depthwise(self, x: str, k: int = 3, **kwargs: object) -> str:
        c = self.channels[x]
        return self.conv(x, c, k, group=c, **kwargs)  # type: ignore[arg-type]

    def gemm(self, x: str, out: int, *, trans_b: int = 1, storage: str = "initializer") -> str:
        c_in = self.channels[x]
        weight = self.random(out, c_in) if trans_b else self.random(c_in, out)
        inputs = [x, self.const(weight, storage), self.const(self.random(out), storage, "b")]
        return self.op("Gemm", inputs, channels=out, transB=trans_b)

    def matmul(self, x: str, out: int, *, bias: bool = True, storage: str = "initializer") -> str:
        y = self.op("MatMul", [x, self.const(self.random(self.channels[x], out), storage)], channels=out)
        return self.op("Add", [y, self.const(self.random(out), storage, "b")]) if bias else y

    # --------------------------------------------------------------------------------- followers

    def bn(self, x: str, storage: str = "initializer") -> str:
        c = self.channels[x]
        params = [
            self.random(c, low=0.5, high=1.5),
            self.random(c),
            self.random(c),
            self.random(c, low=0.5, high=2.0),
        ]
        return self.op("BatchNormalization", [x, *(self.const(p, storage, "bn") for p in params)], epsilon=1e-5)

    def instance_norm(self, x: str, storage: str = "initializer") -> str:
        c = self.channels[x]
        scale, shift = self.random(c, low=0.5, high=1.5), self.random(c)
        return self.op("InstanceNormalization", [x, self.const(scale, storage), self.const(shift, storage)])

    def per_channel(self, op_type: str, x: str, *, shape: str = "1c11", storage: str = "initializer") -> str:
        """x (op) a per-channel constant of shape [1,C,1,1] ('1c11') or [C,1,1] ('c11')."""
        c = self.channels[x]
        dims = (1, c, 1, 1) if shape == "1c11" else (c, 1, 1)
        value = self.random(*dims, low=0.5, high=1.5) if op_type in ("Mul", "Div") else self.random(*dims)
        return self.op(op_type, [x, self.const(value, storage, "pc")])

    def prelu(self, x: str, storage: str = "initializer") -> str:
        c = self.channels[x]
        return self.op("PRelu", [x, self.const(self.random(c, 1, 1, low=0.05, high=0.3), storage, "slope")])

    def scalar(self, op_type: str, x: str, value: float, *, rank1: bool = False) -> str:
        constant = np.array([value] if rank1 else value, np.float32)
        return self.op(op_type, [x, self.const(constant, prefix="s")])

    # ------------------------------------------------------------------------------- activations

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def silu(self, x: str) -> str:
        return self.op("Mul", [x, self.op("Sigmoid", [x])])

    def relu6(self, x: str) -> str:
        if self.opset >= 11:
            low, high = self.const(np.array(0, np.float32), prefix="min"), self.const(np.array(6, np.float32), prefix="max")
            return self.op("Clip", [x, low, high])
        return self.op("Clip", [x], min=0.0, max=6.0)

    def hardswish(self, x: str, form: str = "op") -> str:
        """HardSwish as the op (opset >= 14), as x * HardSigmoid(x), or as x * Clip(x + 3, 0, 6) / 6."""
        if form == "op":
            return self.op("HardSwish", [x])
        if form == "hardsigmoid":
            return self.op("Mul", [x, self.op("HardSigmoid", [x], alpha=1 / 6, beta=0.5)])
        clipped = self.relu6(self.scalar("Add", x, 3.0))
        return self.scalar("Div", self.op("Mul", [x, clipped]), 6.0)

    # ------------------------------------------------------------------------------------ blocks

    def se(self, x: str, reduced: int, gate: str = "Sigmoid") -> str:
        """Squeeze-excite: x * gate(Conv(Relu(Conv(GlobalAveragePool(x)))))."""
        pooled = self.op("GlobalAveragePool", [x])
        squeezed = self.relu(self.conv(pooled, reduced))
        excited = self.conv(squeezed, self.channels[x])
        return self.op("Mul", [x, self.op(gate, [excited])])

    def concat_residual(self, x: str, split: int, hidden: int = 4) -> str:
        """Relu(x + Concat(Conv(x, split), Conv(Relu(Conv(x, hidden)), C - split))): a residual stream fed by a
        concatenation, whose boundary at `split` cuts the whole stream (every earlier block's convs too)."""
        channels = self.channels[x]
        left = self.conv(x, split, 1)
        right = self.conv(self.relu(self.conv(x, hidden, 1)), channels - split, 3)
        return self.relu(self.op("Add", [x, self.concat(left, right)]))

    # ------------------------------------------------------------------------- concat and split

    def concat(self, *xs: str, axis: int = 1) -> str:
        channels = sum(self.channels[x] for x in xs) if axis == 1 else self.channels[xs[0]]
        return self.op("Concat", list(xs), channels=channels, axis=axis)

    def split(self, x: str, sizes: Sequence[int], *, equal: bool = False) -> list[str]:
        """Split on the channel axis: sizes as an attribute (opset < 13) or an input (>= 13); `equal` gives
        no sizes (equal parts; `num_outputs` from opset 18)."""
        outs = [self.name("split") for _ in sizes]
        inputs, attrs = [x], {"axis": 1}
        if equal and self.opset >= 18:
            attrs["num_outputs"] = len(sizes)
        elif not equal and self.opset >= 13:
            inputs.append(self.const(np.array(sizes, np.int64), prefix="split"))
        elif not equal:
            attrs["split"] = list(sizes)
        self.nodes.append(helper.make_node("Split", inputs, outs, name=self.name("Split"), **attrs))
        for out, size in zip(outs, sizes, strict=True):
            self.channels[out] = size
        return outs

    def slice_channels(self, x: str, start: int, end: int, *, axes: bool = True) -> str:
        """Slice channels [start, end) (attributes before opset 10, inputs after; end may be INT64_MAX)."""
        stop = min(end, self.channels[x])
        if self.opset < 10:
            return self.op("Slice", [x], channels=stop - start, starts=[start], ends=[end], axes=[1])
        if not axes:  # no axes input: starts/ends cover every axis from 0
            big = np.iinfo(np.int64).max
            inputs = [x, self.const(np.array([0, start], np.int64), prefix="starts"),
                      self.const(np.array([big, end], np.int64), prefix="ends")]
            return self.op("Slice", inputs, channels=stop - start)
        inputs = [
            x,
            self.const(np.array([start], np.int64), prefix="starts"),
            self.const(np.array([end], np.int64), prefix="ends"),
            self.const(np.array([1], np.int64), prefix="axes"),
        ]
        return self.op("Slice", inputs, channels=stop - start)

    def c2f(self, x: str, out: int, bottlenecks: int = 2, *, use_slice: bool = False) -> str:
        """YOLO C2f: Conv(2c) → Split(c, c) → bottlenecks on the last part → Concat(all parts) → Conv."""
        hidden = out // 2
        y = self.silu(self.conv(x, 2 * hidden, 1))
        if use_slice:
            parts = [self.slice_channels(y, 0, hidden), self.slice_channels(y, hidden, 2 * hidden)]
        else:
            parts = self.split(y, [hidden, hidden])
        for _ in range(bottlenecks):
            inner = self.silu(self.conv(parts[-1], hidden, 3))
            parts.append(self.op("Add", [parts[-1], self.silu(self.conv(inner, hidden, 3))]))
        return self.silu(self.conv(self.concat(*parts), out, 1))

    def sppf(self, x: str, out: int) -> str:
        """YOLO SPPF: Conv → MaxPool ×3 → Concat(4) → Conv."""
        y = self.silu(self.conv(x, self.channels[x] // 2, 1))
        pools = [y]
        for _ in range(3):
            pools.append(self.op("MaxPool", [pools[-1]], kernel_shape=[5, 5], pads=[2, 2, 2, 2]))
        return self.silu(self.conv(self.concat(*pools), out, 1))

    def if_branches(self, condition_from: str, x: str) -> str:
        """If(ReduceSum(condition_from) > 0) then x * 2 else x + 1, both branches reading `x` from outer scope."""
        total = self.op("ReduceSum", [condition_from], keepdims=0, channels=1)
        condition = self.op("Greater", [total, self.const(np.array(0, np.float32), prefix="zero")], channels=1)
        out = self.name("if_out")
        branches = []
        for op_type, value in (("Mul", 2.0), ("Add", 1.0)):
            constant = numpy_helper.from_array(np.array(value, np.float32), self.name("k"))
            branch_out = self.name("branch_out")
            node = helper.make_node(op_type, [x, constant.name], [branch_out], name=self.name(op_type))
            output = helper.make_tensor_value_info(branch_out, TensorProto.FLOAT, None)
            branches.append(helper.make_graph([node], self.name("branch"), [], [output], initializer=[constant]))
        self.nodes.append(
            helper.make_node("If", [condition], [out], name=self.name("If"), then_branch=branches[0], else_branch=branches[1])
        )
        self.channels[out] = self.channels[x]
        return out


# ----------------------------------------------------------------------------------------------------
# Hand-made models for the loading, normalization, cost and command-line tests (were io_models.py)
# Tiny models for the loading/normalization and cost tests, shaped like real exports (see PATTERNS.md).

RNG = np.random.default_rng(0)


def _const_node(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(value, name))


def make(nodes, inputs, outputs, initializers=(), opset: int = 13, ir_version: int | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version is not None:
        model.ir_version = ir_version
    if any(not o.type.tensor_type.HasField("shape") for o in model.graph.output):
        inferred = onnx.shape_inference.infer_shapes(model)
        del model.graph.output[:]
        model.graph.output.extend(inferred.graph.output)
    return model


def constant_weights_model(opset: int = 13) -> onnx.ModelProto:
    """A paddle2onnx-style conv block: weights in Constant nodes, the bias as Add(x, Reshape(Constant)),
    a BN scale computed by Cast/Unsqueeze of constants, a ConstantOfShape shift, and a shape-dependent
    Reshape (Shape -> Gather -> Concat) that must stay dynamic. Input [batch, 3, 8, 8] -> [batch, 4*8*8]."""
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = RNG.standard_normal(4).astype(np.float32)
    scale = RNG.uniform(0.5, 1.5, 4).astype(np.float64)  # cast to float32 inside the graph
    nodes = [
        _const_node("w", w),
        helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
        _const_node("b_flat", b),
        _const_node("b_shape", np.array([1, 4, 1, 1], np.int64)),
        helper.make_node("Reshape", ["b_flat", "b_shape"], ["b"]),
        helper.make_node("Add", ["conv", "b"], ["biased"]),
        _const_node("scale64", scale),
        helper.make_node("Cast", ["scale64"], ["scale32"], to=TensorProto.FLOAT),
        _const_node("axes12", np.array([1, 2], np.int64)),
        helper.make_node("Unsqueeze", ["scale32", "axes12"], ["scale"]),  # [4, 1, 1]
        helper.make_node("Mul", ["biased", "scale"], ["scaled"]),
        _const_node("shift_shape", np.array([1, 4, 1, 1], np.int64)),
        helper.make_node(
            "ConstantOfShape", ["shift_shape"], ["shift"], value=numpy_helper.from_array(np.array([0.25], np.float32))
        ),
        helper.make_node("Add", ["scaled", "shift"], ["shifted"]),
        helper.make_node("Relu", ["shifted"], ["act"]),
        # dynamic flatten: [Shape(act)[0], -1]
        helper.make_node("Shape", ["act"], ["act_shape"]),
        _const_node("zero", np.array(0, np.int64)),
        helper.make_node("Gather", ["act_shape", "zero"], ["batch"], axis=0),
        _const_node("zero_axes", np.array([0], np.int64)),
        helper.make_node("Unsqueeze", ["batch", "zero_axes"], ["batch1"]),
        _const_node("minus_one", np.array([-1], np.int64)),
        helper.make_node("Concat", ["batch1", "minus_one"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["act", "flat_shape"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 256])
    return make(nodes, [x], [y], opset=opset)


def ir3_model() -> onnx.ModelProto:
    """Old caffe2-style export: IR 3, opset 9, initializers also listed as graph inputs, unnamed nodes."""
    w = RNG.standard_normal((2, 3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    w_input = helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 3, 1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])
    return make(nodes, [x, w_input], [y], [numpy_helper.from_array(w, "w")], opset=9, ir_version=3)


def conv_model(
    *, c_in: int = 4, c_out: int = 8, kernel: int = 3, stride: int = 1, pad: int = 1, group: int = 1, hw: int = 10,
    bias: bool = True, batch: int | str = 1,
) -> onnx.ModelProto:
    w = RNG.standard_normal((c_out, c_in // group, kernel, kernel)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(RNG.standard_normal(c_out).astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node(
        "Conv", inputs, ["y"], name="conv", strides=[stride, stride], pads=[pad] * 4, group=group,
        kernel_shape=[kernel, kernel],
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c_in, hw, hw])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make([node], [x], [y], inits)


def conv_transpose_model(*, c_in: int = 4, c_out: int = 6, kernel: int = 2, stride: int = 2, hw: int = 5) -> onnx.ModelProto:
    w = RNG.standard_normal((c_in, c_out, kernel, kernel)).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="deconv", strides=[stride, stride])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, hw, hw])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make([node], [x], [y], [numpy_helper.from_array(w, "w")])


def gemm_model(*, m: int = 3, k: int = 5, n: int = 7, trans_a: int = 0, trans_b: int = 1) -> onnx.ModelProto:
    a_shape = [k, m] if trans_a else [m, k]
    b = RNG.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c = RNG.standard_normal(n).astype(np.float32)
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], name="gemm", transA=trans_a, transB=trans_b)
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, a_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make([node], [a], [y], [numpy_helper.from_array(b, "b"), numpy_helper.from_array(c, "c")])


def matmul_model(*, batch: int = 2, m: int = 3, k: int = 5, n: int = 7) -> onnx.ModelProto:
    b = RNG.standard_normal((k, n)).astype(np.float32)
    node = helper.make_node("MatMul", ["a", "b"], ["y"], name="matmul")
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [batch, m, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make([node], [a], [y], [numpy_helper.from_array(b, "b")])


def paddle_dims_model(*, dynamic_hw: bool = True) -> onnx.ModelProto:
    """A paddle2onnx-style export: dynamic dims written as dim_value -1 (not dim_param), on the input and
    the output. Conv 3 -> 4 channels, 3x3, 'same' padding; [-1, 3, -1, -1] or [-1, 3, 8, 8]."""
    model = conv_model(c_in=3, c_out=4, hw=8)
    dims = [-1, 3, -1, -1] if dynamic_hw else [-1, 3, 8, 8]
    for value, channels in ((model.graph.input[0], 3), (model.graph.output[0], 4)):
        shape = value.type.tensor_type.shape
        del shape.dim[:]
        for axis, d in enumerate(dims):
            shape.dim.add().dim_value = channels if axis == 1 else d
    return model


def token_model(*, hidden: bool = False) -> onnx.ModelProto:
    """A BERT-style embedding: input_ids index a 30-row table, token_type_ids a 2-row one (only 0 and 1 are
    valid), summed and projected by a MatMul. Inputs int64 [batch, seq]; output [batch, seq, 4].

    `hidden`: token_type_ids reach their Gather through an `Add` of 0, which the range of random inputs
    does not see through, so random token types (0-3) make the original model fail in onnxruntime."""
    words = numpy_helper.from_array(RNG.standard_normal((30, 8)).astype(np.float32), "words")
    types = numpy_helper.from_array(RNG.standard_normal((2, 8)).astype(np.float32), "types")
    proj = numpy_helper.from_array(RNG.standard_normal((8, 4)).astype(np.float32), "proj")
    zero = numpy_helper.from_array(np.array(0, np.int64), "zero")
    type_ids = "type_ids_shifted" if hidden else "token_type_ids"
    nodes = [
        helper.make_node("Gather", ["words", "input_ids"], ["word_emb"], name="word_gather"),
        *([helper.make_node("Add", ["token_type_ids", "zero"], ["type_ids_shifted"], name="shift")] if hidden else []),
        helper.make_node("Gather", ["types", type_ids], ["type_emb"], name="type_gather"),
        helper.make_node("Add", ["word_emb", "type_emb"], ["emb"], name="emb_add"),
        helper.make_node("MatMul", ["emb", "proj"], ["y"], name="proj_matmul"),
    ]
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"])
        for name in ("input_ids", "token_type_ids")
    ]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])
    return make(nodes, inputs, [y], [words, types, proj, zero])


def conv_integer_model() -> onnx.ModelProto:
    """A dynamically quantized conv, as onnxruntime's quantize_dynamic writes it: DynamicQuantizeLinear →
    ConvInteger (uint8 × int8 weights [8, 3, 3, 3]) → Cast → Mul by the scales, then Relu. x [1, 3, 8, 8]."""
    weights = numpy_helper.from_array(RNG.integers(-100, 100, (8, 3, 3, 3)).astype(np.int8), "w_q")
    w_zero = numpy_helper.from_array(np.array(0, np.int8), "w_zero")
    w_scale = numpy_helper.from_array(np.array(0.01, np.float32), "w_scale")
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["x_q", "x_scale", "x_zero"], name="quant"),
        helper.make_node("ConvInteger", ["x_q", "w_q", "x_zero", "w_zero"], ["acc"], name="conv_int", pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["acc"], ["acc_f"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x_scale", "w_scale"], ["scale"], name="scale_mul"),
        helper.make_node("Mul", ["acc_f", "scale"], ["conv"], name="rescale"),
        helper.make_node("Relu", ["conv"], ["y"], name="relu"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])
    return make(nodes, [x], [y], [weights, w_zero, w_scale])


def dynamic_lstm_model(*, hidden: int = 4, features: int = 3) -> onnx.ModelProto:
    """onnxruntime's DynamicQuantizeLSTM (com.microsoft): int8 W [1, features, 4·hidden] and R [1, hidden,
    4·hidden], a float bias B [1, 8·hidden], per-tensor scales and zero points. x [seq 5, batch 1, features]."""
    gates = 4 * hidden
    tensors = {
        "W": RNG.integers(-50, 50, (1, features, gates)).astype(np.int8),
        "R": RNG.integers(-50, 50, (1, hidden, gates)).astype(np.int8),
        "B": RNG.standard_normal((1, 2 * gates)).astype(np.float32),
        "W_scale": np.array([0.01], np.float32),
        "W_zero_point": np.array([0], np.int8),
        "R_scale": np.array([0.01], np.float32),
        "R_zero_point": np.array([0], np.int8),
    }
    inputs = ["x", "W", "R", "B", "", "", "", "", "W_scale", "W_zero_point", "R_scale", "R_zero_point"]
    node = helper.make_node(
        "DynamicQuantizeLSTM", inputs, ["y"], name="lstm_q", domain="com.microsoft", hidden_size=hidden
    )
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 1, hidden])],
        initializer=[numpy_helper.from_array(v, k) for k, v in tensors.items()],
    )
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_model(
    op_type: str = "LSTM", *, direction: str = "forward", layout: int = 0, seq: int = 5, batch: int = 2,
    features: int = 3, hidden: int = 4,
) -> onnx.ModelProto:
    """One ONNX LSTM, GRU or RNN op: X [seq, batch, features] (layout 0) or [batch, seq, features] (layout 1,
    opset 14), W [dirs, gates·hidden, features], R [dirs, gates·hidden, hidden], B [dirs, 2·gates·hidden];
    output Y."""
    dirs = 2 if direction == "bidirectional" else 1
    gates = RECURRENT_GATES[op_type] * hidden
    tensors = {
        "W": RNG.standard_normal((dirs, gates, features)).astype(np.float32),
        "R": RNG.standard_normal((dirs, gates, hidden)).astype(np.float32),
        "B": RNG.standard_normal((dirs, 2 * gates)).astype(np.float32),
    }
    attrs: dict[str, object] = {"hidden_size": hidden, "direction": direction}
    if layout:
        attrs["layout"] = layout
    node = helper.make_node(op_type, ["x", "W", "R", "B"], ["y"], name=op_type.lower(), **attrs)
    x_shape = [batch, seq, features] if layout else [seq, batch, features]
    y_shape = [batch, seq, dirs, hidden] if layout else [seq, dirs, batch, hidden]
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        initializer=[numpy_helper.from_array(v, k) for k, v in tensors.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14 if layout else 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# ----------------------------------------------------------------------------------------------------
# Classifiers and data files for the calibration, bench and metrics tests (were data_models.py)
# Tiny models and data files for the data reader, metrics and bench tests.

CLASSES = 10


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def scaled_classifier(factor: float = 1.0, *, batch: int | str = "N", input_name: str = "x") -> onnx.ModelProto:
    """logits = x @ (factor * I): [batch, 10] -> [batch, 10]. 100 params, 100 MACs per sample."""
    weight = (factor * np.eye(CLASSES)).astype(np.float32)
    node = helper.make_node("Gemm", [input_name, "w"], ["logits"], name="fc")
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, CLASSES])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CLASSES])
    return _model([node], [x], [y], [numpy_helper.from_array(weight, "w")])


def two_output_classifier() -> onnx.ModelProto:
    """Outputs `logits` = x and `doubled` = 2x."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [
        helper.make_node("Identity", ["x"], ["logits"], name="id"),
        helper.make_node("Mul", ["x", "two"], ["doubled"], name="mul"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", CLASSES])
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", CLASSES]) for n in ("logits", "doubled")]
    return _model(nodes, [x], outputs, [two])


def image_model(
    shape: list[int | str], *, elem_type: int = TensorProto.FLOAT, input_name: str = "images"
) -> onnx.ModelProto:
    """Identity on an image-shaped input (only the reader cares about its shape)."""
    node = helper.make_node("Identity", [input_name], ["out"], name="id")
    x = helper.make_tensor_value_info(input_name, elem_type, shape)
    y = helper.make_tensor_value_info("out", elem_type, shape)
    return _model([node], [x], [y])


def two_input_model() -> onnx.ModelProto:
    """out = a + b, both [batch, 3] float32."""
    node = helper.make_node("Add", ["a", "b"], ["out"], name="add")
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("a", "b")]
    return _model([node], inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])])


def int_input_model() -> onnx.ModelProto:
    """float out = Cast(ids), ids int64 [batch, 4]."""
    node = helper.make_node("Cast", ["ids"], ["out"], name="cast", to=TensorProto.FLOAT)
    x = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])
    return _model([node], [x], [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])])


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def classification_npz(path: Path, samples: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random [samples, 10] inputs whose label is their argmax (so an identity classifier is 100% right)."""
    x = np.random.default_rng(seed).standard_normal((samples, CLASSES)).astype(np.float32)
    labels = np.argmax(x, axis=1).astype(np.int64)
    np.savez(path, x=x, labels=labels)
    return x, labels


# ----------------------------------------------------------------------------------------------------
# Models that int8 hurts the way real exports are hurt, for the accuracy-guard tests (were quant_models.py)
# Tiny models that int8 hurts in the ways real exports are hurt (issue 14), for the accuracy-guard tests.
#
#     transformer_classifier()   conv stem -> tokens -> a transformer block with *decomposed* LayerNorm
#                                (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add), Softmax attention,
#                                an FFN, residuals -> mean over tokens -> classifier. Two token features
#                                carry a large offset (the outlier features of trained transformers),
#                                so one int8 scale for the residual stream leaves the others a few levels.
#     yolo_head()                a detector head whose output concatenates box coordinates (0-320) with
#                                class scores (0-1): [batch, 4 + classes, anchors].
#     ctc_head()                 a recognizer whose output is [T, batch, C] (sequence first), by Softmax
#                                then Transpose, declared [1, seqlen] as Paddle exports declare it.

__all__ = ["transformer_classifier", "yolo_head", "ctc_head", "transformer_encoder", "TOKEN_DIM"]

TOKEN_DIM = 16


OUTLIERS = [3, 11]


def _layer_norm(b: ModelBuilder, x: str, dim: int) -> str:
    """LayerNorm over the last axis as exporters decompose it; its scale damps the outlier features."""
    mean = b.op("ReduceMean", [x], axes=[-1], keepdims=1)
    centered = b.op("Sub", [x, mean])
    square = b.op("Pow", [centered, b.const(np.array(2.0, np.float32), prefix="two")])
    variance = b.op("ReduceMean", [square], axes=[-1], keepdims=1)
    std = b.op("Sqrt", [b.op("Add", [variance, b.const(np.array(1e-5, np.float32), prefix="eps")])])
    normed = b.op("Div", [centered, std])
    gamma = (1 + 0.1 * b.rng.standard_normal(dim)).astype(np.float32)
    gamma[OUTLIERS] = 0.01
    gamma = b.const(gamma, prefix="gamma")
    beta = b.const((0.1 * b.rng.standard_normal(dim)).astype(np.float32), prefix="beta")
    return b.op("Add", [b.op("Mul", [normed, gamma]), beta])


def _linear(b: ModelBuilder, x: str, d_in: int, d_out: int, scale: float = 1.0) -> str:
    weight = (b.rng.standard_normal((d_in, d_out)) * scale / np.sqrt(d_in)).astype(np.float32)
    bias = (0.1 * b.rng.standard_normal(d_out)).astype(np.float32)
    y = b.op("MatMul", [x, b.const(weight)], channels=d_out)
    return b.op("Add", [y, b.const(bias, prefix="b")], channels=d_out)


def transformer_classifier(*, size: int = 8, classes: int = 10, offset: float = 200.0, seed: int = 3) -> onnx.ModelProto:
    """input [batch, 3, size, size] -> logits [batch, classes] (see the module docstring)."""
    dim = TOKEN_DIM
    b = ModelBuilder((3, size, size), opset=13, seed=seed)
    stem = b.relu(b.conv(b.input, dim, k=3))
    tokens = b.op("Reshape", [stem, b.const(np.array([0, dim, -1], np.int64), prefix="shape")])
    tokens = b.op("Transpose", [tokens], perm=[0, 2, 1])  # [batch, size*size, dim]
    # a residual stream with outlier features (a few dims far larger than the rest), as trained transformers have
    offsets = np.zeros(dim, np.float32)
    offsets[OUTLIERS] = (offset, -offset)
    x = b.op("Add", [tokens, b.const(offsets, prefix="offset")])
    h = _layer_norm(b, x, dim)
    q, k, v = (_linear(b, h, dim, dim, scale) for scale in (3.0, 3.0, 1.0))
    scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 2, 1])])
    scores = b.op("Div", [scores, b.const(np.array(np.sqrt(dim), np.float32), prefix="sqrt_d")])
    attention = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
    x = b.op("Add", [x, _linear(b, attention, dim, dim)])
    h = _layer_norm(b, x, dim)
    x = b.op("Add", [x, _linear(b, b.relu(_linear(b, h, dim, 2 * dim)), 2 * dim, dim)])
    # the first token classifies (BERT's [CLS]): no pooling averages the int8 noise away
    pooled = b.op("Gather", [_layer_norm(b, x, dim), b.const(np.array(0, np.int64), prefix="cls")], axis=1)
    b.channels[pooled] = dim
    return b.build(b.gemm(pooled, classes))


def yolo_head(*, size: int = 16, classes: int = 6, seed: int = 5) -> onnx.ModelProto:
    """input [batch, 3, size, size] -> [batch, 4 + classes, anchors]: boxes in pixels 0-320, scores 0-1."""
    b = ModelBuilder((3, size, size), opset=13, seed=seed)
    features = b.relu(b.conv(b.relu(b.conv(b.input, 16, k=3)), 16, k=3))
    anchors = size * size
    boxes = b.op("Mul", [b.op("Sigmoid", [b.conv(features, 4)]), b.const(np.array(320.0, np.float32), prefix="px")])
    # class scores of a detector are mostly small: a low prior keeps them in about 0-0.2
    logits = b.op("Add", [b.conv(features, classes), b.const(np.full((1, classes, 1, 1), -4.0, np.float32), prefix="prior")])
    scores = b.op("Sigmoid", [logits])
    flat = b.const(np.array([0, 0, anchors], np.int64), prefix="flat")
    joined = b.op(
        "Concat", [b.op("Reshape", [boxes, flat], channels=4), b.op("Reshape", [scores, flat], channels=classes)],
        channels=4 + classes, axis=1,
    )
    return b.build(joined)


def mobile_blocks(*, size: int = 12, channels: int = 8, blocks: int = 3, spread: float = 1e3, seed: int = 11) -> onnx.ModelProto:
    """input [batch, 3, size, size] -> [batch, channels, size, size]: PP-OCR's LCNet/MobileOne blocks as
    paddle2onnx exports them. Each block: Conv, a learnable affine per channel (Mul, Add), HardSwish
    decomposed (Add 3, Clip, Mul, Div 6), depthwise Conv, Relu, pointwise Conv, residual Add with a
    Sigmoid gate; then a per-channel output scale spanning `spread` (a dense head's per-channel
    calibration: some channels far smaller than others).

    Quantized per tensor, the output scale's product rounds its small channels to zero: with the
    element-wise ops in int8 (QLinearMul) the worst output channel breaks; with the convolutions alone it
    stays float and exact."""
    b = ModelBuilder((3, size, size), opset=13, seed=seed)
    x = b.relu(b.conv(b.input, channels, k=3))
    for _ in range(blocks):
        y = b.conv(x, channels, k=1)
        y = b.op("Mul", [b.const(b.random(1, channels, 1, 1, low=0.5, high=1.5), prefix="affine_w"), y], channels=channels)
        y = b.op("Add", [y, b.const(0.1 * b.random(1, channels, 1, 1), prefix="affine_b")])
        y = b.hardswish(y, form="clip")
        y = b.relu(b.depthwise(y, 3))
        y = b.conv(y, channels, k=1)
        x = b.op("Add", [x, b.op("Mul", [y, b.op("Sigmoid", [y])])])
    scales = np.geomspace(1.0, 1.0 / spread, channels).astype(np.float32)
    b.rng.shuffle(scales)
    return b.build(b.op("Mul", [x, b.const(scales.reshape(1, channels, 1, 1), prefix="scale")]))


def upsampling_head(*, size: int = 8, seed: int = 2) -> onnx.ModelProto:
    """input [batch, 4, size, size] -> [batch, 4, 2 size, 2 size]: Conv, Relu, InstanceNormalization,
    ConvTranspose (stride 2), LeakyRelu: a segmentation decoder's ops, two of which (the normalization and
    the transposed convolution) onnxruntime's quantizer handles but its CPU kernels do not run in int8."""
    b = ModelBuilder((4, size, size), opset=13, seed=seed)
    x = b.instance_norm(b.relu(b.conv(b.input, 8, k=3)))
    x = b.op("ConvTranspose", [x, b.const(b.random(8, 4, 2, 2)), b.const(b.random(4), prefix="b")], channels=4, strides=[2, 2])
    return b.build(b.op("LeakyRelu", [x], alpha=0.1))


def ctc_head(*, steps: int = 12, classes: int = 7, seed: int = 7) -> onnx.ModelProto:
    """input [batch, steps, 8] -> Softmax(MatMul) -> Transpose -> [steps, batch, classes], declared
    [1, seqlen] (a wrong declaration, as exported recognizers have)."""
    b = ModelBuilder((steps, 8), opset=13, seed=seed)
    b.channels[b.input] = 8
    logits = b.op("MatMul", [b.input, b.const(b.random(8, classes) * 4)], channels=classes)
    probabilities = b.op("Softmax", [logits], axis=2)
    out = b.op("Transpose", [probabilities], perm=[1, 0, 2])
    model = b.build(out)
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, "seqlen"]))
    return model


def ctc_reader(
    *, steps: int = 16, classes: int = 12, features: int = 8, depth: int = 1, softmax: bool = False,
    time_major: bool = True, seed: int = 19,
) -> onnx.ModelProto:
    """A CTC line reader as convolutional recognizers export it: input [batch, 1, 4, steps] → Conv 3×3 → Relu →
    (Conv 1×1 → Relu) × `depth` → ReduceMean over the height → [N, F, T] → Transpose to [T, N, F] (`time_major`) or
    [N, T, F] → Linear (MatMul + Add) → [T, N, classes] or [N, T, classes] logits, raw (ddddocr's head) or
    through Softmax over the classes (PaddleOCR's). Plain int8 of it changes few frames and many strings."""
    b = ModelBuilder((1, 4, steps), opset=13, seed=seed)
    y = b.relu(b.conv(b.input, features, k=3))
    for _ in range(depth):
        y = b.relu(b.conv(y, features, k=1))
    y = b.op("ReduceMean", [y], axes=[2], keepdims=0)  # [N, F, T]
    y = b.op("Transpose", [y], perm=[2, 0, 1] if time_major else [0, 2, 1])
    b.channels[y] = features
    weight = (b.rng.standard_normal((features, classes)) * 3 / np.sqrt(features)).astype(np.float32)
    bias = np.zeros(classes, np.float32)
    bias[0] = 1.5  # the blank wins the quiet frames, as in a trained reader
    logits = b.op("Add", [b.op("MatMul", [y, b.const(weight)], channels=classes), b.const(bias, prefix="b")])
    return b.build(b.op("Softmax", [logits], axis=2) if softmax else logits)


# ----------------------------------------------------------------------------------------------------
# Recurrent readers: sequence models with an unrolled recurrence, as torch traces a cell written by hand
# (a Python loop over time steps): every step reads the same weight initializers.


def _sequence_features(b: ModelBuilder, channels: int, *, dense: bool) -> str:
    """A small CNN over a text line [N, 1, 8, 4·T] → [T, N, channels]: convs (a DenseNet-style block of
    growing Concats when `dense`), pooling the height away, Squeeze and Transpose to time-major."""
    y = b.relu(b.conv(b.input, 8, k=3))
    y = b.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    if dense:
        for _ in range(2):  # DenseNet: each layer's output joins its input
            y = b.concat(y, b.relu(b.conv(b.relu(b.bn(y)), 6, k=3)))
    y = b.relu(b.conv(y, channels, k=3))
    y = b.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])  # [N, C, 2, T]
    y = b.op("ReduceMean", [y], axes=[2], keepdims=1)  # [N, C, 1, T]
    y = b.op("Squeeze", [y, b.const(np.array([2], np.int64), prefix="axes")])  # [N, C, T]
    return b.op("Transpose", [y], perm=[2, 0, 1])  # [T, N, C]


def _time_step(b: ModelBuilder, sequence: str, t: int, channels: int) -> str:
    """seq[t] as torch traces it: Gather(axis 0) with a scalar index → [N, C]."""
    step = b.op("Gather", [sequence, b.const(np.array(t, np.int64), prefix="t")], axis=0)
    b.channels[step] = channels
    return step


def _stack_steps(b: ModelBuilder, steps: Sequence[str], channels: int) -> str:
    """torch.stack(outputs): Unsqueeze(0) each [N, C] and Concat on axis 0 → [T, N, C]."""
    axes = b.const(np.array([0], np.int64), prefix="axes")
    lifted = [b.op("Unsqueeze", [step, axes]) for step in steps]
    return b.op("Concat", lifted, channels=channels, axis=0)


def _ctc_output(b: ModelBuilder, sequence: str, classes: int) -> onnx.ModelProto:
    """Linear over [T, N, 2H] as torch exports it (MatMul + Add), LogSoftmax over classes: [T, N, classes]."""
    logits = b.matmul(sequence, classes)
    return b.build(b.op("LogSoftmax", [logits], axis=2))


def crnn_model(*, steps: int = 8, channels: int = 16, hidden: int = 12, classes: int = 11, seed: int = 11) -> onnx.ModelProto:
    """A CRNN captcha reader: input [N, 1, 8, 4·steps] → CNN (DenseNet-style) → [T, N, C] → a bidirectional
    LSTM unrolled as torch traces a hand-written cell (Gemm(x_t, W_ih) + Gemm(h, W_hh), Split into 4 gates,
    Sigmoid/Tanh, c = f·c + i·g, h = o·tanh(c)), each direction's W_ih/b_ih and W_hh/b_hh one initializer read
    by every step (h₀ = 0: the first step has no W_hh Gemm) → Concat(h_fwd, h_bwd) per step → stacked
    [T, N, 2H] → a Linear classifier → LogSoftmax: CTC log-probabilities [T, N, classes]."""
    b = ModelBuilder((1, 8, 4 * steps), opset=13, seed=seed)
    sequence = _sequence_features(b, channels, dense=True)
    gates = 4 * hidden

    def weights(inputs: int) -> tuple[str, str]:
        scale = 1.5 / np.sqrt(inputs)
        return b.const((b.rng.standard_normal((gates, inputs)) * scale).astype(np.float32)), b.const(
            (0.2 * b.rng.standard_normal(gates)).astype(np.float32), prefix="b"
        )

    inputs = [_time_step(b, sequence, t, channels) for t in range(steps)]
    outputs: dict[str, list[str]] = {}
    for direction, order in (("forward", range(steps)), ("backward", range(steps - 1, -1, -1))):
        (w_ih, b_ih), (w_hh, b_hh) = weights(channels), weights(hidden)
        h = c = None
        hs: dict[int, str] = {}
        for t in order:
            x_part = b.op("Gemm", [inputs[t], w_ih, b_ih], channels=gates, transB=1)
            if h is None:
                z = x_part
            else:
                z = b.op("Add", [x_part, b.op("Gemm", [h, w_hh, b_hh], channels=gates, transB=1)])
            i, f, g, o = b.split(z, [hidden] * 4)
            i, f, o = (b.op("Sigmoid", [v]) for v in (i, f, o))
            g = b.op("Tanh", [g])
            c = b.op("Mul", [i, g]) if c is None else b.op("Add", [b.op("Mul", [f, c]), b.op("Mul", [i, g])])
            h = b.op("Mul", [o, b.op("Tanh", [c])])
            hs[t] = h
        outputs[direction] = [hs[t] for t in range(steps)]
    joined = [b.concat(f, r) for f, r in zip(outputs["forward"], outputs["backward"], strict=True)]
    return _ctc_output(b, _stack_steps(b, joined, 2 * hidden), classes)


def unrolled_rnn_model(*, steps: int = 8, channels: int = 16, hidden: int = 16, classes: int = 11, seed: int = 13) -> onnx.ModelProto:
    """The smallest recurrent reader: the CNN of `crnn_model` (no dense block) → an Elman RNN unrolled over
    `steps` (h_t = tanh(Gemm(x_t, W_x, b_x) + MatMul(h_{t-1}, W_h) + b_h)), W_x/b_x one Gemm weight and bias
    read by every step, W_h one MatMul weight and b_h one Add constant read by every step but the first →
    stacked [T, N, H] → Linear → LogSoftmax [T, N, classes]."""
    b = ModelBuilder((1, 8, 4 * steps), opset=13, seed=seed)
    sequence = _sequence_features(b, channels, dense=False)
    w_x = b.const((b.rng.standard_normal((channels, hidden)) * 1.2 / np.sqrt(channels)).astype(np.float32))
    b_x = b.const((0.2 * b.rng.standard_normal(hidden)).astype(np.float32), prefix="b")
    w_h = b.const((b.rng.standard_normal((hidden, hidden)) * 0.9 / np.sqrt(hidden)).astype(np.float32))
    b_h = b.const((0.2 * b.rng.standard_normal(hidden)).astype(np.float32), prefix="b")
    h = None
    hs = []
    for t in range(steps):
        z = b.op("Gemm", [_time_step(b, sequence, t, channels), w_x, b_x], channels=hidden)
        if h is not None:
            recurrent = b.op("Add", [b.op("MatMul", [h, w_h], channels=hidden), b_h])
            z = b.op("Add", [z, recurrent])
        h = b.op("Tanh", [z])
        hs.append(h)
    return _ctc_output(b, _stack_steps(b, hs, hidden), classes)


def crnn_lstm_model(*, steps: int = 8, channels: int = 16, hidden: int = 12, classes: int = 11, seed: int = 17) -> onnx.ModelProto:
    """A CRNN as torch exports nn.LSTM (ddddocr's recognizer): the CNN of `unrolled_rnn_model` → [T, N, C] →
    one bidirectional ONNX LSTM op (W [2, 4H, C], R [2, 4H, H], B [2, 8H]) → Y [T, 2, N, H] → Transpose →
    Reshape [T, N, 2H] → Linear (MatMul + Add) → LogSoftmax [T, N, classes]."""
    b = ModelBuilder((1, 8, 4 * steps), opset=13, seed=seed)
    sequence = _sequence_features(b, channels, dense=False)
    gates = 4 * hidden
    w = b.const((b.rng.standard_normal((2, gates, channels)) * 1.5 / np.sqrt(channels)).astype(np.float32))
    r = b.const((b.rng.standard_normal((2, gates, hidden)) * 1.5 / np.sqrt(hidden)).astype(np.float32))
    bias = b.const((0.2 * b.rng.standard_normal((2, 2 * gates))).astype(np.float32), prefix="b")
    y = b.name("lstm_y")
    b.nodes.append(helper.make_node(
        "LSTM", [sequence, w, r, bias], [y], name=b.name("LSTM"), hidden_size=hidden, direction="bidirectional",
    ))
    b.channels[y] = 2
    y = b.op("Transpose", [y], perm=[0, 2, 1, 3], channels=hidden)  # [T, N, 2, H]
    y = b.op("Reshape", [y, b.const(np.array([0, 0, 2 * hidden], np.int64), prefix="shape")], channels=2 * hidden)
    return _ctc_output(b, y, classes)



def _gelu_erf(b: ModelBuilder, x: str) -> str:
    """GELU as exporters decompose it: x * 0.5 * (1 + erf(x / sqrt(2)))."""
    erf = b.op("Erf", [b.op("Div", [x, b.const(np.array(np.sqrt(2.0), np.float32), prefix="sqrt2")])])
    one_plus = b.op("Add", [erf, b.const(np.array(1.0, np.float32), prefix="one")])
    return b.op("Mul", [b.op("Mul", [x, one_plus]), b.const(np.array(0.5, np.float32), prefix="half")])


def _layer_normalization(b: ModelBuilder, x: str, dim: int) -> str:
    gamma = b.const((1 + 0.1 * b.rng.standard_normal(dim)).astype(np.float32), prefix="ln_scale")
    beta = b.const((0.1 * b.rng.standard_normal(dim)).astype(np.float32), prefix="ln_bias")
    return b.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-5)


def transformer_encoder(
    *, tokens: int = 16, dim: int = 32, heads: int = 4, ffn: int = 64, layers: int = 2, seed: int = 21
) -> onnx.ModelProto:
    """A BERT-style encoder, input `input` [batch, tokens, dim] -> `embedding` [batch, dim] (mean over the
    tokens): per layer Q/K/V projections (MatMul + bias Add) split into heads (Reshape with 0 entries,
    Transpose), Softmax attention, the output projection, a residual Add and LayerNormalization; then an FFN
    with Erf GELU, a residual Add and LayerNormalization. MatMuls carry nearly all the MACs."""
    width = dim // heads
    b = ModelBuilder((tokens, dim), opset=17, seed=seed)
    split = b.const(np.array([0, 0, heads, width], np.int64), prefix="heads")
    merge = b.const(np.array([0, 0, dim], np.int64), prefix="merge")
    scale = b.const(np.array(np.sqrt(width), np.float32), prefix="sqrt_d")
    x = b.input
    for _ in range(layers):
        q, k, v = (b.op("Reshape", [_linear(b, x, dim, dim), split]) for _ in range(3))
        q = b.op("Transpose", [q], perm=[0, 2, 1, 3])
        k = b.op("Transpose", [k], perm=[0, 2, 3, 1])
        v = b.op("Transpose", [v], perm=[0, 2, 1, 3])
        scores = b.op("Div", [b.op("MatMul", [q, k]), scale])
        context = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
        context = b.op("Reshape", [b.op("Transpose", [context], perm=[0, 2, 1, 3]), merge])
        x = _layer_normalization(b, b.op("Add", [x, _linear(b, context, dim, dim)]), dim)
        hidden = _gelu_erf(b, _linear(b, x, dim, ffn))
        x = _layer_normalization(b, b.op("Add", [x, _linear(b, hidden, ffn, dim)]), dim)
    pooled = b.op("ReduceMean", [x], axes=[1], keepdims=0)
    model = b.build(pooled)
    model.graph.output[0].name = "embedding"
    model.graph.node[-1].output[0] = "embedding"
    return model


# ----------------------------------------------------------------------------------------------------
# Small encoders in the two PyTorch exporters' patterns, for the attention-head rules

SPLIT_TARGETS = ("concat_heads", "concat_minus_one", "const_heads", "const_minus_one")
MERGE_TARGETS = ("concat_features", "concat_minus_one", "const_features", "const_minus_one")


def _unsqueezed_dim(b: ModelBuilder, x: str, axis: int) -> str:
    """Unsqueeze(Gather(Shape(x), axis)): one entry of a run-time target, as the TorchScript exporter builds it."""
    dim = b.op("Gather", [b.op("Shape", [x]), b.const(np.array(axis, np.int64), prefix="axis")], axis=0)
    return b.op("Unsqueeze", [dim, b.const(np.array([0], np.int64), prefix="axes")])


def _target(b: ModelBuilder, x: str, form: str, tail: Sequence[int]) -> str:
    """A Reshape target [batch, seq, *tail]: Concat(Unsqueeze(Gather(Shape(x))) ×2, tail) ('concat_*') or the
    constant [0, 0, *tail] ('const_*', the dynamo exporter's)."""
    if form.startswith("const"):
        return b.const(np.array([0, 0, *tail], np.int64), prefix="target")
    pieces = [_unsqueezed_dim(b, x, 0), _unsqueezed_dim(b, x, 1)]
    pieces += [b.const(np.array([entry], np.int64), prefix="entry") for entry in tail]
    return b.op("Concat", pieces, axis=0)


def _encoder_layer_norm(b: ModelBuilder, x: str, dim: int, decomposed: bool) -> str:
    if not decomposed:
        gamma = b.const((1 + 0.1 * b.rng.standard_normal(dim)).astype(np.float32), prefix="gamma")
        beta = b.const((0.1 * b.rng.standard_normal(dim)).astype(np.float32), prefix="beta")
        return b.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-5)
    mean = b.op("ReduceMean", [x], axes=[-1], keepdims=1)
    centered = b.op("Sub", [x, mean])
    variance = b.op("ReduceMean", [b.op("Mul", [centered, centered])], axes=[-1], keepdims=1)
    std = b.op("Sqrt", [b.op("Add", [variance, b.const(np.array(1e-5, np.float32), prefix="eps")])])
    gamma = b.const((1 + 0.1 * b.rng.standard_normal(dim)).astype(np.float32), prefix="gamma")
    beta = b.const((0.1 * b.rng.standard_normal(dim)).astype(np.float32), prefix="beta")
    return b.op("Add", [b.op("Mul", [b.op("Div", [centered, std]), gamma]), beta])


def _projection(b: ModelBuilder, x: str, d_in: int, d_out: int) -> str:
    """MatMul then the bias Add with the bias first, as torch exports nn.Linear on a 3-D input."""
    weight = (b.rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
    y = b.op("MatMul", [x, b.const(weight)], channels=d_out)
    return b.op("Add", [b.const((0.1 * b.rng.standard_normal(d_out)).astype(np.float32), prefix="b"), y], channels=d_out)


def encoder_model(
    *,
    exporter: str = "torchscript",
    layers: int = 2,
    heads: int = 4,
    head_size: int = 4,
    ffn: int = 24,
    split_target: str | None = None,
    merge_target: str | None = None,
    decomposed_norm: bool | None = None,
    shared_targets: bool = False,
    seed: int = 21,
) -> onnx.ModelProto:
    """A BERT-style encoder: x [batch, seq, heads·head_size] and attention_mask [batch, seq] (1 keep, 0 pad) → the
    last hidden state. Batch and sequence length are symbolic.

    `exporter` sets the defaults of the patterns: 'torchscript' (torch.onnx.export): reshape targets built
    at run time, Concat(Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1)), [heads], [head_size]),
    the scores divided by sqrt(head_size), LayerNorm decomposed; 'dynamo': constant targets [0, 0, -1,
    head_size] and [0, 0, -1], Q and Kᵀ each multiplied by head_size^-1/4, LayerNormalization. The Erf-GELU FFN
    and the additive mask (1 − mask)·−10000 broadcast over heads and queries are common to both.
    `shared_targets`: Q, K and V of a layer reshape by one target (one Concat, or one initializer).
    """
    torchscript = exporter == "torchscript"
    split_target = split_target or ("concat_heads" if torchscript else "const_minus_one")
    merge_target = merge_target or ("concat_features" if torchscript else "const_minus_one")
    decomposed = torchscript if decomposed_norm is None else decomposed_norm
    hidden = heads * head_size
    b = ModelBuilder((1,), opset=17, seed=seed, input_name="x")
    b.inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden]),
        helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, ["batch", "seq"]),
    ]
    b.channels.update({"x": hidden, "attention_mask": 1})
    keep = b.op("Unsqueeze", ["attention_mask", b.const(np.array([1, 2], np.int64), prefix="axes")])
    additive = b.op("Mul", [b.op("Sub", [b.const(np.array(1.0, np.float32), prefix="one"), keep], channels=1),
                            b.const(np.array(-10000.0, np.float32), prefix="big")])
    x = "x"
    split_tail = [-1 if split_target.endswith("minus_one") else heads, head_size]
    merge_tail = [-1 if merge_target.endswith("minus_one") else hidden]
    for _ in range(layers):
        per_head = []
        shared = _target(b, x, split_target, split_tail) if shared_targets else None
        for role in ("query", "key", "value"):
            y = _projection(b, x, hidden, hidden)
            y = b.op("Reshape", [y, shared or _target(b, y, split_target, split_tail)], channels=heads)
            perm = [0, 2, 3, 1] if role == "key" else [0, 2, 1, 3]
            per_head.append(b.op("Transpose", [y], perm=perm))
        q, k_t, v = per_head
        if torchscript:
            scores = b.op("MatMul", [q, k_t])
            scores = b.op("Div", [scores, b.const(np.array(np.sqrt(head_size), np.float32), prefix="sqrt_d")])
        else:
            scale = b.const(np.array(head_size ** -0.25, np.float32), prefix="scale")
            scores = b.op("MatMul", [b.op("Mul", [q, scale]), b.op("Mul", [k_t, scale])])
        probs = b.op("Softmax", [b.op("Add", [scores, additive])], axis=-1)
        context = b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        context = b.op("Reshape", [context, _target(b, context, merge_target, merge_tail)], channels=hidden)
        x = _encoder_layer_norm(b, b.op("Add", [_projection(b, context, hidden, hidden), x]), hidden, decomposed)
        inner = _projection(b, x, hidden, ffn)
        erf = b.op("Erf", [b.op("Div", [inner, b.const(np.array(np.sqrt(2.0), np.float32), prefix="sqrt2")])])
        gelu = b.op("Mul", [b.op("Mul", [inner, b.op("Add", [erf, b.const(np.array(1.0, np.float32), prefix="one")])]),
                            b.const(np.array(0.5, np.float32), prefix="half")])
        x = _encoder_layer_norm(b, b.op("Add", [_projection(b, gelu, ffn, hidden), x]), hidden, decomposed)
    return b.build(x)
