"""Tiny models for the loading/normalization and cost tests, shaped like real exports (see PATTERNS.md)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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
