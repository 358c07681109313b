"""Small helpers over onnx-graphsurgeon: import/export that keep the model's metadata, constants, attributes."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

__all__ = ["import_graph", "export_model", "constant_value", "attribute", "producer", "consumers", "opset_of"]


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """The model as an onnx-graphsurgeon graph (initializers become gs.Constant)."""
    return gs.import_onnx(model)


def export_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export `graph`, keeping the template's IR version, opsets, producer and metadata."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = template.ir_version
    del model.opset_import[:]
    model.opset_import.extend(template.opset_import)
    model.producer_name = template.producer_name
    model.producer_version = template.producer_version
    model.domain = template.domain
    model.model_version = template.model_version
    model.doc_string = template.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    return model


def constant_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor, or None for a variable (normalized models hold constants as initializers)."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def attribute(node: gs.Node, name: str, default: Any = None) -> Any:
    """An attribute of `node`, or `default` when absent."""
    return node.attrs.get(name, default)


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that produces `tensor` (None for graph inputs and constants)."""
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    """The nodes that read `tensor`."""
    return list(tensor.outputs)


def opset_of(model: onnx.ModelProto) -> int:
    """The model's ai.onnx opset version."""
    return next(imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx"))
