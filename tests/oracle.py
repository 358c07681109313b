"""The oracle of DESIGN.md: pruning channel c of a group equals multiplying it by 0 at every sink's input.

`masked_model` builds that masked model from the original and a plan; `check_prune` prunes a model and
checks (1) the pruned outputs against the masked model in onnxruntime, (2) the new weight shapes of every
source, sink and BatchNorm/depthwise follower, and (3) onnx.checker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxslim.analysis.groups import ChannelGroup
from onnxslim.graph import export_model
from onnxslim.io import infer_tensor_infos, normalize_model, random_inputs
from onnxslim.prune import PrunePlan, PruneResult, prune_model

__all__ = ["masked_model", "run_model", "assert_outputs_close", "check_prune", "check_weight_shapes"]


def masked_model(
    model: onnx.ModelProto, groups: Sequence[ChannelGroup], plan: PrunePlan, input_shapes: Mapping[str, Sequence[int]]
) -> onnx.ModelProto:
    """`model` (normalized) with a 0/1 mask multiplied into the input of every sink of every pruned group."""
    infos = infer_tensor_infos(model, input_shapes)
    graph = gs.import_onnx(model)
    nodes = {node.name: node for node in graph.nodes}
    for group in groups:
        if not plan.changes(group):
            continue
        mask = np.zeros(group.channels, np.float32)
        mask[list(plan.kept[group.id])] = 1.0
        for sink in group.sinks:
            node = nodes[sink.node]
            tensor = node.inputs[sink.input_index]
            rank = len(infos[tensor.name].shape)
            values = mask.reshape((group.channels,) + (1,) * (rank - 1 - sink.axis))
            masked = gs.Variable(f"{tensor.name}_masked_{sink.node}", dtype=np.float32)
            mul = gs.Node("Mul", f"mask_{sink.node}_{sink.input_index}", inputs=[tensor, gs.Constant(f"{masked.name}_mask", values)], outputs=[masked])
            graph.nodes.append(mul)
            node.inputs[sink.input_index] = masked
    graph.toposort()
    return export_model(graph, model)


def run_model(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(a) for a in session.run(None, dict(feeds))]


def assert_outputs_close(got: Sequence[np.ndarray], want: Sequence[np.ndarray], rel: float = 1e-4) -> None:
    """Outputs equal to `rel` relative to the scale of each expected output."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=rel, atol=rel * scale)


_OUT_AXIS = {"Conv": lambda n: 0, "ConvTranspose": lambda n: 1, "Gemm": lambda n: 0 if _trans_b(n) else 1, "MatMul": lambda n: 1}
_IN_AXIS = {"Conv": lambda n: 1, "ConvTranspose": lambda n: 0, "Gemm": lambda n: 1 if _trans_b(n) else 0, "MatMul": lambda n: 0}


def _trans_b(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "transB"), 0)


def check_weight_shapes(pruned: onnx.ModelProto, groups: Sequence[ChannelGroup], plan: PrunePlan) -> None:
    """Every pruned group's sources, sinks, BatchNorms and depthwise convs have the kept channel count."""
    nodes = {n.name: n for n in pruned.graph.node}
    dims = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    for group in groups:
        if not plan.changes(group):
            continue
        kept = len(plan.kept[group.id])
        for source in group.sources:
            node = nodes[source.node]
            assert dims[node.input[1]][_OUT_AXIS[node.op_type](node)] == kept, (group.id, source)
        for sink in group.sinks:
            node = nodes[sink.node]
            assert dims[node.input[1]][_IN_AXIS[node.op_type](node)] == kept, (group.id, sink)
        for follower in group.followers:
            node = nodes[follower.node]
            if node.op_type == "BatchNormalization":
                assert all(dims[name] == (kept,) for name in node.input[1:5]), (group.id, follower)
            if node.op_type == "Conv":
                assert dims[node.input[1]][0] == kept
                assert next(a.i for a in node.attribute if a.name == "group") == kept


def check_prune(
    model: onnx.ModelProto,
    ratio: float = 0.5,
    criterion: str = "l1",
    input_shapes: Mapping[str | None, Sequence[int]] | None = None,
    *,
    expect_pruned: bool = True,
    rel: float = 1e-4,
) -> PruneResult:
    """Prune `model` and check it against the masked oracle, its weight shapes and onnx.checker."""
    result = prune_model(model, ratio=ratio, criterion=criterion, input_shapes=input_shapes)
    onnx.checker.check_model(result.model)
    if expect_pruned:
        assert result.channels_removed > 0, "nothing was pruned"
        assert result.macs_after < result.macs_before or result.params_after < result.params_before
    normalized = normalize_model(model)[0]
    oracle = masked_model(normalized, result.groups, result.plan, result.analysis_shapes)
    feeds = random_inputs(normalized, result.analysis_shapes, seed=1)
    assert_outputs_close(run_model(result.model, feeds), run_model(oracle, feeds), rel)
    check_weight_shapes(result.model, result.groups, result.plan)
    if ratio == 0:
        assert_outputs_close(run_model(result.model, feeds), run_model(normalized, feeds), 1e-6)
    return result
