"""PrunePlan → a new model with the removed channels physically gone from every member of each group.

Per-op knowledge lives in one table, `REWRITE_HANDLERS`: op type → how to slice that op's constants and
attributes when channels go from its output (a source), from one of its inputs (a sink), or pass through
it (a follower: BatchNorm statistics, per-channel Mul/Add constants, depthwise Conv weights and `group`,
Resize sizes). It is checked against `rules.RULES` once at import. A constant read by several nodes is
copied for the node being sliced, never sliced in place under the others.

After slicing, stale shape information is dropped, shapes are re-inferred (symbolic dims kept), and the
result is validated against the source model (`io.validate`): a failure is a `ValidationError` (exit 4).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim.analysis.groups import ChannelGroup
from onnxslim.analysis.rules import RULES, Behaviour
from onnxslim.errors import ValidationError
from onnxslim.graph import export_model
from onnxslim.io import validate
from onnxslim.prune.plan import PrunePlan

__all__ = ["RewriteHandler", "REWRITE_HANDLERS", "apply_plan", "rewrite_model"]

logger = logging.getLogger(__name__)

Kept = np.ndarray  # sorted int64 indices of the channels kept


class _Slicer:
    """Slices constant inputs of nodes; copies a constant when other nodes read it too."""

    def __init__(self) -> None:
        self._names = itertools.count()

    def slice_input(self, node: gs.Node, index: int, axis: int, kept: Kept, channels: int) -> None:
        tensor = node.inputs[index]
        if not isinstance(tensor, gs.Constant):
            raise ValidationError(f"{node.op} {node.name!r}: input {index} should be a constant to slice")
        values = np.asarray(tensor.values)
        if values.shape[axis] != channels:
            raise ValidationError(
                f"{node.op} {node.name!r}: input {index} has {values.shape[axis]} entries on axis {axis}, "
                f"expected {channels}"
            )
        sliced = np.take(values, kept, axis=axis)
        if len(tensor.outputs) == 1:
            tensor.values = sliced
        else:
            node.inputs[index] = gs.Constant(f"{tensor.name}_pruned_{next(self._names)}", sliced)

    def slice_aligned(self, node: gs.Node, index: int, out_axis: int, out_rank: int, kept: Kept, channels: int) -> None:
        """Slice a broadcast operand along the dim aligned (numpy-style, from the right) with `out_axis`."""
        if index >= len(node.inputs) or not isinstance(node.inputs[index], gs.Constant):
            return
        shape = np.asarray(node.inputs[index].values).shape
        axis = out_axis - (out_rank - len(shape))
        if axis >= 0 and shape[axis] != 1:
            self.slice_input(node, index, axis, kept, channels)


# handler signatures: (slicer, node, axis, kept, channels) for outputs and followers;
# (slicer, node, input index, axis, kept, channels) for sink inputs


def prune_conv_out_channels(slicer: _Slicer, conv: gs.Node, axis: int, kept: Kept, channels: int) -> None:
    slicer.slice_input(conv, 1, 0, kept, channels)
    if len(conv.inputs) > 2 and conv.inputs[2].name:
        slicer.slice_input(conv, 2, 0, kept, channels)


def prune_conv_in_channels(slicer: _Slicer, conv: gs.Node, index: int, axis: int, kept: Kept, channels: int) -> None:
    slicer.slice_input(conv, 1, 1, kept, channels)


def prune_depthwise_conv_channels(slicer: _Slicer, conv: gs.Node, axis: int, kept: Kept, channels: int) -> None:
    prune_conv_out_channels(slicer, conv, axis, kept, channels)
    conv.attrs["group"] = len(kept)


def prune_conv_transpose_out_channels(slicer: _Slicer, conv: gs.Node, axis: int, kept: Kept, channels: int) -> None:
    slicer.slice_input(conv, 1, 1, kept, channels)
    if len(conv.inputs) > 2 and conv.inputs[2].name:
        slicer.slice_input(conv, 2, 0, kept, channels)


def prune_conv_transpose_in_channels(
    slicer: _Slicer, conv: gs.Node, index: int, axis: int, kept: Kept, channels: int
) -> None:
    slicer.slice_input(conv, 1, 0, kept, channels)


def prune_gemm_out_features(slicer: _Slicer, gemm: gs.Node, axis: int, kept: Kept, channels: int) -> None:
    slicer.slice_input(gemm, 1, 0 if gemm.attrs.get("transB", 0) else 1, kept, channels)
    slicer.slice_aligned(gemm, 2, 1, 2, kept, channels)


def prune_gemm_in_features(slicer: _Slicer, gemm: gs.Node, index: int, axis: int, kept: Kept, channels: int) -> None:
    slicer.slice_input(gemm, 1, 1 if gemm.attrs.get("transB", 0) else 0, kept, channels)


def prune_matmul_out_features(slicer: _Slicer, matmul: gs.Node, axis: int, kept: Kept, channels: int) -> None:
    slicer.slice_input(matmul, 1, 1, kept, channels)


def prune_matmul_in_features(slicer: _Slicer, matmul: gs.Node, index: int, axis: int, kept: Kept, channels: int) -> None:
    slicer.slice_input(matmul, 1, 0, kept, channels)


def _slice_inputs_on_axis0(*indices: int) -> Callable[[_Slicer, gs.Node, int, Kept, int], None]:
    def prune_per_channel_parameters(slicer: _Slicer, node: gs.Node, axis: int, kept: Kept, channels: int) -> None:
        for index in indices:
            if index < len(node.inputs) and node.inputs[index].name:
                slicer.slice_input(node, index, 0, kept, channels)

    return prune_per_channel_parameters


def prune_elementwise_constants(slicer: _Slicer, node: gs.Node, axis: int, kept: Kept, channels: int, rank: int) -> None:
    """Slice every constant operand whose aligned channel dim is not 1."""
    for index in range(len(node.inputs)):
        slicer.slice_aligned(node, index, axis, rank, kept, channels)


def prune_resize_sizes(slicer: _Slicer, resize: gs.Node, axis: int, kept: Kept, channels: int) -> None:
    """Resize with a `sizes` input names the channel count: set it to the channels kept."""
    sizes = resize.inputs[3]
    values = np.asarray(sizes.values).copy()
    values[axis] = len(kept)
    if len(sizes.outputs) == 1:
        sizes.values = values
    else:
        resize.inputs[3] = gs.Constant(f"{sizes.name}_pruned_{resize.name}", values)


@dataclass(frozen=True)
class RewriteHandler:
    """How to remove channels from one op type: as a source's outputs, a sink's input, or a follower."""

    prune_output: Callable[[_Slicer, gs.Node, int, Kept, int], None] | None = None
    prune_input: Callable[[_Slicer, gs.Node, int, int, Kept, int], None] | None = None
    prune_follower: Callable[..., None] | None = None  # (slicer, node, axis, kept, channels, rank)


def _ignoring_rank(handler: Callable[[_Slicer, gs.Node, int, Kept, int], None]) -> Callable[..., None]:
    def with_rank(slicer: _Slicer, node: gs.Node, axis: int, kept: Kept, channels: int, rank: int) -> None:
        handler(slicer, node, axis, kept, channels)

    return with_rank


REWRITE_HANDLERS: Mapping[str, RewriteHandler] = {
    "Conv": RewriteHandler(
        prune_conv_out_channels, prune_conv_in_channels, _ignoring_rank(prune_depthwise_conv_channels)
    ),
    "ConvTranspose": RewriteHandler(prune_conv_transpose_out_channels, prune_conv_transpose_in_channels),
    "Gemm": RewriteHandler(prune_gemm_out_features, prune_gemm_in_features),
    "MatMul": RewriteHandler(prune_matmul_out_features, prune_matmul_in_features),
    "BatchNormalization": RewriteHandler(prune_follower=_ignoring_rank(_slice_inputs_on_axis0(1, 2, 3, 4))),
    "InstanceNormalization": RewriteHandler(prune_follower=_ignoring_rank(_slice_inputs_on_axis0(1, 2))),
    "Resize": RewriteHandler(prune_follower=_ignoring_rank(prune_resize_sizes)),
    **{
        op: RewriteHandler(prune_follower=prune_elementwise_constants)
        for op in ("Add", "Sub", "Mul", "Div", "Pow", "Sum", "Max", "Min", "Mean", "PRelu")
    },
}


def _check_handlers() -> list[str]:
    problems = []
    for op, rule in RULES.items():
        handler = REWRITE_HANDLERS.get(op)
        if rule.behaviour is Behaviour.SOURCE and (handler is None or not handler.prune_output or not handler.prune_input):
            problems.append(f"source op {op} needs output and input handlers")
        if rule.follower and (handler is None or handler.prune_follower is None):
            problems.append(f"follower op {op} needs a follower handler")
    return problems


_PROBLEMS = _check_handlers()
if _PROBLEMS:  # pragma: no cover - checked once at import
    raise ImportError("onnxslim.prune.rewrite: " + "; ".join(_PROBLEMS))


def apply_plan(model: onnx.ModelProto, groups: Sequence[ChannelGroup], plan: PrunePlan) -> onnx.ModelProto:
    """A copy of the normalized `model` with the plan's removed channels sliced out of every group member.

    Stale value_info is dropped and shapes re-inferred with the model's own (symbolic) input dims.
    """
    graph = gs.import_onnx(model)
    nodes = {node.name: node for node in graph.nodes}
    slicer = _Slicer()
    for group in groups:
        if not plan.changes(group):
            continue
        if not group.prunable:
            raise ValidationError(f"the plan prunes group {group.id!r}, which is blocked: {group.blocked_by}")
        kept = np.asarray(plan.kept[group.id], dtype=np.int64)
        logger.debug("group %s: keeping %d of %d channels", group.id, len(kept), group.channels)
        for source in group.sources:
            prune_output = REWRITE_HANDLERS[source.op_type].prune_output
            assert prune_output is not None  # guaranteed by the import-time check
            prune_output(slicer, nodes[source.node], source.axis, kept, group.channels)
        for sink in group.sinks:
            prune_input = REWRITE_HANDLERS[sink.op_type].prune_input
            assert prune_input is not None
            prune_input(slicer, nodes[sink.node], sink.input_index, sink.axis, kept, group.channels)
        for follower in group.followers:
            prune_follower = REWRITE_HANDLERS[follower.op_type].prune_follower
            assert prune_follower is not None
            prune_follower(
                slicer, nodes[follower.node], follower.axis, kept, group.channels, follower.rank
            )
    keep = {t.name for t in [*graph.inputs, *graph.outputs]}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in keep:
            tensor.shape = None
    graph.cleanup().toposort()
    pruned = export_model(graph, model)
    del pruned.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(pruned, check_type=False, strict_mode=False)
    except Exception as e:  # noqa: BLE001 - onnx raises several types; value_info is optional
        logger.debug("shape inference of the pruned model failed (%s); saving it without value_info", e)
        return pruned


def rewrite_model(
    model: onnx.ModelProto,
    groups: Sequence[ChannelGroup],
    plan: PrunePlan,
    input_shapes: Mapping[str, Sequence[int]],
) -> onnx.ModelProto:
    """`apply_plan`, then `validate` the result against `model` at `input_shapes` (ValidationError: exit 4)."""
    try:
        pruned = apply_plan(model, groups, plan)
    except ValidationError:
        raise
    except (ValueError, IndexError, KeyError) as e:
        raise ValidationError(f"removing the planned channels failed: {type(e).__name__}: {e}") from e
    validate(pruned, model, input_shapes)
    return pruned
