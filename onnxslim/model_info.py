"""What is in a model: `onnxslim inspect` as a library call returning a dataclass."""

from __future__ import annotations

import fnmatch
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import onnx

from onnxslim.activations import TensorStats, tensor_statistics
from onnxslim.analysis.cost import ModelCost, compute_cost
from onnxslim.analysis.groups import ChannelGroup, find_channel_groups
from onnxslim.analysis.quantized import quantized_ops
from onnxslim.calib import DataOptions, open_dataset
from onnxslim.errors import UsageError
from onnxslim.graph import collector_paused
from onnxslim.io import (
    LoadedModel,
    WeightStorage,
    graph_inputs,
    infer_tensor_infos,
    load_model,
    resolve_input_shapes,
)
from onnxslim.progress import Progress

__all__ = ["TensorSummary", "ModelInfo", "inspect_model", "summarize_model", "check_exclusions"]


@dataclass(frozen=True)
class TensorSummary:
    """A graph input or output: name, element type and declared shape (symbols kept as strings)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...] | None


@dataclass(frozen=True)
class ModelInfo:
    """Everything `inspect` reports about a model."""

    path: str
    size_bytes: int
    producer: str
    ir_version: int
    opsets: dict[str, int]
    inputs: tuple[TensorSummary, ...]
    outputs: tuple[TensorSummary, ...]
    analysis_shapes: dict[str, tuple[int, ...]]
    ops: dict[str, int]
    weight_storage: WeightStorage
    folded_nodes: int
    cost: ModelCost
    groups: tuple[ChannelGroup, ...] = ()  # channel groups at the analysis shapes
    quantized_ops: dict[str, int] = field(default_factory=dict)  # op type → count, when already quantized
    data: str | None = None  # with --data: what the tensor statistics were measured on
    tensors: tuple[TensorStats, ...] = ()  # with --data: every float tensor a node writes, in run order

    @property
    def params(self) -> int:
        return self.cost.params

    @property
    def macs(self) -> int:
        return self.cost.macs


def _summarize_value(value: onnx.ValueInfoProto) -> TensorSummary:
    tensor_type = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_string(tensor_type.elem_type).removeprefix("TensorProto.").lower()
    shape = None
    if tensor_type.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim)
    return TensorSummary(value.name, dtype, shape)


def check_exclusions(model: onnx.ModelProto, patterns: Sequence[str]) -> None:
    """Refuse (UsageError, exit 2) an --exclude pattern that names no op type and matches no node name of
    `model`: a typo would otherwise silently exclude nothing (quantize refuses it the same way)."""
    op_types = {node.op_type for node in model.graph.node}
    names = [node.name for node in model.graph.node]
    for pattern in patterns:
        if pattern not in op_types and not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise UsageError(
                f"--exclude {pattern!r} matches no node name and no op type of the model "
                f"(op types: {', '.join(sorted(op_types))})"
            )


def summarize_model(loaded: LoadedModel, input_shapes: Mapping[str | None, Sequence[int]] | None = None) -> ModelInfo:
    """Summarize an already loaded model at the given (or default) analysis shapes."""
    model = loaded.model
    shapes = resolve_input_shapes(model, input_shapes)
    infos = infer_tensor_infos(model, shapes)
    producer = " ".join(p for p in (model.producer_name, model.producer_version) if p) or "unknown"
    return ModelInfo(
        path=str(loaded.path),
        size_bytes=loaded.size_bytes,
        producer=producer,
        ir_version=loaded.source_ir_version,
        opsets={imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
        inputs=tuple(_summarize_value(v) for v in graph_inputs(model)),
        outputs=tuple(_summarize_value(v) for v in model.graph.output),
        analysis_shapes=shapes,
        ops=dict(Counter(node.op_type for node in model.graph.node).most_common()),
        weight_storage=loaded.normalization.storage,
        folded_nodes=loaded.normalization.folded_nodes,
        cost=compute_cost(model, infos),
        groups=find_channel_groups(model, shapes, infos),
        quantized_ops=quantized_ops(model),
    )


def inspect_model(
    path: str | os.PathLike[str],
    input_shapes: Mapping[str | None, Sequence[int]] | None = None,
    *,
    data: str | os.PathLike[str] | None = None,
    data_options: DataOptions | None = None,
    progress: Progress | None = None,
) -> ModelInfo:
    """Load `path` and summarize it: I/O, opsets, ops, where weights live, params and MACs per layer; with
    `data` (a dataset spec, `calib.open_dataset`), every float tensor's statistics on it."""
    loaded = load_model(path)
    with collector_paused():  # linear time on big graphs (graph.py)
        info = summarize_model(loaded, input_shapes)
    if data is None:
        return info
    dataset = open_dataset(data, loaded.model, data_options)
    tensors = tensor_statistics(loaded.model, dataset, progress=progress)
    return replace(info, data=f"{dataset.description} ({dataset.num_samples} samples)", tensors=tuple(tensors))
