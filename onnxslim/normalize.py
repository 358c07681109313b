"""Normalization: one form for every later pass, without changing what the model computes (see io.py).

Initializers leave the graph inputs, constant subgraphs are evaluated into initializers, unnamed or
duplicate-named nodes get stable names, and the IR version is raised where the result needs it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxslim.errors import (
    UnsupportedModelError,
    first_line,
)
from onnxslim.graph import subgraph_references
from onnxslim.serialize import _copy

# Ops that are never evaluated at load time even when all their inputs are constant: random ops (their
# value is not a constant) and quantization ops (folding them would dequantize the weights).
_NEVER_FOLD = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
    }
)


@dataclass(frozen=True)
class WeightStorage:
    """Where the model's constant tensors lived as loaded, before normalization (count, elements)."""

    initializers: tuple[int, int] = (0, 0)
    constant_nodes: tuple[int, int] = (0, 0)
    computed: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class NormalizationReport:
    """What normalization changed: weight storage as loaded, nodes folded and renamed, other notes."""

    storage: WeightStorage
    folded_nodes: int = 0
    renamed_nodes: int = 0
    notes: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------- normalizing


def normalize_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, NormalizationReport]:
    """Return a normalized copy of `model` (see the module docstring) and what was changed."""
    model = _copy(model)
    graph = model.graph
    origins = _constant_origins(graph)
    initializer_names = {t.name for t in graph.initializer}
    kept_inputs = [i for i in graph.input if i.name not in initializer_names]
    if len(kept_inputs) != len(graph.input):
        del graph.input[:]
        graph.input.extend(kept_inputs)
    renamed = _name_nodes(graph)
    folded = _fold_constants(model)
    _remove_unused_initializers(graph)
    storage = _weight_storage(origins, _initializer_sizes(graph))
    notes = []
    needed_ir = max(4, onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))
    if model.ir_version < needed_ir:
        notes.append(f"IR version raised from {model.ir_version} to {needed_ir}")
        model.ir_version = needed_ir
    return model, NormalizationReport(storage, folded, renamed, tuple(notes))


def _name_nodes(graph: onnx.GraphProto) -> int:
    """Give every node a unique, stable name (op type and position); return how many were renamed."""
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or f"{node.op_type}_{index}"
        name, suffix = base, 1
        while name in seen:
            name, suffix = f"{base}_{suffix}", suffix + 1
        node.name = name
        seen.add(name)
        renamed += 1
    return renamed


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _is_foldable(node: onnx.NodeProto, constants: set[str], graph_outputs: set[str]) -> bool:
    return (
        node.domain in ("", "ai.onnx")
        and node.op_type not in _NEVER_FOLD
        and not _has_subgraph(node)
        and not any(o in graph_outputs for o in node.output)
        and all(i in constants for i in node.input if i)
    )


def _constant_subgraph(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes whose inputs are all constants, transitively (graph nodes are topologically sorted)."""
    constants = {t.name for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    foldable = []
    for node in graph.node:
        if _is_foldable(node, constants, graph_outputs):
            foldable.append(node)
            constants.update(o for o in node.output if o)
    return foldable


def _fold_constants(model: onnx.ModelProto) -> int:
    graph = model.graph
    foldable = _constant_subgraph(graph)
    if not foldable:
        return 0
    folded_ids = {id(n) for n in foldable}
    produced = {o for n in foldable for o in n.output if o}
    read_elsewhere = {i for n in graph.node if id(n) not in folded_ids for i in n.input}
    read_elsewhere |= subgraph_references(graph)
    needed = [name for name in dict.fromkeys(o for n in foldable for o in n.output) if name in read_elsewhere]
    values = _evaluate(model, foldable, needed) if needed else {}
    kept = [n for n in graph.node if id(n) not in folded_ids]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(np.asarray(values[name]), name) for name in needed)
    # value_info entries of folded tensors now describe initializers; they are harmless but stale
    stale = [vi for vi in graph.value_info if vi.name in produced]
    for vi in stale:
        graph.value_info.remove(vi)
    return len(foldable)


def _evaluate(model: onnx.ModelProto, nodes: list[onnx.NodeProto], outputs: list[str]) -> dict[str, np.ndarray]:
    """Evaluate a constant subgraph with onnx's reference evaluator; fail loudly, naming the node."""
    read = {i for n in nodes for i in n.input if i}
    graph = onnx.helper.make_graph(
        list(nodes),
        "constant_subgraph",
        inputs=[],
        outputs=[onnx.helper.make_empty_tensor_value_info(name) for name in outputs],
        initializer=[t for t in model.graph.initializer if t.name in read],
    )
    sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        results = ReferenceEvaluator(sub).run(None, {})
    except Exception as e:  # noqa: BLE001 - the reference evaluator raises anything; we re-raise with context
        culprit = _first_failing_node(model, nodes)
        raise UnsupportedModelError(
            f"could not evaluate the constant subgraph feeding the model's weights"
            f"{culprit}: {type(e).__name__}: {first_line(e)}"
        ) from e
    return dict(zip(outputs, results, strict=True))


def _first_failing_node(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> str:
    """Re-run node by node to name the node that fails (only on the error path)."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in nodes:
        inputs = [onnx.helper.make_tensor_value_info(i, onnx.TensorProto.UNDEFINED, None) for i in node.input if i]
        sub_graph = onnx.helper.make_graph(
            [node], "one", inputs, [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o]
        )
        sub = onnx.helper.make_model(sub_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        try:
            results: list[Any] = ReferenceEvaluator(sub).run(None, {i: values[i] for i in node.input if i})  # type: ignore[assignment]
        except Exception:  # noqa: BLE001 - only used to locate the failure
            return f" (node {node.name!r}, {node.op_type})"
        values.update(zip([o for o in node.output if o], results, strict=False))
    return ""


def _remove_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output} | subgraph_references(graph)
    kept = [t for t in graph.initializer if t.name in used]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


def _constant_origins(graph: onnx.GraphProto) -> dict[str, str]:
    """For each constant tensor a variable node reads: 'initializer', 'constant_node' or 'computed'."""
    foldable = _constant_subgraph(graph)
    folded_ids = {id(n) for n in foldable}
    read = {i for n in graph.node if id(n) not in folded_ids for i in n.input if i} | subgraph_references(graph)
    origins = {t.name: "initializer" for t in graph.initializer if t.name in read}
    for node in foldable:
        kind = "constant_node" if node.op_type == "Constant" else "computed"
        origins.update({o: kind for o in node.output if o in read})
    return origins


def _weight_storage(origins: Mapping[str, str], sizes: Mapping[str, int]) -> WeightStorage:
    """Count and elements of the constant tensors by where they were stored."""

    def census(kind: str) -> tuple[int, int]:
        names = [name for name, origin in origins.items() if origin == kind]
        return len(names), sum(sizes.get(name, 0) for name in names)

    return WeightStorage(census("initializer"), census("constant_node"), census("computed"))


def _initializer_sizes(graph: onnx.GraphProto) -> dict[str, int]:
    return {t.name: int(np.prod(t.dims)) for t in graph.initializer}
