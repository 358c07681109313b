"""Params and MACs (onnxslim/analysis/cost.py) against counts done by hand."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import (
    RECURRENT_GATES,
    ModelBuilder,
    conv_integer_model,
    conv_model,
    conv_transpose_model,
    dynamic_lstm_model,
    gemm_model,
    matmul_model,
    recurrent_model,
)
from conftest import load_light

from onnxslim.analysis.cost import compute_cost
from onnxslim.io import infer_tensor_infos, resolve_input_shapes


def cost_of(model: onnx.ModelProto):
    return compute_cost(model, infer_tensor_infos(model, resolve_input_shapes(model)))


@pytest.mark.parametrize(
    "kwargs, macs, params",
    [
        # 8 out channels x 10x10 outputs, each reads 4 in channels x 3x3
        (dict(c_in=4, c_out=8, kernel=3, stride=1, pad=1, hw=10), 8 * 10 * 10 * 4 * 3 * 3, 8 * 4 * 9 + 8),
        # stride 2, no padding: (10 - 3) // 2 + 1 = 4 -> 4x4 outputs
        (dict(c_in=4, c_out=8, kernel=3, stride=2, pad=0, hw=10), 8 * 4 * 4 * 4 * 3 * 3, 8 * 4 * 9 + 8),
        # grouped: each output reads c_in / group = 2 channels
        (dict(c_in=4, c_out=8, kernel=3, pad=1, group=2, hw=10), 8 * 10 * 10 * 2 * 9, 8 * 2 * 9 + 8),
        # depthwise: one input channel per output
        (dict(c_in=6, c_out=6, kernel=3, pad=1, group=6, hw=10), 6 * 10 * 10 * 9, 6 * 9 + 6),
        # 1x1, no bias, batch 2
        (dict(c_in=5, c_out=7, kernel=1, pad=0, hw=4, bias=False, batch=2), 2 * 7 * 4 * 4 * 5, 7 * 5),
    ],
)
def test_conv_macs_and_params_by_hand(kwargs: dict, macs: int, params: int) -> None:
    cost = cost_of(conv_model(**kwargs))
    assert (cost.macs, cost.params) == (macs, params)
    assert cost.elementwise == 0


def test_conv_transpose_macs_by_hand() -> None:
    # every one of the 4x5x5 input values is scattered into 6 out channels x 2x2 kernel taps
    cost = cost_of(conv_transpose_model(c_in=4, c_out=6, kernel=2, stride=2, hw=5))
    assert cost.macs == 4 * 5 * 5 * 6 * 2 * 2
    assert cost.params == 4 * 6 * 2 * 2


@pytest.mark.parametrize("trans_a, trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm_macs_by_hand(trans_a: int, trans_b: int) -> None:
    cost = cost_of(gemm_model(m=3, k=5, n=7, trans_a=trans_a, trans_b=trans_b))
    assert cost.macs == 3 * 5 * 7
    assert cost.params == 5 * 7 + 7


def test_batched_matmul_macs_by_hand() -> None:
    cost = cost_of(matmul_model(batch=2, m=3, k=5, n=7))
    assert cost.macs == 2 * 3 * 5 * 7 and cost.params == 5 * 7


def test_light_resnet50_matches_its_published_size() -> None:
    loaded = load_light("light_resnet50.onnx")
    cost = cost_of(loaded.model)
    # ResNet-50 v1: 25.6M parameters and 4.1 GMACs at 224x224 (He et al. 2016, Table 1: 3.8 GFLOPs for v1.5's
    # stride placement; this caffe2 export is v1, 4.09 G); BN parameters count as parameters.
    assert cost.params == pytest.approx(25.61e6, rel=1e-3)
    assert cost.macs == pytest.approx(4.089e9, rel=1e-3)
    conv_layers = [layer for layer in cost.layers if layer.op_type == "Conv"]
    assert len(conv_layers) == 53 and all(layer.macs > 0 for layer in conv_layers)


def test_unknown_shapes_are_reported_not_counted_as_zero() -> None:
    model = conv_model()
    cost = compute_cost(model, {})  # nothing inferred
    assert cost.unknown == ("conv",) and cost.macs == 0


@pytest.mark.parametrize("quant_format", ["QOperator", "QDQ"])
def test_int8_layers_count_like_their_float_originals(tmp_path, quant_format: str) -> None:
    """Same MACs and params after quantization, whether the int8 weights sit behind DequantizeLinear (QDQ)
    or are read by QLinearConv / QGemm directly (QOperator)."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    from onnxslim.calib import DataOptions, open_dataset

    builder = ModelBuilder((4, 10, 10))
    y = builder.conv(builder.input, 8, 3)
    flat = builder.op("Flatten", [y], channels=800)
    fp32 = builder.build(builder.gemm(flat, 5))
    source = tmp_path / "fp32.onnx"
    onnx.save_model(fp32, str(source))

    class Reader:
        def __init__(self) -> None:
            self.batches = iter(b.feeds for b in open_dataset("random:4", fp32, DataOptions()).batches())

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(source), str(tmp_path / "int8.onnx"), Reader(), quant_format=getattr(QuantFormat, quant_format))
    int8 = onnx.load(str(tmp_path / "int8.onnx"))
    expected = {"QOperator": {"QLinearConv", "QGemm"}, "QDQ": {"Conv", "Gemm", "DequantizeLinear"}}[quant_format]
    assert expected <= {n.op_type for n in int8.graph.node}
    assert cost_of(int8).macs == cost_of(fp32).macs == 8 * 10 * 10 * 4 * 9 + 5 * 800
    assert cost_of(int8).params == cost_of(fp32).params == 8 * 4 * 9 + 8 + 5 * 800 + 5


def test_dynamically_quantized_weights_are_counted_without_their_scales() -> None:
    # W [1, 3, 16] + R [1, 4, 16] int8 + B [1, 32] float; not the scales and zero points
    assert cost_of(dynamic_lstm_model()).params == 48 + 64 + 32
    conv = cost_of(conv_integer_model())
    assert conv.by_name()["conv_int"].params == 8 * 3 * 9 and conv.macs == 8 * 8 * 8 * 3 * 9


@pytest.mark.parametrize("op_type", sorted(RECURRENT_GATES))
@pytest.mark.parametrize(("direction", "layout"), [("forward", 0), ("bidirectional", 0), ("bidirectional", 1)])
def test_recurrent_macs_by_hand(op_type: str, direction: str, layout: int) -> None:
    """Every one of the 5 steps of the 2 sequences, in each direction, multiplies the 3 input features and
    the 4 hidden units by the weights of each gate's 4 units (LSTM 4 gates, GRU 3, RNN 1); onnxruntime runs
    the model at these shapes (the count is of the model it runs; it refuses layout 1, batch first)."""
    model = recurrent_model(op_type, direction=direction, layout=layout, seq=5, batch=2, features=3, hidden=4)
    dirs = 2 if direction == "bidirectional" else 1
    gates = RECURRENT_GATES[op_type] * 4
    cost = cost_of(model)
    assert cost.macs == 5 * 2 * dirs * gates * (3 + 4)
    assert cost.params == dirs * gates * (3 + 4 + 2) and cost.unknown == ()
    if not layout:
        from oracle import run_model

        assert run_model(model, {"x": np.zeros((5, 2, 3), np.float32)})[0].shape == (5, dirs, 2, 4)


def test_dynamically_quantized_lstm_macs_by_hand() -> None:
    # x [5, 1, 3], W [1, 3, 16], R [1, 4, 16]: 5 steps × (3 + 4) inputs × 16 gate units
    assert cost_of(dynamic_lstm_model()).macs == 5 * 1 * 16 * (3 + 4)
