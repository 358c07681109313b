"""Tiny models and data files for the data reader, metrics and bench tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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
