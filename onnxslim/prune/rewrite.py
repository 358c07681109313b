"""PrunePlan → a new model with the removed channels physically gone from every member of each group.

Per-op knowledge lives in one table, `REWRITE_HANDLERS`: op type → how to slice that op's constants and
attributes when channels go from its output (a source), from one of its inputs (a sink), or pass through
it (a follower: BatchNorm statistics, per-channel Mul/Add constants, depthwise Conv weights and `group`,
Resize sizes, Split sizes, Slice starts/ends, Reshape shape constants, a head split's head count in a
target built at run time by a `Concat`). It is checked against
`rules.RULES` once at import, with every other per-op table (optables.py). A constant read by several nodes is copied for the node being sliced, never
sliced in place under the others.

A node may hold several groups in one tensor (a Conv reading a Concat, a Split cutting its producer into
independent groups): the removals of every group are gathered first, in that node's own channel
numbering (segment offset + channel; for a Flatten/Reshape → Gemm sink, every feature of the channel; for
an attention head, its `unit` = D columns of the Q/K/V projections and their biases),
and each handler runs once per node and role.

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
from onnxslim.analysis.rules import target_pieces
from onnxslim.errors import ValidationError
from onnxslim.graph import export_model
from onnxslim.io import validate
from onnxslim.prune.plan import PrunePlan

__all__ = [
    "RewriteHandler",
    "REWRITE_HANDLERS",
    "apply_plan",
    "apply_plan_to_graph",
    "kept_input_channels",
    "kept_output_channels",
    "rewrite_model",
]

logger = logging.getLogger(__name__)

Kept = np.ndarray  # sorted int64 indices of the channels kept


class _Slicer:
    """Slices constant inputs of nodes; copies a constant when other nodes read it too (one copy per way it is
    sliced, shared by the readers that slice it alike)."""

    def __init__(self, opset: int, graph: gs.Graph) -> None:
        self.opset = opset
        self.graph = graph
        self._names = itertools.count()
        # a constant several nodes read, sliced the same way for each (an unrolled LSTM's recurrent weight read
        # by every step): one sliced copy they all share, not one per reader
        self._sliced: dict[tuple[str, int, bytes], gs.Constant] = {}

    def own_producer(self, node: gs.Node, index: int) -> gs.Node:
        """The producer of variable input `index` of `node`, copied for `node` when other nodes read its output."""
        tensor = node.inputs[index]
        producer = tensor.inputs[0]
        if len(tensor.outputs) == 1:
            return producer
        output = gs.Variable(f"{tensor.name}_pruned_{next(self._names)}", dtype=tensor.dtype, shape=tensor.shape)
        copy = gs.Node(producer.op, f"{producer.name}_pruned_{next(self._names)}", dict(producer.attrs),
                       list(producer.inputs), [output], domain=producer.domain)
        self.graph.nodes.append(copy)
        node.inputs[index] = output
        return copy

    def set_constant(self, node: gs.Node, index: int, values: np.ndarray) -> None:
        """Replace constant input `index` of `node` (copied if other nodes read it too)."""
        tensor = node.inputs[index] if index < len(node.inputs) else None
        if isinstance(tensor, gs.Constant) and len(tensor.outputs) == 1:
            tensor.values = values
            return
        constant = gs.Constant(f"{node.name}_input{index}_pruned_{next(self._names)}", values)
        while len(node.inputs) <= index:
            node.inputs.append(gs.Variable.empty())
        node.inputs[index] = constant

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
        key = (tensor.name, axis, np.asarray(kept, np.int64).tobytes())
        if key not in self._sliced and len(tensor.outputs) == 1:
            tensor.values = np.take(values, kept, axis=axis)
            return
        if key not in self._sliced:
            self._sliced[key] = gs.Constant(f"{tensor.name}_pruned_{next(self._names)}", np.take(values, kept, axis=axis))
        node.inputs[index] = self._sliced[key]

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
    groups = int(conv.attrs.get("group", 1))
    if groups == 1:
        slicer.slice_input(conv, 1, 1, kept, channels)
        return
    # grouped: weight [C_out, C_in / G, k...]; the output channels of group g (rows g·R … (g+1)·R) read its
    # input channels g·S … (g+1)·S as columns 0 … S; every group keeps as many (the plan balances them)
    weight = conv.inputs[1]
    if not isinstance(weight, gs.Constant):
        raise ValidationError(f"Conv {conv.name!r}: the weight should be a constant to slice")
    values = np.asarray(weight.values)
    size, rows = channels // groups, values.shape[0] // groups
    if values.shape[1] != size or values.shape[0] % groups:
        raise ValidationError(f"Conv {conv.name!r}: weight {values.shape} does not fit {channels} inputs in {groups} groups")
    parts = [
        np.take(values[g * rows : (g + 1) * rows], kept[(kept >= g * size) & (kept < (g + 1) * size)] - g * size, axis=1)
        for g in range(groups)
    ]
    if len({part.shape[1] for part in parts}) != 1:
        raise ValidationError(f"Conv {conv.name!r}: its {groups} groups would keep different numbers of inputs")
    slicer.set_constant(conv, 1, np.concatenate(parts, axis=0))


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


def prune_reshape_shape(slicer: _Slicer, reshape: gs.Node, axis: int, kept: Kept, channels: int, rank: int) -> None:
    """A Reshape target entry that names the channel count (times H·W when flattening; the head count of a
    head split): scale it down. The target is a constant, or a `Concat` built at run time whose piece holding
    the entry is a constant (the Concat is copied when other nodes read it too); −1 and 0 entries stay."""

    def scaled(values: np.ndarray, at: int) -> np.ndarray:
        values = values.copy()
        if values[at] <= 0:
            return values
        if values[at] % channels:
            raise ValidationError(f"Reshape {reshape.name!r}: target {values.tolist()} does not hold {channels} channels")
        values[at] = values[at] // channels * len(kept)
        return values

    if isinstance(reshape.inputs[1], gs.Constant):
        slicer.set_constant(reshape, 1, scaled(np.asarray(reshape.inputs[1].values), axis))
        return
    if target_pieces(reshape) is None:
        raise ValidationError(f"Reshape {reshape.name!r}: its target is neither a constant nor a Concat")
    concat = slicer.own_producer(reshape, 1)
    lengths = [_piece_length(piece) for piece in concat.inputs]
    # where each piece starts: counted from the front up to the first piece of unknown length, from the back
    # (the target has `rank` entries) after the last one
    starts: list[int | None] = [None] * len(lengths)
    position: int | None = 0
    for index, length in enumerate(lengths):
        starts[index] = position
        position = position + length if position is not None and length is not None else None
    position = rank
    for index in reversed(range(len(lengths))):
        length = lengths[index]
        if position is None or length is None:
            break
        position -= length
        starts[index] = position
    for index, (piece, start, length) in enumerate(zip(concat.inputs, starts, lengths, strict=True)):
        if start is not None and length is not None and start <= axis < start + length:
            if not isinstance(piece, gs.Constant):
                raise ValidationError(f"Reshape {reshape.name!r}: its target computes the channel count")
            slicer.set_constant(concat, index, scaled(np.asarray(piece.values).reshape(-1), axis - start))
            return
    raise ValidationError(f"Reshape {reshape.name!r}: no constant piece of its target holds entry {axis}")


def _piece_length(piece: gs.Tensor) -> int | None:
    """The length of a 1-D piece of a Concat: a constant's size, a Variable's static shape, an Unsqueeze of
    a scalar 1."""
    if isinstance(piece, gs.Constant):
        return int(np.asarray(piece.values).size)
    if piece.shape is not None and len(piece.shape) == 1 and isinstance(piece.shape[0], int):
        return int(piece.shape[0])
    producer = piece.inputs[0] if len(piece.inputs) == 1 else None
    if producer is not None and producer.op == "Unsqueeze" and producer.inputs[0].shape == []:
        return 1
    return None


def prune_nothing(slicer: _Slicer, node: gs.Node, axis: int, kept: Kept, channels: int, rank: int) -> None:
    """A follower with nothing to slice (a MatMul of two computed tensors: attention's per-head products)."""


def _kept_in(kept: Kept, start: int, end: int) -> int:
    return int(np.count_nonzero((kept >= start) & (kept < end)))


def prune_split_sizes(slicer: _Slicer, split: gs.Node, axis: int, kept: Kept, channels: int, rank: int) -> None:
    """Rewrite a Split on the channel axis with explicit sizes: the channels kept of each part."""
    if int(split.attrs.get("axis", 0)) % rank != axis:
        return
    sizes = split.attrs.get("split")
    if sizes is None and len(split.inputs) > 1 and split.inputs[1].name:
        sizes = np.asarray(split.inputs[1].values).tolist()
    if not sizes:
        parts = int(split.attrs.get("num_outputs", len(split.outputs)))
        chunk = -(-channels // parts)
        sizes = [min(chunk, max(channels - chunk * i, 0)) for i in range(parts)]
    starts = np.cumsum([0, *sizes])
    new_sizes = [_kept_in(kept, int(a), int(b)) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    split.attrs.pop("num_outputs", None)
    if slicer.opset >= 13:
        split.attrs.pop("split", None)
        slicer.set_constant(split, 1, np.asarray(new_sizes, dtype=np.int64))
    else:
        split.attrs["split"] = new_sizes


def prune_slice_range(slicer: _Slicer, slice_node: gs.Node, axis: int, kept: Kept, channels: int, rank: int) -> None:
    """Rewrite a Slice's start and end on the channel axis to count only the channels kept before them."""
    attributes = slicer.opset < 10
    if attributes:
        starts, ends = list(slice_node.attrs["starts"]), list(slice_node.attrs["ends"])
        axes = slice_node.attrs.get("axes")
    else:
        starts, ends = (np.asarray(slice_node.inputs[i].values).tolist() for i in (1, 2))
        has_axes = len(slice_node.inputs) > 3 and slice_node.inputs[3].name
        axes = np.asarray(slice_node.inputs[3].values).tolist() if has_axes else None
    axes = [int(a) % rank for a in axes] if axes else list(range(len(starts)))
    position = axes.index(axis)
    start, end, _ = slice(int(starts[position]), int(ends[position])).indices(channels)
    starts[position], ends[position] = _kept_in(kept, 0, start), _kept_in(kept, 0, end)
    if attributes:
        slice_node.attrs["starts"], slice_node.attrs["ends"] = starts, ends
        return
    dtype = np.asarray(slice_node.inputs[1].values).dtype
    slicer.set_constant(slice_node, 1, np.asarray(starts, dtype=dtype))
    slicer.set_constant(slice_node, 2, np.asarray(ends, dtype=dtype))


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
    "MatMul": RewriteHandler(prune_matmul_out_features, prune_matmul_in_features, prune_nothing),
    "BatchNormalization": RewriteHandler(prune_follower=_ignoring_rank(_slice_inputs_on_axis0(1, 2, 3, 4))),
    "InstanceNormalization": RewriteHandler(prune_follower=_ignoring_rank(_slice_inputs_on_axis0(1, 2))),
    "Resize": RewriteHandler(prune_follower=_ignoring_rank(prune_resize_sizes)),
    "Split": RewriteHandler(prune_follower=prune_split_sizes),
    "Reshape": RewriteHandler(prune_follower=prune_reshape_shape),
    "Slice": RewriteHandler(prune_follower=prune_slice_range),
    **{
        op: RewriteHandler(prune_follower=prune_elementwise_constants)
        for op in ("Add", "Sub", "Mul", "Div", "Pow", "Sum", "Max", "Min", "Mean", "PRelu")
    },
}


@dataclass
class _Removal:
    """Channels removed from one role of one node (its output, an input, or as a follower), all groups."""

    op_type: str
    extent: int
    axis: int
    rank: int
    removed: set[int]

    def kept(self) -> Kept:
        return np.asarray([c for c in range(self.extent) if c not in self.removed], dtype=np.int64)


def _collect_removals(groups: Sequence[ChannelGroup], plan: PrunePlan) -> dict[tuple[str, str, int], _Removal]:
    """(role, node, input index or axis) → the channels every pruned group removes there, in that node's
    own channel numbering (a group is a segment [offset, offset + size) of it after Concat/Split)."""
    removals: dict[tuple[str, str, int], _Removal] = {}

    def add(
        key: tuple[str, str, int], op_type: str, offset: int, extent: int | None, axis: int, rank: int,
        group: ChannelGroup, unit: int = 1,
    ) -> None:
        removal = removals.setdefault(key, _Removal(op_type, (extent or group.channels) * unit, axis, rank, set()))
        removal.removed.update((offset + c) * unit + j for c in plan.removed(group) for j in range(unit))

    for group in groups:
        if not plan.changes(group):
            continue
        if not group.prunable:
            raise ValidationError(f"the plan prunes group {group.id!r}, which is blocked: {group.blocked_by}")
        logger.debug("group %s: keeping %d of %d channels", group.id, len(plan.kept[group.id]), group.channels)
        for source in group.sources:
            add(("output", source.node, source.axis), source.op_type, source.offset, source.extent, source.axis, 0, group,
                source.unit)
        for sink in group.sinks:
            key = ("input", sink.node, sink.input_index)
            if sink.outer * sink.inner == 1:
                add(key, sink.op_type, sink.offset, sink.extent, sink.axis, 0, group)
                continue
            extent = sink.extent or group.channels  # flattened: channel c is features (o·extent + c)·inner + j
            features = removals.setdefault(key, _Removal(sink.op_type, sink.outer * extent * sink.inner, sink.axis, 0, set()))
            for channel in plan.removed(group):
                for repeat in range(sink.outer):
                    first = ((repeat * extent) + sink.offset + channel) * sink.inner
                    features.removed.update(range(first, first + sink.inner))
        for follower in group.followers:
            key = ("follower", follower.node, follower.axis)
            add(key, follower.op_type, follower.offset, follower.extent, follower.axis, follower.rank, group, follower.unit)
    return removals


def kept_output_channels(groups: Sequence[ChannelGroup], plan: PrunePlan) -> dict[str, np.ndarray]:
    """Node → the output channels it still produces, in its own numbering, for every source and follower
    (a depthwise Conv, a BatchNorm …) that loses some: how a pruned node's outputs map to the original's."""
    return {
        name: removal.kept()
        for (role, name, _), removal in _collect_removals(groups, plan).items()
        if role in ("output", "follower")
    }


def kept_input_channels(groups: Sequence[ChannelGroup], plan: PrunePlan) -> dict[str, np.ndarray]:
    """Sink node → the channels (features, after Flatten → Gemm) of its first input that it still reads."""
    return {
        name: removal.kept()
        for (role, name, index), removal in _collect_removals(groups, plan).items()
        if role == "input" and index == 0
    }


def apply_plan(model: onnx.ModelProto, groups: Sequence[ChannelGroup], plan: PrunePlan) -> onnx.ModelProto:
    """A copy of the normalized `model` with the plan's removed channels sliced out of every group member.

    Stale value_info is dropped and shapes re-inferred with the model's own (symbolic) input dims.
    """
    return apply_plan_to_graph(gs.import_onnx(model), model, groups, plan)


def apply_plan_to_graph(
    graph: gs.Graph, template: onnx.ModelProto, groups: Sequence[ChannelGroup], plan: PrunePlan
) -> onnx.ModelProto:
    """`apply_plan` on a graph already imported from `template` (the pipeline's analysis graph, so the model
    is imported once per prune). The graph is edited in place; the pruned model keeps `template`'s metadata."""
    nodes = {node.name: node for node in graph.nodes}
    slicer = _Slicer(int(graph.opset or onnx.defs.onnx_opset_version()), graph)
    for (role, name, where), removal in _collect_removals(groups, plan).items():
        handler, node, kept = REWRITE_HANDLERS[removal.op_type], nodes[name], removal.kept()
        if role == "output":
            assert handler.prune_output is not None  # guaranteed by the import-time check
            handler.prune_output(slicer, node, removal.axis, kept, removal.extent)
        elif role == "input":
            assert handler.prune_input is not None
            handler.prune_input(slicer, node, where, removal.axis, kept, removal.extent)
        else:
            assert handler.prune_follower is not None
            handler.prune_follower(slicer, node, removal.axis, kept, removal.extent, removal.rank)
    keep = {t.name for t in [*graph.inputs, *graph.outputs]}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in keep:
            tensor.shape = None
    graph.cleanup().toposort()
    pruned = export_model(graph, template)
    del pruned.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(pruned, check_type=False, strict_mode=False)
    except Exception as e:  # noqa: BLE001 - onnx raises several types; value_info is optional
        logger.debug("shape inference of the pruned model failed (%s); saving it without value_info", e)
        return pruned
    # inference may replace a symbolic output dim by the value it infers ('Div..._dim_1' → 384 on a torch
    # export): the outputs as declared are the model's contract, kept as the template declares them
    declared = {value.name: value for value in template.graph.output}
    for value in inferred.graph.output:
        if value.name in declared:
            value.CopyFrom(declared[value.name])
    return inferred


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
