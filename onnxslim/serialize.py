"""Models of any size: serialization, onnx.checker and shape inference that work past protobuf's 2 GiB
limit (through a temporary copy with external data), and the walk over every tensor of a graph."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx

_PROTOBUF_LIMIT = 2**31 - 1
_EXTERNAL_DATA_MARGIN = 64 * 2**20  # switch to external data well before protobuf's 2 GiB limit


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in a graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_tensors(sub)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


# -------------------------------------------------------------------------------------------- saving


def _model_bytes(model: onnx.ModelProto) -> int:
    """Size of the model's tensors in bytes (ByteSize() is unusable past protobuf's limit)."""
    return sum(len(t.raw_data) or t.ByteSize() for t in _all_tensors(model.graph))


def _is_large(model: onnx.ModelProto) -> bool:
    """Too large to serialize in memory (protobuf's 2 GiB limit, with a margin)."""
    return _model_bytes(model) > _PROTOBUF_LIMIT - _EXTERNAL_DATA_MARGIN


@contextlib.contextmanager
def loadable(model: onnx.ModelProto) -> Iterator[bytes | str]:
    """What onnxruntime and onnx.checker can load: the serialized model, or, past protobuf's limit, the
    path of a temporary copy that keeps its weights in external data."""
    if not _is_large(model):
        yield model.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="onnxslim-") as scratch:
        path = Path(scratch) / "model.onnx"
        onnx.save_model(
            _copy(model), str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=1024
        )
        yield str(path)


def _check(model: onnx.ModelProto) -> None:
    """onnx.checker on a model of any size."""
    if not _is_large(model):
        onnx.checker.check_model(model)
        return
    with loadable(model) as path:
        onnx.checker.check_model(path)


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference (with data propagation) on a model of any size."""
    if not _is_large(model):
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    with loadable(model) as path, tempfile.TemporaryDirectory(prefix="onnxslim-") as scratch:
        inferred = Path(scratch) / "inferred.onnx"
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), check_type=False, strict_mode=False, data_prop=True)
        return onnx.load_model(str(inferred), load_external_data=False)
