"""The oracle of docs/ARCHITECTURE.md: pruning channel c of a group equals multiplying it by 0 at every sink's input.

`masked_model` builds that masked model from the original and a plan; `check_prune` prunes a model and
checks (1) the pruned outputs against the masked model in onnxruntime, (2) the new weight shapes of every
source, sink and BatchNorm/depthwise follower, and (3) onnx.checker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxslim.analysis.groups import ChannelGroup, Sink
from onnxslim.graph import export_model
from onnxslim.io import infer_tensor_infos, normalize_model, random_inputs
from onnxslim.prune import PrunePlan, PruneResult, prune_model

__all__ = ["masked_model", "run_model", "assert_outputs_close", "check_prune", "check_weight_shapes"]


def _sink_masks(groups: Sequence[ChannelGroup], plan: PrunePlan) -> dict[tuple[str, int], tuple[int, np.ndarray]]:
    """(sink node, input index) → (axis, 0/1 mask over that input's channels), combining every pruned group
    (a sink reading a concatenation sees one group per segment)."""
    masks: dict[tuple[str, int], tuple[int, np.ndarray]] = {}
    for group in groups:
        if not plan.changes(group):
            continue
        for sink in group.sinks:
            key = (sink.node, sink.input_index)
            axis, mask = masks.setdefault(key, (sink.axis, np.ones(sink.extent or group.channels, np.float32)))
            mask[[sink.offset + c for c in plan.removed(group)]] = 0.0
    # a Flatten/Reshape → Gemm sink reads each channel as `outer` repeats of `inner` consecutive features
    flattened = {(s.node, s.input_index): (s.outer, s.inner) for g in groups for s in g.sinks}
    return {
        key: (axis, np.tile(np.repeat(mask, flattened[key][1]), flattened[key][0])) for key, (axis, mask) in masks.items()
    }


def masked_model(
    model: onnx.ModelProto, groups: Sequence[ChannelGroup], plan: PrunePlan, input_shapes: Mapping[str, Sequence[int]]
) -> onnx.ModelProto:
    """`model` (normalized) with a 0/1 mask multiplied into the input of every sink of every pruned group."""
    infos = infer_tensor_infos(model, input_shapes)
    graph = gs.import_onnx(model)
    nodes = {node.name: node for node in graph.nodes}
    for (name, index), (axis, mask) in _sink_masks(groups, plan).items():
        node = nodes[name]
        tensor = node.inputs[index]
        rank = len(infos[tensor.name].shape)
        values = mask.reshape((len(mask),) + (1,) * (rank - 1 - axis))
        masked = gs.Variable(f"{tensor.name}_masked_{name}_{index}", dtype=np.float32)
        mul = gs.Node("Mul", f"mask_{name}_{index}", inputs=[tensor, gs.Constant(f"{masked.name}_mask", values)], outputs=[masked])
        graph.nodes.append(mul)
        node.inputs[index] = masked
    graph.toposort()
    return export_model(graph, model)


def run_model(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(a) for a in session.run(None, dict(feeds))]


def assert_outputs_close(got: Sequence[np.ndarray], want: Sequence[np.ndarray], rel: float = 1e-4) -> None:
    """Outputs equal to `rel` relative to the scale of each expected output (its largest magnitude, however
    small: an absolute floor would let any answer pass for a model whose outputs are tiny)."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        scale = float(np.abs(b).max())
        assert scale > 0 or not np.abs(a).max(), "the expected output is all zeros but the answer is not"
        np.testing.assert_allclose(a, b, rtol=rel, atol=rel * scale)


_OUT_AXIS = {"Conv": lambda n: 0, "ConvTranspose": lambda n: 1, "Gemm": lambda n: 0 if _trans_b(n) else 1, "MatMul": lambda n: 1}
_IN_AXIS = {"Conv": lambda n: 1, "ConvTranspose": lambda n: 0, "Gemm": lambda n: 1 if _trans_b(n) else 0, "MatMul": lambda n: 0}


def _trans_b(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "transB"), 0)


def _kept_counts(groups: Sequence[ChannelGroup], plan: PrunePlan) -> dict[tuple[str, str], int]:
    """(role, node) → channels the pruned node keeps there (its extent minus what every group removes)."""
    extents: dict[tuple[str, str], int] = {}
    removed: dict[tuple[str, str], int] = {}
    for group in groups:
        if not plan.changes(group):
            continue
        for role, members in (("out", group.sources), ("in", group.sinks), ("follow", group.followers)):
            for member in members:
                key = (role, member.node)
                # flattened sinks; attention heads (unit columns each) at the sources and their followers
                features = member.outer * member.inner if isinstance(member, Sink) else member.unit
                extents[key] = (member.extent or group.channels) * features
                removed[key] = removed.get(key, 0) + len(plan.removed(group)) * features
    return {key: extents[key] - removed[key] for key in extents}


def check_weight_shapes(pruned: onnx.ModelProto, groups: Sequence[ChannelGroup], plan: PrunePlan) -> None:
    """Every pruned group's sources, sinks, BatchNorms and depthwise convs have the kept channel count."""
    nodes = {n.name: n for n in pruned.graph.node}
    dims = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    for (role, name), kept in _kept_counts(groups, plan).items():
        node = nodes[name]
        if role == "out":
            assert dims[node.input[1]][_OUT_AXIS[node.op_type](node)] == kept, (role, name)
        elif role == "in":  # a grouped Conv's weight holds one group's inputs
            groups = next((a.i for a in node.attribute if a.name == "group"), 1) if node.op_type == "Conv" else 1
            assert dims[node.input[1]][_IN_AXIS[node.op_type](node)] * groups == kept, (role, name)
        elif node.op_type == "BatchNormalization":
            assert all(dims[n] == (kept,) for n in node.input[1:5]), (role, name)
        elif node.op_type == "Conv":
            assert dims[node.input[1]][0] == kept
            assert next(a.i for a in node.attribute if a.name == "group") == kept


def check_prune(
    model: onnx.ModelProto,
    ratio: float | None = 0.5,
    criterion: str = "l1",
    input_shapes: Mapping[str | None, Sequence[int]] | None = None,
    *,
    expect_pruned: bool = True,
    rel: float = 1e-4,
    **options: Any,
) -> PruneResult:
    """Prune `model` and check it against the masked oracle, its weight shapes and onnx.checker.

    `options` are further PruneOptions fields (e.g. the command line's round_to=8, protect_first=True); with
    target_macs, pass ratio=None."""
    result = prune_model(model, ratio=ratio, criterion=criterion, input_shapes=input_shapes, **options)
    onnx.checker.check_model(result.model)
    if expect_pruned:
        assert result.channels_removed > 0, "nothing was pruned"
        assert result.macs_after < result.macs_before or result.params_after < result.params_before
    normalized = normalize_model(model)[0]
    oracle = masked_model(normalized, result.groups, result.plan, result.analysis_shapes)
    feeds = random_inputs(normalized, result.analysis_shapes, seed=1)
    assert_outputs_close(run_model(result.model, feeds), run_model(oracle, feeds), rel)
    check_weight_shapes(result.model, result.groups, result.plan)
    if ratio == 0:  # against the model as given, so normalization is checked too
        assert_outputs_close(run_model(result.model, feeds), run_model(model, feeds), 1e-6)
    return result
