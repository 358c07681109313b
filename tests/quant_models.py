"""Tiny models that int8 hurts in the ways real exports are hurt (issue 14), for the accuracy-guard tests.

    transformer_classifier()   conv stem -> tokens -> a transformer block with *decomposed* LayerNorm
                               (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add), Softmax attention,
                               an FFN, residuals -> mean over tokens -> classifier. Two token features
                               carry a large offset (the outlier features of trained transformers),
                               so one int8 scale for the residual stream leaves the others a few levels.
    yolo_head()                a detector head whose output concatenates box coordinates (0-320) with
                               class scores (0-1): [batch, 4 + classes, anchors].
    ctc_head()                 a recognizer whose output is [T, batch, C] (sequence first), by Softmax
                               then Transpose, declared [1, seqlen] as Paddle exports declare it.
"""

from __future__ import annotations

import numpy as np
import onnx
from builders import ModelBuilder
from onnx import TensorProto, helper

__all__ = ["transformer_classifier", "yolo_head", "ctc_head", "TOKEN_DIM"]

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
