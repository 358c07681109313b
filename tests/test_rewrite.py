"""Rewrite tests: every pattern pruned and checked against the masked oracle, weight shapes and onnx.checker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import STORAGES, ModelBuilder, encoder_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from oracle import assert_outputs_close, check_prune, masked_model, run_model

from onnxslim.analysis.groups import ChannelGroup, find_channel_groups
from onnxslim.errors import ValidationError
from onnxslim.io import load_model, normalize_model, random_inputs, resolve_input_shapes
from onnxslim.prune import PrunePlan, prune_model, rewrite_model

MODELS = Path(__file__).resolve().parent.parent / "models"


def _group_with_source_op(groups: tuple[ChannelGroup, ...], node_name_part: str) -> ChannelGroup:
    return next(g for g in groups if any(node_name_part in s.node for s in g.sources))


def _initializer_shape(model: onnx.ModelProto, node_op: str, index: int, nth: int = 0) -> tuple[int, ...]:
    node = [n for n in model.graph.node if n.op_type == node_op][nth]
    return next(tuple(t.dims) for t in model.graph.initializer if t.name == node.input[index])


# ----------------------------------------------------------------------------------- sources and sinks


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("bias", ["input", "add", None])
def test_conv_chain_with_every_weight_storage_and_bias_form(storage: str, bias: str | None) -> None:
    b = ModelBuilder((3, 8, 8))
    y = b.relu(b.conv(b.input, 8, 3, bias=bias, storage=storage))
    y = b.relu(b.conv(y, 6, 3, bias=bias, storage=storage))
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.5)
    assert result.pruned_groups == 2
    assert _initializer_shape(result.model, "Conv", 1, 0) == (4, 3, 3, 3)
    assert _initializer_shape(result.model, "Conv", 1, 1) == (3, 4, 3, 3)
    assert _initializer_shape(result.model, "Conv", 1, 2) == (4, 3, 1, 1)
    if bias == "add":
        assert _initializer_shape(result.model, "Add", 1, 0) == (1, 4, 1, 1)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_mlp_with_gemm(trans_b: int) -> None:
    b = ModelBuilder((12,))
    y = b.relu(b.gemm(b.input, 16, trans_b=trans_b))
    y = b.op("Tanh", [b.gemm(y, 10, trans_b=trans_b)])
    result = check_prune(b.build(b.gemm(y, 3, trans_b=trans_b)), ratio=0.5)
    assert result.pruned_groups == 2
    first = _initializer_shape(result.model, "Gemm", 1, 0)
    assert first == ((8, 12) if trans_b else (12, 8))
    assert _initializer_shape(result.model, "Gemm", 2, 0) == (8,)


def test_mlp_with_matmul_add_and_gelu() -> None:
    b = ModelBuilder((5, 12), opset=20)  # [batch, tokens, features]: channels on the last axis
    b.channels[b.input] = 12
    y = b.op("Gelu", [b.matmul(b.input, 16)])
    y = b.op("Erf", [b.matmul(y, 8)])
    result = check_prune(b.build(b.matmul(y, 4)), ratio=0.25)
    assert _initializer_shape(result.model, "MatMul", 1, 0) == (12, 12)
    assert _initializer_shape(result.model, "MatMul", 1, 1) == (12, 6)
    assert _initializer_shape(result.model, "Add", 1, 0) == (12,)


def test_conv_transpose_as_source_and_sink() -> None:
    b = ModelBuilder((4, 6, 6))
    weight = b.const(b.random(4, 8, 2, 2))
    y = b.op("ConvTranspose", [b.input, weight, b.const(b.random(8))], channels=8, strides=[2, 2])
    y = b.relu(y)
    weight2 = b.const(b.random(8, 5, 3, 3))
    y = b.op("ConvTranspose", [y, weight2, b.const(b.random(5))], channels=5)
    result = check_prune(b.build(b.conv(b.relu(y), 3)), ratio=0.5)
    assert _initializer_shape(result.model, "ConvTranspose", 1, 0) == (4, 4, 2, 2)
    assert _initializer_shape(result.model, "ConvTranspose", 1, 1) == (4, 3, 3, 3)


# --------------------------------------------------------------------------------------- followers


@pytest.mark.parametrize("storage", STORAGES)
def test_batchnorm_statistics_are_sliced(storage: str) -> None:
    b = ModelBuilder((3, 8, 8))
    y = b.relu(b.bn(b.conv(b.input, 8, 3, bias=None), storage=storage))
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.5)
    bn = next(n for n in result.model.graph.node if n.op_type == "BatchNormalization")
    assert all(next(t.dims for t in result.model.graph.initializer if t.name == name) == [4] for name in bn.input[1:])


def test_instance_norm_and_prelu() -> None:
    b = ModelBuilder((3, 8, 8))
    y = b.prelu(b.instance_norm(b.conv(b.input, 8, 3)))
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.5)
    assert _initializer_shape(result.model, "InstanceNormalization", 1) == (4,)
    assert _initializer_shape(result.model, "PRelu", 1) == (4, 1, 1)


@pytest.mark.parametrize("shape", ["1c11", "c11"])
@pytest.mark.parametrize("storage", ["initializer", "computed"])
def test_decomposed_batchnorm_as_per_channel_mul_add(shape: str, storage: str) -> None:
    b = ModelBuilder((3, 8, 8))
    y = b.conv(b.input, 8, 3, bias=None)
    y = b.per_channel("Add", b.per_channel("Mul", y, shape=shape, storage=storage), shape=shape, storage=storage)
    y = b.per_channel("Sub", b.per_channel("Div", y, shape=shape), shape=shape)
    result = check_prune(b.build(b.conv(b.relu(y), 4)), ratio=0.5)
    expected = (1, 4, 1, 1) if shape == "1c11" else (4, 1, 1)
    for op in ("Mul", "Add", "Div", "Sub"):
        assert _initializer_shape(result.model, op, 1) == expected


def test_per_channel_constant_shared_with_another_group_is_copied() -> None:
    b = ModelBuilder((3, 8, 8))
    scale = b.const(b.random(1, 8, 1, 1, low=0.5, high=1.5), prefix="shared")
    left = b.relu(b.op("Mul", [b.conv(b.input, 8, 3), scale]))
    right = b.relu(b.op("Mul", [b.conv(b.input, 8, 1), scale]))
    left = b.conv(left, 4)
    right = b.conv(right, 4)
    result = check_prune(b.build(b.op("Concat", [left, right], axis=1, channels=8)), ratio=0.5)
    assert result.pruned_groups == 2
    muls = [n for n in result.model.graph.node if n.op_type == "Mul"]
    assert muls[0].input[1] != muls[1].input[1]  # each user got its own sliced copy
    assert _initializer_shape(result.model, "Mul", 1, 0) == _initializer_shape(result.model, "Mul", 1, 1) == (1, 4, 1, 1)


def test_a_constant_read_twice_in_one_group_stays_one_tensor() -> None:
    """Read by two nodes of the same group (an unrolled LSTM's recurrent weight is read by every step), a
    constant is sliced once: both readers share the one sliced copy (it was one copy per reader)."""
    b = ModelBuilder((3, 8, 8))
    scale = b.const(b.random(1, 8, 1, 1, low=0.5, high=1.5), prefix="shared")
    y = b.relu(b.op("Mul", [b.conv(b.input, 8, 3), scale]))
    y = b.relu(b.op("Mul", [y, scale]))
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.5)
    muls = [n for n in result.model.graph.node if n.op_type == "Mul"]
    assert len(muls) == 2 and muls[0].input[1] == muls[1].input[1]
    assert _initializer_shape(result.model, "Mul", 1, 0) == (1, 4, 1, 1)
    assert sum(1 for t in result.model.graph.initializer if list(t.dims) == [1, 4, 1, 1]) == 1


def test_scalar_arithmetic_passes_through() -> None:
    b = ModelBuilder((3, 8, 8))
    y = b.conv(b.input, 8, 3)
    y = b.scalar("Add", y, 3.0)
    y = b.scalar("Mul", y, 0.5, rank1=True)
    y = b.scalar("Div", y, 6.0)
    y = b.scalar("Sub", y, 0.1, rank1=True)
    y = b.scalar("Pow", b.relu(y), 2.0)
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.5)
    assert result.pruned_groups == 1


# --------------------------------------------------------------------------------------- activations

UNARY = [
    ("Relu", 13, {}), ("LeakyRelu", 13, {"alpha": 0.1}), ("Sigmoid", 13, {}), ("Tanh", 13, {}),
    ("HardSigmoid", 13, {}), ("HardSwish", 14, {}), ("Elu", 13, {}), ("Selu", 13, {}), ("Softplus", 13, {}),
    ("Softsign", 13, {}), ("Mish", 18, {}), ("Gelu", 20, {}), ("Erf", 13, {}), ("Celu", 13, {}),
    ("Identity", 13, {}), ("Dropout", 13, {}), ("Cast", 13, {"to": onnx.TensorProto.FLOAT}), ("Abs", 13, {}),
]


@pytest.mark.parametrize(("op", "opset", "attrs"), UNARY, ids=[u[0] for u in UNARY])
def test_unary_activation_passes_channels(op: str, opset: int, attrs: dict) -> None:
    b = ModelBuilder((3, 6, 6), opset=opset)
    y = b.op(op, [b.bn(b.conv(b.input, 8, 3))], **attrs)
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.5)
    assert result.pruned_groups == 1


@pytest.mark.parametrize("opset", [9, 13])
def test_relu6_as_clip_with_attributes_or_inputs(opset: int) -> None:
    b = ModelBuilder((3, 6, 6), opset=opset)
    y = b.relu6(b.bn(b.conv(b.input, 8, 3)))
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.5)
    assert result.pruned_groups == 1


def test_silu_two_paths_joined_by_mul() -> None:
    b = ModelBuilder((3, 6, 6))
    y = b.silu(b.bn(b.conv(b.input, 8, 3)))
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.5)
    assert result.pruned_groups == 1


@pytest.mark.parametrize(("form", "opset"), [("op", 14), ("hardsigmoid", 13), ("clip", 13), ("clip", 11)])
def test_hardswish_forms(form: str, opset: int) -> None:
    b = ModelBuilder((3, 6, 6), opset=opset)
    y = b.hardswish(b.bn(b.conv(b.input, 8, 3)), form)
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.5)
    assert result.pruned_groups == 1


# ------------------------------------------------------------------------------ spatial pass-through


@pytest.mark.parametrize(
    ("op", "attrs"),
    [
        ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
        ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
        ("GlobalAveragePool", {}),
        ("GlobalMaxPool", {}),
    ],
)
def test_pooling_passes_channels(op: str, attrs: dict) -> None:
    b = ModelBuilder((3, 8, 8))
    y = b.op(op, [b.relu(b.conv(b.input, 8, 3))], **attrs)
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.5)
    assert result.pruned_groups == 1


@pytest.mark.parametrize("opset", [13, 18])
def test_reduce_over_spatial_axes_then_gemm(opset: int) -> None:
    b = ModelBuilder((3, 8, 8), opset=opset)
    y = b.relu(b.conv(b.input, 8, 3))
    if opset >= 18:
        axes = b.const(np.array([2, 3], np.int64), prefix="axes")
        pooled = b.op("ReduceMean", [y, axes], keepdims=0)
        peak = b.op("ReduceMax", [y, axes], keepdims=0)
    else:
        pooled = b.op("ReduceMean", [y], axes=[2, 3], keepdims=0)
        peak = b.op("ReduceMax", [y], axes=[-1, -2], keepdims=0)
    result = check_prune(b.build(b.gemm(b.op("Add", [pooled, peak]), 5)), ratio=0.5)
    assert _initializer_shape(result.model, "Gemm", 1) == (5, 4)


@pytest.mark.parametrize("form", ["scales", "sizes"])
def test_resize(form: str) -> None:
    b = ModelBuilder((3, 4, 4), opset=13)
    y = b.relu(b.conv(b.input, 8, 3))
    empty = b.const(np.zeros(0, np.float32), prefix="roi")
    if form == "scales":
        inputs = [y, empty, b.const(np.array([1, 1, 2, 2], np.float32), prefix="scales")]
    else:
        sizes = b.const(np.array([1, 8, 8, 8], np.int64), prefix="sizes")
        inputs = [y, empty, empty, sizes]
    y = b.op("Resize", inputs, mode="nearest")
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.5)
    if form == "sizes":
        resize = next(n for n in result.model.graph.node if n.op_type == "Resize")
        sizes = next(t for t in result.model.graph.initializer if t.name == resize.input[3])
        assert onnx.numpy_helper.to_array(sizes).tolist() == [1, 4, 8, 8]


@pytest.mark.parametrize("opset", [10, 13])
def test_pad_on_spatial_axes(opset: int) -> None:
    b = ModelBuilder((3, 6, 6), opset=opset)
    y = b.relu(b.conv(b.input, 8, 3))
    pads = [0, 0, 1, 2, 0, 0, 2, 1]
    if opset >= 11:
        y = b.op("Pad", [y, b.const(np.array(pads, np.int64), prefix="pads")], mode="reflect")
    else:
        y = b.op("Pad", [y], pads=pads, mode="constant", value=0.5)
    check_prune(b.build(b.conv(y, 4)), ratio=0.5)


def test_depthwise_conv_passes_channels_and_changes_group() -> None:
    b = ModelBuilder((3, 8, 8))
    y = b.relu(b.bn(b.conv(b.input, 8, 1, bias=None)))
    y = b.relu(b.bn(b.depthwise(y, 3, bias=None)))
    y = b.depthwise(y, 3)
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.5)
    assert _initializer_shape(result.model, "Conv", 1, 1) == (4, 1, 3, 3)
    assert _initializer_shape(result.model, "Conv", 2, 2) == (4,)


# -------------------------------------------------------------------------------------------- joins


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Max", "Min"])
def test_residual_join(op: str) -> None:
    b = ModelBuilder((3, 6, 6))
    x = b.relu(b.conv(b.input, 8, 3))
    y = b.conv(b.relu(b.conv(x, 6, 3)), 8, 3)
    joined = b.relu(b.op(op, [x, y]))
    result = check_prune(b.build(b.conv(joined, 4)), ratio=0.5)
    group = _group_with_source_op(result.groups, "Conv_")
    assert len(group.sources) == 2 and group.prunable
    assert result.pruned_groups == 2


def test_div_and_three_input_sum_and_mean() -> None:
    b = ModelBuilder((3, 6, 6), opset=9)
    x = b.relu(b.conv(b.input, 8, 3))
    y = b.relu(b.conv(x, 8, 3))
    z = b.op("Sigmoid", [b.conv(y, 8, 1)])
    total = b.op("Sum", [x, y, b.op("Div", [x, b.scalar("Add", z, 1.0)])])
    mean = b.op("Mean", [total, y])
    result = check_prune(b.build(b.conv(mean, 4)), ratio=0.5)
    assert sum(len(g.sources) for g in result.groups if g.prunable) == 3


@pytest.mark.parametrize("gate", ["Sigmoid", "HardSigmoid"])
def test_squeeze_excite(gate: str) -> None:
    b = ModelBuilder((3, 6, 6))
    x = b.relu(b.bn(b.conv(b.input, 8, 3)))
    y = b.se(x, 4, gate)
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.5)
    assert result.pruned_groups == 2  # the main group (with the expand conv) and the squeeze conv's own


def test_spatial_attention_broadcast_joins_nothing() -> None:
    b = ModelBuilder((3, 6, 6))
    x = b.relu(b.conv(b.input, 8, 3))
    attention = b.op("Sigmoid", [b.conv(x, 1, 3)])  # [N, 1, H, W]
    y = b.op("Mul", [x, attention])
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.5)
    main = result.groups[0]
    assert main.prunable and len(main.sources) == 1
    assert _initializer_shape(result.model, "Conv", 1, 1) == (1, 4, 3, 3)


# ------------------------------------------------------------------------------------------- layout


def test_transpose_to_channels_last_then_matmul() -> None:
    b = ModelBuilder((3, 4, 4))
    y = b.relu(b.conv(b.input, 8, 3))
    y = b.op("Transpose", [y], perm=[0, 2, 3, 1])
    result = check_prune(b.build(b.matmul(y, 5)), ratio=0.5)
    assert _initializer_shape(result.model, "MatMul", 1) == (4, 5)


@pytest.mark.parametrize("opset", [11, 13])
def test_global_pool_flatten_or_squeeze_into_gemm(opset: int) -> None:
    b = ModelBuilder((3, 4, 4), opset=opset)
    y = b.op("GlobalAveragePool", [b.relu(b.conv(b.input, 8, 3))])
    flat = b.op("Flatten", [y], axis=1)
    if opset >= 13:
        squeezed = b.op("Squeeze", [y, b.const(np.array([2, 3], np.int64), prefix="axes")])
    else:
        squeezed = b.op("Squeeze", [y], axes=[3, 2])
    result = check_prune(b.build(b.op("Add", [b.gemm(flat, 5), b.gemm(squeezed, 5)])), ratio=0.5)
    assert _initializer_shape(result.model, "Gemm", 1) == (5, 4)


# ------------------------------------------------------------------------------------------ blockers


def test_unknown_op_blocks_its_group_and_the_rest_still_prunes() -> None:
    b = ModelBuilder((3, 6, 6))
    x = b.relu(b.conv(b.input, 8, 3))
    blocked = b.op("LpNormalization", [b.conv(x, 6, 3)], axis=1)
    y = b.relu(b.conv(blocked, 8, 3))
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.5)
    status = {g.id: g.blocked_by for g in result.groups}
    blocker = next(v for v in status.values() if v is not None and "LpNormalization" in v.reason)
    assert blocker.reason == "unsupported op LpNormalization"
    assert result.pruned_groups == 2  # the first conv's and the one after the blocker


# ------------------------------------------------------------------------------------- combinations


def test_residual_stage_with_se_gates_and_depthwise_convs() -> None:
    b = ModelBuilder((3, 8, 8), opset=14)
    x = b.hardswish(b.bn(b.conv(b.input, 8, 3, bias=None)))
    for _ in range(2):
        y = b.relu(b.bn(b.conv(x, 16, 1, bias=None)))
        y = b.silu(b.bn(b.depthwise(y, 3, bias=None)))
        y = b.se(y, 4, "HardSigmoid")
        y = b.bn(b.conv(y, 8, 1, bias=None))
        x = b.op("Add", [x, y])
    result = check_prune(b.build(b.conv(x, 4)), ratio=0.4)
    assert result.pruned_groups == 5  # the stage's residual group, 2 expand groups, 2 squeeze groups


def test_conv_bn_hardswish_chain_with_reshape_of_constant_bias() -> None:
    b = ModelBuilder((3, 8, 8), opset=11)
    y = b.conv(b.input, 8, 3, bias="add", storage="computed")
    y = b.hardswish(b.bn(y, storage="constant"), "clip")
    y = b.conv(y, 6, 3, bias="add", storage="computed")
    y = b.hardswish(b.bn(y, storage="computed"), "hardsigmoid")
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.5)
    assert result.pruned_groups == 2
    assert _initializer_shape(result.model, "Add", 1, 0) == (1, 4, 1, 1)


@pytest.mark.parametrize("criterion", ["l1", "l2"])
@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_mixed_network_at_several_ratios(criterion: str, ratio: float) -> None:
    b = ModelBuilder((3, 8, 8), opset=13, seed=3)
    x = b.relu(b.bn(b.conv(b.input, 12, 3)))
    y = b.relu6(b.bn(b.depthwise(x, 3)))
    y = b.se(y, 3)
    x = b.op("Sum", [x, b.bn(b.conv(y, 12, 1)), b.per_channel("Mul", x)])
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.op("Flatten", [b.op("GlobalAveragePool", [b.silu(b.conv(x, 10, 3))])])
    check_prune(b.build(b.gemm(b.relu(b.gemm(x, 16)), 3)), ratio=ratio, criterion=criterion)


def test_ratio_zero_gives_the_original_outputs() -> None:
    b = ModelBuilder((3, 6, 6))
    y = b.se(b.relu(b.bn(b.conv(b.input, 8, 3))), 4)
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.0, expect_pruned=False)
    assert result.channels_removed == 0


def test_a_plan_that_keeps_every_channel_rewrites_to_the_original() -> None:
    """Drive the rewrite itself with a keep-everything plan for every prunable group: every handler runs on
    every member, and the result must equal the model as given (ratio 0 never reaches the rewrite)."""
    b = ModelBuilder((3, 6, 6))
    y = b.se(b.relu(b.bn(b.conv(b.input, 8, 3))), 4)
    model = b.build(b.gemm(b.op("Flatten", [b.conv(y, 4)], channels=4 * 6 * 6), 5))
    normalized = normalize_model(model)[0]
    shapes = {"input": (1, 3, 6, 6)}
    groups = find_channel_groups(normalized, shapes)
    everything = PrunePlan({g.id: tuple(range(g.channels)) for g in groups if g.prunable})
    assert len(everything.kept) >= 3
    rewritten = rewrite_model(normalized, groups, everything, shapes)
    feeds = random_inputs(normalized, shapes, seed=2)
    assert_outputs_close(run_model(rewritten, feeds), run_model(model, feeds), 1e-6)



def _token_gate_model() -> onnx.ModelProto:
    """Tokens [batch, 10, 16], channels last: h = relu(x W1) is gated by g = sigmoid(reshape(mean_tokens(x W3)))
    of shape [batch, 1, 32], the Reshape's shape computed from Shape(input) (a blocker), as PyTorch exports
    `fc3(x).mean(1).reshape(x.shape[0], 1, -1)`."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in
               (("w0", (16, 16)), ("w1", (16, 32)), ("w3", (16, 32)), ("w2", (32, 16)), ("head", (16, 8)))}
    consts = {"one": np.array([1], np.int64), "minus_one": np.array([-1], np.int64), "zero": np.array([0], np.int64)}
    nodes = [
        helper.make_node("MatMul", ["input", "w0"], ["a0"], name="fc0"),
        helper.make_node("Relu", ["a0"], ["x"], name="relu0"),
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Relu", ["h0"], ["h"], name="relu1"),
        helper.make_node("MatMul", ["x", "w3"], ["g0"], name="fc3"),
        helper.make_node("ReduceMean", ["g0"], ["g1"], name="mean", axes=[1], keepdims=0),
        helper.make_node("Shape", ["input"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="batch", axis=0),
        helper.make_node("Concat", ["batch", "one", "minus_one"], ["target0"], name="target", axis=0),
        # a Cast hides the Concat from the Reshape rule (which follows a -1 channel entry in a Concat target)
        helper.make_node("Cast", ["target0"], ["target"], name="target_cast", to=TensorProto.INT64),
        helper.make_node("Reshape", ["g1", "target"], ["g2"], name="reshape"),
        helper.make_node("Sigmoid", ["g2"], ["g"], name="sigmoid"),
        helper.make_node("Mul", ["h", "g"], ["gated"], name="gate"),
        helper.make_node("MatMul", ["gated", "w2"], ["y0"], name="fc2"),
        helper.make_node("Relu", ["y0"], ["y"], name="relu2"),
        helper.make_node("MatMul", ["y", "head"], ["output"], name="head_fc"),
    ]
    graph = helper.make_graph(
        nodes, "token_gate",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 10, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10, 8])],
        [numpy_helper.from_array(v, k) for k, v in {**weights, **consts}.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_channels_last_gate_from_a_blocker_blocks_the_group_it_multiplies() -> None:
    """The gate's channels are on axis 2, where h's are; it comes out of a blocker, whose output axis is only
    assumed (1, where the gate has size 1). Taking it for a broadcast once pruned h alone (the Mul failed)."""
    result = check_prune(_token_gate_model(), ratio=0.5)
    gated = _group_with_source_op(result.groups, "fc1")
    assert gated.blocked_by is not None and gated.blocked_by.node == "gate"
    assert "varies along the channel axis" in gated.blocked_by.reason and "reshape: Reshape" in gated.blocked_by.reason
    assert _group_with_source_op(result.groups, "fc0").prunable and result.pruned_groups >= 1



def _shape_read_model(form: str) -> onnx.ModelProto:
    """y = relu(conv(x)); Shape(y) read as PyTorch exports `y.shape[-2:]` (form "slice"), `y.shape[2], y.shape[3]`
    ("gather") or Shape(start=2) ("start") builds the sizes of a Resize of a pooled branch; form "channels"
    also multiplies the output by the channel count `y.shape[1]`, which pruning changes."""
    b = ModelBuilder((3, 8, 8), opset=17)
    y = b.relu(b.conv(b.input, 8, 3))
    z = b.conv(b.op("AveragePool", [y], kernel_shape=[2, 2], strides=[2, 2]), 4)
    shape = b.op("Shape", [y], channels=0, **({"start": 2} if form == "start" else {}))

    def gather(*indices: int) -> str:
        return b.op("Gather", [shape, b.const(np.array(indices, np.int64))], channels=0, axis=0)

    if form == "start":
        spatial = shape
    elif form == "slice":
        spatial = b.op("Slice", [shape, b.const(np.array([2], np.int64)), b.const(np.array([4], np.int64))], channels=0)
    else:
        spatial = b.op("Concat", [gather(2), gather(3)], channels=0, axis=0)
    sizes = b.op("Concat", [b.const(np.array([1, 4], np.int64)), spatial], channels=0, axis=0)
    up = b.op("Resize", [z, "", "", sizes], mode="nearest")
    out = b.conv(b.op("Add", [up, b.conv(y, 4)]), 2)
    if form == "channels":
        out = b.op("Mul", [out, b.op("Cast", [gather(1)], channels=0, to=onnx.TensorProto.FLOAT)])
    return b.build(out)


@pytest.mark.parametrize("form", ["slice", "gather", "start"])
def test_shape_of_the_other_dims_does_not_block(form: str) -> None:
    """`y.shape[-2:]`, `y.shape[2]`, or Shape(start=2) read no channel count: y's group stays prunable."""
    result = check_prune(_shape_read_model(form), ratio=0.5)
    assert result.groups[0].channels == 8 and result.groups[0].prunable  # y's group


def test_shape_read_at_the_channel_axis_blocks() -> None:
    result = check_prune(_shape_read_model("channels"), ratio=0.5, expect_pruned=False)
    blocked = result.groups[0].blocked_by
    assert result.groups[0].channels == 8 and blocked is not None and blocked.reason == "Shape reads the channel count"



# ----------------------------------------------------------------------------------------- grouped convs


def _regnet_y_block(b: ModelBuilder, x: str, width: int, group_width: int, storage: str = "initializer") -> str:
    """RegNetY: conv1x1 → BN → Relu → grouped conv3x3 (width / group_width groups) → BN → Relu → SE →
    conv1x1 → BN, added to x."""
    y = b.relu(b.bn(b.conv(x, width, 1, storage=storage)))
    y = b.relu(b.bn(b.conv(y, width, 3, group=width // group_width, storage=storage)))
    y = b.bn(b.conv(b.se(y, 4), b.channels[x], 1, storage=storage))
    return b.relu(b.op("Add", [x, y]))


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("budget", [{"ratio": 0.5}, {"ratio": None, "target_macs": 0.4}, {"ratio": 0.3, "round_to": 4}])
def test_regnet_and_resnext_blocks_hold_the_oracle(budget: dict, storage: str) -> None:
    """Grouped convs read and make channels per block; a plan removes as many from each block, and the
    rewrite slices every group's inputs out of its own part of the weight."""
    b = ModelBuilder((3, 8, 8), opset=13)
    x = b.relu(b.bn(b.conv(b.input, 16, 3)))
    x = _regnet_y_block(b, x, 24, 8, storage)  # 3 groups of 8
    x = _regnet_y_block(b, x, 32, 4, storage)  # 8 groups of 4
    y = b.relu(b.bn(b.conv(x, 32, 1)))  # ResNeXt: group 4 on 32
    x = b.relu(b.op("Add", [b.bn(b.conv(b.relu(b.bn(b.conv(y, 32, 3, group=4))), 16, 1)), x]))
    result = check_prune(b.build(b.conv(x, 4)), **budget)
    grouped = [g for g in result.groups if g.blocks > 1]
    assert sorted(g.blocks for g in grouped) == [3, 3, 4, 4, 8, 8]
    assert all(g.prunable for g in grouped) and sum(result.plan.changes(g) for g in grouped) >= 4


def test_grouped_conv_weights_keep_each_groups_own_inputs() -> None:
    """Input channel c of a group-2 conv is column c mod 4 of the rows of group c // 4: removing channels 1
    and 6 leaves columns (0, 2, 3) of group 0's rows and (0, 1, 3) of group 1's."""
    b = ModelBuilder((8, 4, 4))
    model = normalize_model(b.build(b.conv(b.conv(b.input, 8, 1), 6, 3, group=2)))[0]
    groups = find_channel_groups(model, resolve_input_shapes(model))
    first = next(g for g in groups if g.blocks == 2 and g.prunable)
    weight = next(numpy_helper.to_array(t) for t in model.graph.initializer if tuple(t.dims) == (6, 4, 3, 3))
    pruned = rewrite_model(model, groups, PrunePlan({first.id: (0, 2, 3, 4, 5, 7)}), resolve_input_shapes(model))
    new = next(numpy_helper.to_array(t) for t in pruned.graph.initializer if tuple(t.dims) == (6, 3, 3, 3))
    np.testing.assert_array_equal(new[:3], weight[:3][:, [0, 2, 3]])
    np.testing.assert_array_equal(new[3:], weight[3:][:, [0, 1, 3]])


# ------------------------------------------------------------------------------------ failure paths


def test_a_broken_rewrite_is_a_validation_error(monkeypatch: pytest.MonkeyPatch) -> None:
    b = ModelBuilder((3, 6, 6))
    model = normalize_model(b.build(b.conv(b.relu(b.bn(b.conv(b.input, 8, 3))), 4)))[0]
    result = prune_model(model, ratio=0.5)
    from onnxslim.prune import rewrite as rewrite_module

    handlers = dict(rewrite_module.REWRITE_HANDLERS)
    handlers["BatchNormalization"] = rewrite_module.RewriteHandler(prune_follower=lambda *args: None)
    monkeypatch.setattr(rewrite_module, "REWRITE_HANDLERS", handlers)
    with pytest.raises(ValidationError):
        rewrite_model(model, result.groups, result.plan, result.analysis_shapes)


def test_plan_for_a_blocked_group_is_refused() -> None:
    b = ModelBuilder((3, 6, 6))
    model = normalize_model(b.build(b.conv(b.input, 8, 3)))[0]
    result = prune_model(model, ratio=0.5)
    group = result.groups[0]
    assert not group.prunable
    with pytest.raises(ValidationError):
        rewrite_model(model, result.groups, PrunePlan({group.id: (0, 1)}), result.analysis_shapes)


# ---------------------------------------------------------------------------------- trained models

TRAINED = ["mnist_resnet", "mnist_resnet_bn", "mnist_mobilenet", "mnist_mobilenet_bn"]


@pytest.mark.parametrize("criterion", ["l1", "l2"])
@pytest.mark.parametrize("name", TRAINED)
def test_trained_models_prune_at_0_3(name: str, criterion: str) -> None:
    path = MODELS / f"{name}.onnx"
    model = load_model(path).model
    result = check_prune(model, ratio=0.3, criterion=criterion)
    assert result.macs_after < 0.8 * result.macs_before
    assert result.prunable_groups >= 8
    # the saved model keeps the symbolic batch dim and runs at another batch size
    dim = result.model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "batch"
    shapes = {"input": (3, 1, 28, 28)}
    outputs = run_model(result.model, random_inputs(model, shapes))
    assert outputs[0].shape == (3, 10)
    assert resolve_input_shapes(result.model) == {"input": (1, 1, 28, 28)}



CLI_DEFAULTS = {"round_to": 8, "protect_first": True, "protect_last": True}


@pytest.mark.parametrize("budget", [{"ratio": 0.3}, {"ratio": None, "target_macs": 0.5}], ids=["ratio", "target_macs"])
@pytest.mark.parametrize("name", ["mnist_resnet", "mnist_mobilenet_bn"])
def test_the_command_lines_defaults_hold_the_oracle(name: str, budget: dict) -> None:
    """What a user of `onnxslim prune` gets: channels rounded to multiples of 8, first and last layers kept."""
    result = check_prune(load_model(MODELS / f"{name}.onnx").model, **budget, **CLI_DEFAULTS)
    assert result.left_alone and result.pruned_groups >= 3
    kept = [g.channels - len(result.plan.removed(g)) for g in result.groups if result.plan.changes(g)]
    assert all(count % 8 == 0 for count in kept)


# ------------------------------------------------------------------------------- random compositions

BLOCKS = {
    "conv_bn_relu": lambda b, x: b.relu(b.bn(b.conv(x, 6, 3))),
    "conv_add_bias_hswish": lambda b, x: b.hardswish(b.conv(x, 5, 1, bias="add", storage="computed"), "clip"),
    "depthwise_prelu": lambda b, x: b.prelu(b.depthwise(x, 3)),
    "se": lambda b, x: b.se(x, 2, "HardSigmoid"),
    "residual": lambda b, x: b.op("Add", [x, b.bn(b.conv(b.relu(b.conv(x, 4, 1)), b.channels[x], 3))]),
    "silu_per_channel": lambda b, x: b.silu(b.per_channel("Add", b.per_channel("Mul", x))),
    "pool_scalar": lambda b, x: b.scalar("Mul", b.op("MaxPool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), 0.5),
    "instance_norm": lambda b, x: b.instance_norm(b.conv(x, 7, 3)),
    "grouped": lambda b, x: b.relu(b.conv(b.relu(b.conv(x, 8, 1)), 12, 3, group=4)),
}


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    blocks=st.lists(st.sampled_from(sorted(BLOCKS)), min_size=1, max_size=5),
    ratio=st.sampled_from([0.2, 0.5, 0.8]),
    criterion=st.sampled_from(["l1", "l2"]),
)
def test_random_compositions_hold_the_oracle(blocks: list[str], ratio: float, criterion: str) -> None:
    b = ModelBuilder((3, 6, 6), opset=13, seed=len(blocks))
    x = b.relu(b.conv(b.input, 6, 3))
    for block in blocks:
        x = BLOCKS[block](b, x)
    check_prune(b.build(b.conv(x, 3)), ratio=ratio, criterion=criterion)


# ------------------------------------------------------------------------------- concat and split


def _concat_channels(model: onnx.ModelProto) -> list[int]:
    """Channel count of every Concat output in the pruned model (from the inferred shapes)."""
    shapes = {v.name: v.type.tensor_type.shape.dim for v in [*model.graph.value_info, *model.graph.output]}
    return [shapes[n.output[0]][1].dim_value for n in model.graph.node if n.op_type == "Concat"]


def test_concat_of_two_groups_prunes_each_segment() -> None:
    b = ModelBuilder((3, 6, 6))
    left = b.relu(b.conv(b.input, 8, 3))
    right = b.relu(b.conv(b.input, 4, 1))
    result = check_prune(b.build(b.conv(b.concat(left, right), 5)), ratio=0.5)
    assert result.pruned_groups == 2
    assert _initializer_shape(result.model, "Conv", 1, 2) == (5, 6, 1, 1)  # 4 + 2 input channels
    assert _concat_channels(result.model) == [6]


def test_sppf_concat_of_the_same_group_four_times() -> None:
    b = ModelBuilder((8, 8, 8))
    x = b.relu(b.conv(b.input, 8, 3))
    result = check_prune(b.build(b.conv(b.sppf(x, 8), 4)), ratio=0.5)
    assert result.pruned_groups == 3
    sppf_in = _group_with_source_op(result.groups, "Conv_")
    assert sppf_in.prunable
    # SPPF's first conv keeps 2 of 4 channels; its concat (4 copies) feeds 8 channels into the last conv
    assert _initializer_shape(result.model, "Conv", 1, 2) == (4, 8, 1, 1)


def test_inception_block() -> None:
    b = ModelBuilder((3, 8, 8), opset=11)
    x = b.relu(b.conv(b.input, 8, 3))
    one = b.relu(b.conv(x, 4, 1))
    three = b.relu(b.conv(b.relu(b.conv(x, 4, 1)), 6, 3))
    five = b.relu(b.conv(b.relu(b.conv(x, 2, 1)), 4, 5))
    pool = b.relu(b.conv(b.op("MaxPool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), 3, 1))
    y = b.concat(one, three, five, pool)
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.5)
    assert result.pruned_groups == 7
    assert _concat_channels(result.model) == [2 + 3 + 2 + 2]


@pytest.mark.parametrize("opset", [11, 13, 21])
def test_densenet_block_with_batchnorm_after_concat(opset: int) -> None:
    b = ModelBuilder((3, 6, 6), opset=opset)
    features = b.conv(b.input, 6, 3)
    for _ in range(3):
        grown = b.conv(b.relu(b.bn(features)), 4, 3)
        features = b.concat(features, grown)
    result = check_prune(b.build(b.conv(b.relu(b.bn(features)), 4)), ratio=0.5)
    assert result.pruned_groups == 4
    assert _concat_channels(result.model) == [3 + 2, 3 + 2 + 2, 3 + 2 + 2 + 2]
    last_bn = [n for n in result.model.graph.node if n.op_type == "BatchNormalization"][-1]
    assert next(tuple(t.dims) for t in result.model.graph.initializer if t.name == last_bn.input[1]) == (9,)


@pytest.mark.parametrize("form", ["scales", "sizes"])
def test_fpn_resize_then_concat_with_lateral(form: str) -> None:
    b = ModelBuilder((3, 8, 8), opset=13)
    lateral = b.relu(b.conv(b.input, 6, 3))
    deep = b.relu(b.conv(b.op("MaxPool", [lateral], kernel_shape=[2, 2], strides=[2, 2]), 8, 3))
    empty = b.const(np.zeros(0, np.float32), prefix="roi")
    if form == "scales":
        inputs = [deep, empty, b.const(np.array([1, 1, 2, 2], np.float32), prefix="scales")]
    else:
        inputs = [deep, empty, empty, b.const(np.array([1, 8, 8, 8], np.int64), prefix="sizes")]
    up = b.op("Resize", inputs, mode="nearest")
    result = check_prune(b.build(b.conv(b.concat(up, lateral), 4)), ratio=0.5)
    assert _concat_channels(result.model) == [4 + 3]


def test_concat_on_a_spatial_axis_joins_the_groups() -> None:
    b = ModelBuilder((3, 6, 6))
    top, bottom = b.relu(b.conv(b.input, 8, 3)), b.relu(b.conv(b.input, 8, 1))
    result = check_prune(b.build(b.conv(b.concat(top, bottom, axis=2), 4)), ratio=0.5)
    joined = _group_with_source_op(result.groups, "Conv_")
    assert len(joined.sources) == 2 and joined.prunable


def test_join_of_a_concat_with_one_conv_cuts_the_conv_into_matching_segments() -> None:
    b = ModelBuilder((3, 6, 6))
    stacked = b.concat(b.relu(b.conv(b.input, 4, 3)), b.relu(b.conv(b.input, 6, 1)))
    whole = b.conv(b.input, 10, 3)
    result = check_prune(b.build(b.conv(b.op("Add", [stacked, whole]), 4)), ratio=0.5)
    assert result.pruned_groups == 2  # the 10-channel conv is cut into 4 + 6, each joined to one branch
    assert _initializer_shape(result.model, "Conv", 1, 2) == (5, 3, 3, 3)


def test_every_segment_keeps_at_least_one_channel() -> None:
    b = ModelBuilder((3, 6, 6))
    parts = [b.relu(b.conv(b.input, size, 1)) for size in (1, 2, 3)]
    result = check_prune(b.build(b.conv(b.concat(*parts), 4)), ratio=0.9)
    assert _concat_channels(result.model) == [3]
    assert all(len(kept) >= 1 for kept in result.plan.kept.values())


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_unequal_split_parts_get_their_own_new_sizes(opset: int) -> None:
    """Parts of 3 and 5 channels lose 1 and 2 at ratio 0.5: a rewrite that mixes up the sizes fails here."""
    b = ModelBuilder((3, 8, 8), opset=opset)
    hidden = b.relu(b.conv(b.input, 8, 3))
    small, large = b.split(hidden, [3, 5])
    joined = b.concat(b.relu(b.conv(small, 4, 1)), large)
    result = check_prune(b.build(b.conv(joined, 3)), ratio=0.5)
    split = next(n for n in result.model.graph.node if n.op_type == "Split")
    if opset >= 13:
        sizes = onnx.numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == split.input[1]))
        assert sizes.tolist() == [2, 3]
    else:
        assert next(list(a.ints) for a in split.attribute if a.name == "split") == [2, 3]


SPLIT_FORMS = [(11, False), (13, False), (13, True), (18, False), (18, True), (21, True)]


@pytest.mark.parametrize(("opset", "equal"), SPLIT_FORMS, ids=[f"opset{o}-{'equal' if e else 'sizes'}" for o, e in SPLIT_FORMS])
def test_c2f_with_split_in_every_opset_form(opset: int, equal: bool) -> None:
    b = ModelBuilder((3, 8, 8), opset=opset)
    x = b.relu(b.conv(b.input, 8, 3))
    hidden = b.silu(b.conv(x, 8, 1))
    parts = b.split(hidden, [4, 4], equal=equal)
    inner = b.silu(b.conv(b.silu(b.conv(parts[1], 4, 3)), 4, 3))
    parts.append(b.op("Add", [parts[1], inner]))
    result = check_prune(b.build(b.conv(b.silu(b.conv(b.concat(*parts), 8, 1)), 3)), ratio=0.5)
    split = next(n for n in result.model.graph.node if n.op_type == "Split")
    if opset >= 13:
        sizes = next(t for t in result.model.graph.initializer if t.name == split.input[1])
        assert onnx.numpy_helper.to_array(sizes).tolist() == [2, 2]
    else:
        assert next(list(a.ints) for a in split.attribute if a.name == "split") == [2, 2]
    assert not any(a.name == "num_outputs" for a in split.attribute)
    assert _concat_channels(result.model) == [6]
    cv1_groups = [g for g in result.groups if any(s.offset == 4 and s.extent == 8 for s in g.sources)]
    assert len(cv1_groups) == 1 and cv1_groups[0].prunable  # cv1's output is two independent groups


@pytest.mark.parametrize("opset", [9, 13])
def test_c2f_with_slice(opset: int) -> None:
    b = ModelBuilder((3, 8, 8), opset=opset)
    x = b.relu(b.conv(b.input, 8, 3))
    result = check_prune(b.build(b.conv(b.c2f(x, 8, use_slice=True), 3)), ratio=0.5)
    assert result.pruned_groups == 6  # stem, cv1's two halves, two bottleneck inner convs, cv2
    assert _concat_channels(result.model) == [2 + 2 + 2 + 2]


def test_slice_with_open_end_and_no_axes_and_unequal_parts() -> None:
    b = ModelBuilder((3, 6, 6), opset=13)
    y = b.relu(b.conv(b.input, 10, 3))
    head = b.slice_channels(y, 0, 3)
    tail = b.slice_channels(y, 3, np.iinfo(np.int64).max, axes=False)
    result = check_prune(b.build(b.op("Add", [b.conv(head, 4), b.conv(tail, 4)])), ratio=0.5)
    slices = [n for n in result.model.graph.node if n.op_type == "Slice"]
    values = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in result.model.graph.initializer}
    assert values[slices[0].input[2]] == [2]  # 3 channels → 2 kept (floor(0.5 · 3) = 1 removed)
    assert values[slices[1].input[1]] == [0, 2]
    assert _initializer_shape(result.model, "Conv", 1, 0) == (6, 3, 3, 3)


def test_slice_of_part_of_a_group_leaves_the_rest_unconsumed() -> None:
    b = ModelBuilder((3, 6, 6), opset=13)
    y = b.relu(b.conv(b.input, 8, 3))
    result = check_prune(b.build(b.conv(b.slice_channels(y, 2, 6), 4)), ratio=0.5)
    middle = [g for g in result.groups if g.prunable]
    assert [(g.channels, g.sources[0].offset) for g in middle] == [(4, 2)]
    assert _initializer_shape(result.model, "Conv", 1, 0) == (6, 3, 3, 3)


def test_split_of_a_graph_input_blocks_and_the_rest_prunes() -> None:
    b = ModelBuilder((4, 6, 6), opset=13)
    left, right = b.split(b.input, [1, 3])
    result = check_prune(b.build(b.conv(b.relu(b.conv(left, 6, 3)), 2), b.conv(right, 2)), ratio=0.5)
    assert result.pruned_groups == 1


# ------------------------------------------------------------------------ flatten / reshape → gemm


@pytest.mark.parametrize("form", ["flatten", "reshape_named", "reshape_inferred", "reshape_zero"])
def test_flatten_or_reshape_nchw_into_gemm_prunes_blocks_of_features(form: str) -> None:
    b = ModelBuilder((3, 4, 4), opset=13)
    y = b.op("MaxPool", [b.relu(b.bn(b.conv(b.input, 8, 3)))], kernel_shape=[2, 2], strides=[2, 2])  # [N, 8, 2, 2]
    if form == "flatten":
        flat = b.op("Flatten", [y], channels=32)
    else:
        shape = {"reshape_named": [-1, 32], "reshape_inferred": [1, -1], "reshape_zero": [0, 32]}[form]
        flat = b.op("Reshape", [y, b.const(np.array(shape, np.int64), prefix="shape")], channels=32)
    result = check_prune(b.build(b.gemm(b.relu(b.gemm(b.op("Dropout", [flat]), 6)), 3)), ratio=0.5, input_shapes={"input": (1, 3, 4, 4)})
    assert _initializer_shape(result.model, "Gemm", 1, 0) == (3, 16)  # 4 channels kept × 2 × 2 features
    if form != "flatten":
        reshape = next(n for n in result.model.graph.node if n.op_type == "Reshape")
        shape = next(onnx.numpy_helper.to_array(t).tolist() for t in result.model.graph.initializer if t.name == reshape.input[1])
        assert shape == {"reshape_named": [-1, 16], "reshape_inferred": [1, -1], "reshape_zero": [0, 16]}[form]


def test_nhwc_transpose_reshape_into_matmul_prunes_every_cth_feature() -> None:
    b = ModelBuilder((3, 4, 4), opset=13)
    y = b.op("Transpose", [b.relu(b.conv(b.input, 8, 3))], perm=[0, 2, 3, 1])  # [N, 4, 4, 8]
    flat = b.op("Reshape", [y, b.const(np.array([1, 128], np.int64), prefix="shape")], channels=128)
    result = check_prune(b.build(b.matmul(flat, 5)), ratio=0.5, input_shapes={"input": (1, 3, 4, 4)})
    group = result.groups[0]
    assert [(s.outer, s.inner) for s in group.sinks] == [(16, 1)]
    assert _initializer_shape(result.model, "MatMul", 1) == (64, 5)


def test_concat_then_flatten_into_gemm() -> None:
    b = ModelBuilder((3, 2, 2), opset=13)
    stacked = b.concat(b.relu(b.conv(b.input, 4, 1)), b.relu(b.conv(b.input, 6, 1)))
    flat = b.op("Flatten", [stacked], channels=40)
    result = check_prune(b.build(b.gemm(flat, 3)), ratio=0.5, input_shapes={"input": (1, 3, 2, 2)})
    assert _initializer_shape(result.model, "Gemm", 1) == (3, (2 + 3) * 4)


def test_channel_shuffle_blocks_and_the_rest_prunes() -> None:
    b = ModelBuilder((3, 4, 4), opset=13)
    x = b.relu(b.conv(b.input, 8, 3))
    grouped = b.op("Reshape", [x, b.const(np.array([-1, 2, 4, 4, 4], np.int64), prefix="shape")])
    swapped = b.op("Transpose", [grouped], perm=[0, 2, 1, 3, 4])
    shuffled = b.op("Reshape", [swapped, b.const(np.array([-1, 8, 4, 4], np.int64), prefix="shape")], channels=8)
    y = b.relu(b.conv(shuffled, 6, 3))
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.5)
    assert [g.prunable for g in result.groups] == [False, True, False]
    assert result.groups[0].blocked_by is not None and result.groups[0].blocked_by.reason == "Reshape splits the channel axis"


# ------------------------------------------------------------------- layout, opset variants, subgraphs


def test_nhwc_island_with_per_channel_ops_on_the_last_axis() -> None:
    b = ModelBuilder((3, 6, 6), opset=13)
    y = b.op("Transpose", [b.relu(b.conv(b.input, 8, 3))], perm=[0, 2, 3, 1])  # [N, H, W, C]
    y = b.op("Mul", [y, b.const(b.random(8, low=0.5, high=1.5), prefix="scale")])
    y = b.op("Add", [y, b.const(b.random(1, 1, 1, 8), prefix="shift")])
    y = b.op("Transpose", [b.relu(y)], perm=[0, 3, 1, 2])
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.5)
    assert _initializer_shape(result.model, "Mul", 1) == (4,)
    assert _initializer_shape(result.model, "Add", 1) == (1, 1, 1, 4)


@pytest.mark.parametrize("opset", [11, 13, 18, 19, 21])
def test_axes_as_attributes_or_inputs_across_opsets(opset: int) -> None:
    b = ModelBuilder((3, 6, 6), opset=opset)
    y = b.relu(b.conv(b.input, 8, 3))
    if opset >= 18:  # Pad with an axes input: pad only H and W
        pads = b.const(np.array([1, 1, 1, 1], np.int64), prefix="pads")
        y = b.op("Pad", [y, pads, "", b.const(np.array([2, 3], np.int64), prefix="axes")])
        reduced = b.op("ReduceMax", [y, b.const(np.array([-1], np.int64), prefix="axes")], keepdims=1)
    else:
        y = b.op("Pad", [y, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), prefix="pads")])
        reduced = b.op("ReduceMax", [y], axes=[-1], keepdims=1)  # [N, C, H, 1]
    if opset >= 13:
        unsqueezed = b.op("Unsqueeze", [reduced, b.const(np.array([0], np.int64), prefix="axes")])
        squeezed = b.op("Squeeze", [unsqueezed, b.const(np.array([0, 4], np.int64), prefix="axes")])
    else:
        squeezed = b.op("Squeeze", [b.op("Unsqueeze", [reduced], axes=[0])], axes=[0, 4])  # back to [N, C, H]
    pooled = b.op("ReduceMean", [squeezed, b.const(np.array([2], np.int64), prefix="axes")] if opset >= 18 else [squeezed], keepdims=0, **({} if opset >= 18 else {"axes": [2]}))
    result = check_prune(b.build(b.gemm(pooled, 3)), ratio=0.5)
    assert _initializer_shape(result.model, "Gemm", 1) == (3, 4)


@pytest.mark.parametrize(("opset", "axis", "prunable"), [(11, 1, False), (11, 2, True), (11, -1, True), (13, 1, False), (13, 2, True)])
def test_softmax_before_and_after_opset_13(opset: int, axis: int, prunable: bool) -> None:
    b = ModelBuilder((3, 6, 6), opset=opset)
    y = b.op("Softmax", [b.relu(b.conv(b.input, 8, 3))], axis=axis)
    result = check_prune(b.build(b.conv(y, 4)), ratio=0.5, expect_pruned=prunable)
    assert result.groups[0].prunable == prunable


def test_softmax_before_opset_13_blocks_channels_last() -> None:
    b = ModelBuilder((3, 6, 6), opset=11)
    y = b.op("Transpose", [b.relu(b.conv(b.input, 8, 3))], perm=[0, 2, 3, 1])
    y = b.op("Softmax", [y], axis=2)  # flattens [N·H, W·C]: mixes the channels
    result = check_prune(b.build(b.matmul(y, 4)), ratio=0.5, expect_pruned=False)
    assert result.groups[0].blocked_by is not None and "Softmax over the channel axis" in result.groups[0].blocked_by.reason


@pytest.mark.parametrize(("layout", "prunable"), [("nchw", True), ("nhwc", False)])
def test_layer_norm_over_the_last_axis(layout: str, prunable: bool) -> None:
    b = ModelBuilder((3, 6, 6), opset=17)
    y = b.relu(b.conv(b.input, 8, 3))
    if layout == "nhwc":
        y = b.op("Transpose", [y], perm=[0, 2, 3, 1])
    width = 8 if layout == "nhwc" else 6
    y = b.op("LayerNormalization", [y, b.const(b.random(width)), b.const(b.random(width))], axis=-1)
    tail = b.matmul(y, 4) if layout == "nhwc" else b.conv(y, 4)
    result = check_prune(b.build(tail), ratio=0.5, expect_pruned=prunable)
    assert result.groups[0].prunable == prunable


def test_a_grouped_conv_between_plain_ones_prunes_both_its_groups() -> None:
    b = ModelBuilder((3, 6, 6))
    x = b.relu(b.conv(b.input, 8, 3))
    y = b.relu(b.conv(x, 8, 3, group=2))
    result = check_prune(b.build(b.conv(b.relu(b.conv(y, 6, 3)), 4)), ratio=0.5)
    assert [g.prunable for g in result.groups] == [True, True, True, False]
    assert [g.blocks for g in result.groups] == [2, 2, 1, 1]
    assert all(result.plan.changes(g) for g in result.groups[:3])


def test_channels_read_inside_an_if_subgraph_block_and_the_rest_prunes() -> None:
    b = ModelBuilder((3, 6, 6), opset=13)
    x = b.relu(b.conv(b.input, 8, 3))
    y = b.relu(b.conv(b.if_branches(b.input, x), 6, 3))
    other = b.relu(b.conv(b.input, 5, 3))
    result = check_prune(b.build(b.conv(y, 4), b.conv(other, 4)), ratio=0.5)
    first = result.groups[0]
    assert first.blocked_by is not None and first.blocked_by.reason == "its channels are read inside a subgraph of If"
    assert result.pruned_groups == 2


# ------------------------------------------------------------- random compositions of every pattern


def _split_join(b: ModelBuilder, x: str) -> str:
    y = b.relu(b.conv(x, 6, 1))
    parts = b.split(y, [3, 3], equal=True)
    return b.concat(b.relu(parts[1]), parts[0])


def _fpn(b: ModelBuilder, x: str) -> str:
    deep = b.silu(b.conv(b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2]), 5, 3))
    empty = b.const(np.zeros(0, np.float32), prefix="roi")
    scales = b.const(np.array([1, 1, 2, 2], np.float32), prefix="scales")
    return b.concat(b.op("Resize", [deep, empty, scales], mode="nearest"), x)


def _nhwc(b: ModelBuilder, x: str) -> str:
    y = b.op("Transpose", [x], perm=[0, 2, 3, 1])
    y = b.op("Mul", [y, b.const(b.random(b.channels[x], low=0.5, high=1.5), prefix="scale")])
    return b.op("Transpose", [b.relu(y)], perm=[0, 3, 1, 2])


def _pad_reduce_gate(b: ModelBuilder, x: str) -> str:
    """Spatial Pad then a crop back, and a ReduceMean gate over H (axes as attribute or input by opset)."""
    padded = b.op("Pad", [x, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), prefix="pads")])
    cropped = b.op("MaxPool", [padded], kernel_shape=[3, 3])
    if b.opset >= 18:
        gate = b.op("ReduceMean", [cropped, b.const(np.array([2], np.int64), prefix="axes")], keepdims=1)
    else:
        gate = b.op("ReduceMean", [cropped], axes=[2], keepdims=1)
    return b.op("Mul", [cropped, b.op("Sigmoid", [gate])])


ALL_BLOCKS = {
    **BLOCKS,
    "c2f": lambda b, x: b.c2f(x, 6, 1),
    "c2f_slice": lambda b, x: b.c2f(x, 4, 1, use_slice=True),
    "sppf": lambda b, x: b.sppf(x, 6),
    "inception": lambda b, x: b.concat(b.relu(b.conv(x, 3, 1)), b.relu(b.conv(b.relu(b.conv(x, 2, 1)), 4, 3)), b.op("MaxPool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1])),
    "dense": lambda b, x: b.concat(x, b.relu(b.conv(b.relu(b.bn(x)), 3, 3))),
    "fpn": _fpn,
    "nhwc": _nhwc,
    "split_join": _split_join,
    "pad_reduce_gate": _pad_reduce_gate,
    "slice_tail": lambda b, x: b.op("Add", [b.slice_channels(b.relu(b.conv(x, 7, 1)), 2, np.iinfo(np.int64).max), b.conv(x, 5, 3)]),
    "if_branch": lambda b, x: b.relu(b.conv(b.if_branches(b.input, x), 5, 3)),
}


def _tail(b: ModelBuilder, x: str, kind: str) -> str:
    if kind == "conv":
        return b.conv(x, 3)
    if kind == "pool_gemm":
        return b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [x])]), 3)
    if kind == "reshape_gemm":  # the shape constant names C · H · W and is rewritten
        pooled = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        features = b.channels[x] * 9
        flat = b.op("Reshape", [pooled, b.const(np.array([-1, features], np.int64), prefix="shape")], channels=features)
        return b.gemm(flat, 3)
    if kind == "nhwc_matmul":  # channel c is every C-th feature
        pooled = b.op("Transpose", [b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])], perm=[0, 2, 3, 1])
        features = b.channels[x] * 9
        flat = b.op("Reshape", [pooled, b.const(np.array([1, features], np.int64), prefix="shape")], channels=features)
        return b.matmul(flat, 3)
    flat = b.op("Flatten", [b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])], channels=b.channels[x] * 9)
    return b.gemm(b.relu(b.gemm(flat, 6)), 3)


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    blocks=st.lists(st.sampled_from(sorted(ALL_BLOCKS)), min_size=1, max_size=4),
    opset=st.integers(11, 21),
    tail=st.sampled_from(["conv", "pool_gemm", "flatten_gemm", "reshape_gemm", "nhwc_matmul"]),
    ratio=st.sampled_from([0.2, 0.5, 0.8]),
)
def test_random_compositions_of_every_pattern_across_opsets(blocks: list[str], opset: int, tail: str, ratio: float) -> None:
    b = ModelBuilder((3, 6, 6), opset=opset, seed=len(blocks) + opset)
    x = b.relu(b.conv(b.input, 6, 3))
    for block in blocks:
        x = ALL_BLOCKS[block](b, x)
    result = check_prune(b.build(_tail(b, x, tail)), ratio=ratio, input_shapes={"input": (1, 3, 6, 6)})
    assert result.prunable_groups >= 1


@pytest.mark.parametrize("round_to", [4, 8])
def test_round_to_keeps_multiples_in_every_segment(round_to: int) -> None:
    b = ModelBuilder((3, 6, 6), opset=13)
    x = b.relu(b.conv(b.input, 16, 3))
    y = b.c2f(x, 16, 1)
    result = prune_model(b.build(b.conv(y, 3)), ratio=0.5, round_to=round_to)
    kept = {g.id: len(result.plan.kept[g.id]) for g in result.groups if result.plan.changes(g)}
    assert kept and all(count % round_to == 0 for count in kept.values())


# ----------------------------------------------------------------------------------- attention heads

ENCODER_SHAPES = {"x": [2, 5, 16], "attention_mask": [2, 5]}


def _encoder_feeds(batch: int, seq: int, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.float32)
    mask[0, seq - 2 :] = 0.0  # padding in the first sequence
    return {"x": rng.standard_normal((batch, seq, 16)).astype(np.float32), "attention_mask": mask}


@pytest.mark.parametrize(
    ("exporter", "split_target", "merge_target", "shared"),
    [
        ("torchscript", "concat_heads", "concat_features", False),
        ("torchscript", "concat_heads", "concat_features", True),
        ("torchscript", "concat_minus_one", "concat_minus_one", False),
        ("dynamo", "const_minus_one", "const_minus_one", False),
        ("dynamo", "const_heads", "const_features", False),
        ("dynamo", "const_heads", "const_features", True),
    ],
)
def test_heads_and_ffn_neurons_in_one_mac_budget_hold_the_oracle_at_every_length(
    exporter: str, split_target: str, merge_target: str, shared: bool
) -> None:
    """Removing head h equals zeroing its context before the output projection; the targets (constants,
    Concats built from Shape, -1 and 0 entries) are rewritten so the model runs at other batch sizes and
    sequence lengths, checked against the masked oracle there too."""
    model = encoder_model(exporter=exporter, split_target=split_target, merge_target=merge_target,
                          shared_targets=shared)
    result = check_prune(model, ratio=None, target_macs=0.6, input_shapes=ENCODER_SHAPES, protect_first=False)
    pruned = {g.id: g for g in result.groups if result.plan.changes(g)}
    assert any(g.width == 4 for g in pruned.values()), "no head was removed"
    assert any(g.width == 1 for g in pruned.values()), "no FFN neuron was removed"
    for group in pruned.values():
        if group.width == 4:  # Q, K and V lose the head's 4 columns each
            kept = len(result.plan.kept[group.id])
            for source in group.sources:
                weight = next(n for n in result.model.graph.node if n.name == source.node).input[1]
                assert next(t.dims for t in result.model.graph.initializer if t.name == weight) == [16, 4 * kept]
    oracle = masked_model(normalize_model(model)[0], result.groups, result.plan, result.analysis_shapes)
    for batch, seq in ((1, 9), (3, 2)):
        feeds = _encoder_feeds(batch, seq)
        assert_outputs_close(run_model(result.model, feeds), run_model(oracle, feeds))


def test_a_head_split_with_a_computed_head_count_blocks() -> None:
    """A head entry computed at run time (here Shape(x)[2] / 4) cannot be rewritten: the heads stay."""
    b = ModelBuilder((1,), opset=17, seed=3)
    b.inputs = [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 5, 8])]
    b.channels["input"] = 8
    q = b.matmul(b.input, 8)
    dims = b.op("Shape", [b.input])
    count = b.op("Div", [b.op("Gather", [dims, b.const(np.array([2], np.int64), prefix="i")], axis=0),
                         b.const(np.array([4], np.int64), prefix="d")])
    target = b.op("Concat", [b.const(np.array([0, 0], np.int64), prefix="t"), count,
                             b.const(np.array([4], np.int64), prefix="t")], axis=0, channels=1)
    heads = b.op("Reshape", [q, target], channels=2)
    merged = b.op("Reshape", [heads, b.const(np.array([0, 0, 8], np.int64), prefix="m")], channels=8)
    model = b.build(b.matmul(merged, 3))
    groups = find_channel_groups(normalize_model(model)[0], {"input": [2, 5, 8]})
    first = next(n.name for n in model.graph.node if n.op_type == "MatMul")
    group = _group_with_source_op(groups, first)
    assert group.blocked_by is not None and "computed at run time" in group.blocked_by.reason, group.blocked_by
