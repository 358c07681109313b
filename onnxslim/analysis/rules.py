"""How channels flow through each op type: the one table of per-op knowledge for the channel analysis.

Every op type the analysis understands has one entry in `RULES`: its behaviour (for reports and the
import-time checks) and a small function that looks at the node (attributes, operand shapes, constant
operands, the channel axis of each input) and decides what happens to the channels:

* `Create` — a **source** (and the **sink** of its input): Conv/ConvTranspose, Gemm/MatMul with a constant
  weight. It mixes the channels of one input on one axis and creates new ones. A grouped Conv (1 < group <
  channels) does so per block of channels (`blocks`): both groups must then lose as many channels from
  every block.
* `Flow` — **pass-through** and **join**: output 0 carries the channels of the `operands` on `out_axis`.
  Several operands are joined (their groups are united); `broadcast` operands have channel dim 1 and
  join nothing; `follower` marks a node with per-channel constants or attributes the rewrite must slice.
* `Concatenate` — **concat** on the channel axis: output 0 is the operands' channels one after another,
  a sequence of segments that each keep their own group.
* `Partition` — **split**: output i carries channels [start, end) of input 0 (Split, Slice); `follower`
  marks that the rewrite must update the sizes or starts/ends.
* `SplitHeads` — **heads**: a Reshape that splits the channel axis [.., H·D] into [.., H, D] with the head
  axis kept whole partitions the channels into H heads of D consecutive channels. The group's channel
  becomes the head: every member, source and follower seen so far holds a head as D channels, the output
  carries the H heads on the head axis (D is just another axis there). What follows acts per head:
  Transpose moves the head axis, Softmax and scale Mul/Div pass it, the attention MatMuls (Q·Kᵀ and
  softmax·V, both operands computed) treat it as a batch axis and join their operands' heads, and the merge
  Transpose + Reshape back to [.., H·D] flattens the heads (D features each) into the output projection,
  the group's sink. The target's head entry is rewritten H → H−k (a constant, or a constant piece of a
  `Concat` built at run time from `Shape`/`Gather`/`Unsqueeze`); a −1 there needs no rewrite.
* `Unread` — the node reads input 0 but neither its channels' values nor their count (`Shape` whose
  channel entry nobody uses): nothing flows on, and nothing blocks.
* `Block` — a **blocker**, with the reason reported by `inspect` and `prune`.

Op types missing from the table are blockers ("unsupported op X"). Being conservative is never a bug;
emitting a wrong graph always is (docs/ARCHITECTURE.md). The table is checked once at import: every key is a real
ONNX op, every entry has exactly one behaviour and a decision function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

__all__ = [
    "Behaviour",
    "Create",
    "Flow",
    "Block",
    "Concatenate",
    "Partition",
    "SplitHeads",
    "Unread",
    "Decision",
    "NodeView",
    "merged_channel_axis",
    "heads_split",
    "reshape_target",
    "target_pieces",
    "OpRule",
    "RULES",
    "decide",
    "unsupported",
]


class Behaviour(Enum):
    """What an op type does to channels (its usual case; attributes may still make one node a blocker)."""

    SOURCE = "source"  # mixes its input's channels (the group's sink) and creates new ones
    PASS_THROUGH = "pass-through"  # output channel c depends only on input channel c
    JOIN = "join"  # elementwise between several variable tensors: unites their groups
    CONCAT = "concat"  # stacks its operands' channels as segments
    SPLIT = "split"  # each output takes a range of its input's channels
    TERMINAL = "terminal"  # reads its input but not its channels (Shape of the other dims)
    BLOCKER = "blocker"  # mixes channels in a way the rules do not model


@dataclass(frozen=True)
class Create:
    """The node consumes the channels of input `sink_input` on `sink_axis` and creates `channels` new ones."""

    out_axis: int
    channels: int
    sink_input: int = 0
    sink_axis: int = 1
    blocks: int = 1  # a grouped Conv's groups: its input and output channels fall into this many equal blocks


@dataclass(frozen=True)
class Flow:
    """Output 0 carries the channels of `operands` on `out_axis` (one operand: pass-through; several: join)."""

    operands: tuple[int, ...]
    out_axis: int
    follower: bool = False
    broadcast: tuple[int, ...] = ()
    elementwise: bool = False  # output element i depends only on input element i (safe on flattened channels)
    outer: int = 1  # Flatten/Reshape: each output feature block holds the channels `outer` times …
    inner: int = 1  # … and each channel as `inner` consecutive features (NCHW: H·W; NHWC: outer = H·W)


@dataclass(frozen=True)
class Block:
    """The node mixes channels in a way the rules do not model (`to_output`: what it reads reaches a graph
    output, so the group is the model's contract, as for --protect-last)."""

    reason: str
    to_output: bool = False
    # it normalizes over the channels (LayerNormalization, its decomposition's ReduceMean): the channels are
    # a transformer's hidden size, the residual stream, which stays (reports say so plainly)
    normalizes: bool = False


@dataclass(frozen=True)
class Concatenate:
    """Output 0 is the channels of `operands` one after another on `out_axis` (Concat on the channel axis)."""

    operands: tuple[int, ...]
    out_axis: int


@dataclass(frozen=True)
class Partition:
    """Output i carries channels `ranges[i]` = [start, end) of input 0 on `out_axis` (Split, Slice)."""

    ranges: tuple[tuple[int, int], ...]
    out_axis: int
    follower: bool = False


@dataclass(frozen=True)
class Unread:
    """The node reads input 0 without depending on its channels; its outputs carry none."""


@dataclass(frozen=True)
class SplitHeads:
    """Output 0 splits the channel axis of input 0 into `heads` × `width` on axes `out_axis`, `out_axis` + 1:
    the group's channels become heads of `width` consecutive channels each, carried on `out_axis`.
    `follower`: the target names the head count (the rewrite sets it to the heads kept)."""

    out_axis: int
    heads: int
    width: int
    follower: bool = False


Decision = Create | Flow | Concatenate | Partition | SplitHeads | Unread | Block


@dataclass(frozen=True)
class NodeView:
    """What a rule may look at: the node, the opset, static shapes and the channel axis of each input."""

    node: gs.Node
    opset: int
    input_shapes: tuple[tuple[int, ...] | None, ...]
    output_shapes: tuple[tuple[int, ...] | None, ...]
    input_axes: tuple[int | None, ...]  # channel axis of each variable input; None for constants/absent
    # variable inputs whose channels are not followed (graph inputs, outputs of blocking ops) -> what stopped
    # them: their axis in `input_axes` is only assumed (1), so a rule may not conclude from it that they broadcast
    opaque_inputs: Mapping[int, str] = field(default_factory=dict)
    # the static shape of any tensor (a Reshape target's pieces), when known
    tensor_shape: Callable[[gs.Tensor], tuple[int, ...] | None] = field(default=lambda tensor: None)

    @property
    def op(self) -> str:
        return self.node.op

    def has_input(self, index: int) -> bool:
        return index < len(self.node.inputs) and bool(self.node.inputs[index].name)

    def constant(self, index: int) -> np.ndarray | None:
        """The value of input `index` if it is a constant, else None."""
        if not self.has_input(index):
            return None
        tensor = self.node.inputs[index]
        return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None

    def is_variable(self, index: int) -> bool:
        return self.has_input(index) and not isinstance(self.node.inputs[index], gs.Constant)

    def shape(self, index: int) -> tuple[int, ...]:
        shape = self.input_shapes[index]
        if shape is None:
            raise KeyError(f"input {index} of {self.node.name} has no static shape")
        return shape

    def axis(self, index: int) -> int | None:
        return self.input_axes[index] if index < len(self.input_axes) else None

    def out_rank(self) -> int:
        shape = self.output_shapes[0]
        return len(shape) if shape is not None else 0

    def attr(self, name: str, default: Any = None) -> Any:
        return self.node.attrs.get(name, default)


@dataclass(frozen=True)
class OpRule:
    """One table entry: the op's behaviour, the function deciding one node, and whether it may be a follower."""

    behaviour: Behaviour
    decide: Callable[[NodeView], Decision]
    follower: bool = False  # the rewrite may have to slice this op's constants or attributes


# ----------------------------------------------------------------------------------------- decisions


def _on_channels(decide: Callable[[NodeView, int], Decision]) -> Callable[[NodeView], Decision]:
    """A decision about the channels of input 0: it blocks when that input carries none, else gets their axis."""

    @functools.wraps(decide)
    def decide_on_channels(view: NodeView) -> Decision:
        axis = view.axis(0)
        if axis is None:
            return Block("its input carries no channels")
        return decide(view, axis)

    return decide_on_channels


@_on_channels
def _unary(view: NodeView, axis: int) -> Decision:
    """Elementwise on one tensor (other inputs are scalars or attributes): channels pass through."""
    return Flow((0,), axis, elementwise=True)


def _axis_must_be(view: NodeView, wanted: int, what: str) -> Block | None:
    axis = view.axis(0)
    if axis != wanted:
        return Block(f"{what} works on axis {wanted}, but the channels are on axis {axis}")
    return None


def _spatial(view: NodeView) -> Decision:
    """Pooling and friends: NCHW ops that keep channel c in channel c."""
    return _axis_must_be(view, 1, view.op) or Flow((0,), 1)


def _per_channel_norm(view: NodeView) -> Decision:
    """BatchNormalization, InstanceNormalization: per-channel statistics on axis 1, sliced by the rewrite."""
    if any(view.has_input(i) and not isinstance(view.node.inputs[i], gs.Constant) for i in range(1, len(view.node.inputs))):
        return Block(f"{view.op} with computed (non-constant) parameters")
    return _axis_must_be(view, 1, view.op) or Flow((0,), 1, follower=True)


def _broadcast_join(
    view: NodeView, carriers: Sequence[int], operands_of_node: Sequence[int]
) -> tuple[list[int], list[int], int] | Block:
    """The numpy-broadcast core of `_elementwise` and `_batched_matmul`: the `carriers` whose channel dim,
    aligned from the right, matches the output's are joined on one output axis; every other operand of
    `operands_of_node` broadcasts (size 1 there), joins (an opaque operand on that axis), or blocks.
    Returns (joined, broadcast, output axis) or the Block."""
    out_shape = view.output_shapes[0]
    assert out_shape is not None
    rank = len(out_shape)
    operands: list[int] = []
    broadcast: list[int] = []
    axes: set[int] = set()
    for index in carriers:
        shape, axis = view.shape(index), view.axis(index)
        assert axis is not None
        aligned = axis + rank - len(shape)
        if shape[axis] == out_shape[aligned]:
            operands.append(index)
            axes.add(aligned)
        elif shape[axis] != 1:  # size 1: broadcast (below)
            return Block(f"operand {index} has {shape[axis]} channels where the output has {out_shape[aligned]}")
    if len(axes) != 1:
        return Block("its operands carry channels on different axes" if axes else "no operand carries channels")
    out_axis = axes.pop()
    for index in operands_of_node:
        if index in operands:
            continue
        shape, axis = view.shape(index), view.axis(index)
        position = out_axis - (rank - len(shape))
        if position < 0 or shape[position] == 1:
            broadcast.append(index)  # the same value for every channel
        elif index in view.opaque_inputs and axis is not None and axis + rank - len(shape) == out_axis:
            operands.append(index)  # joined: what blocked its channels blocks the group
        elif index in view.opaque_inputs:
            return Block(
                f"operand {index} varies along the channel axis, but its channels could not be followed "
                f"({view.opaque_inputs[index]})"
            )
        else:
            return Block(f"operand {index} varies along the channel axis but carries its channels on another axis")
    return operands, broadcast, out_axis


def _elementwise(view: NodeView) -> Decision:
    """Add/Sub/Mul/Div/Pow/Sum/Max/Min/Mean/PRelu with numpy broadcasting, aligned from the right.

    Variable operands whose channel dim matches the output are joined; those with channel dim 1 broadcast
    and join nothing; a constant whose aligned channel dim is not 1 is per-channel (the node is a follower).
    The output's channel axis comes from the operands whose channels are followed; an operand whose channels
    are not (opaque: its axis is only assumed) broadcasts only if it has size 1 on that axis, joins (and so
    blocks the group) if its assumed axis is that axis, and otherwise blocks the node.
    """
    out_shape = view.output_shapes[0]
    assert out_shape is not None
    rank = len(out_shape)
    variables = [i for i in range(len(view.node.inputs)) if view.has_input(i) and view.constant(i) is None]
    constants = [value for i in range(len(view.node.inputs)) if (value := view.constant(i)) is not None]
    with_axis = [i for i in variables if view.axis(i) is not None]
    carriers = [i for i in with_axis if i not in view.opaque_inputs] or with_axis
    joined = _broadcast_join(view, carriers, variables)
    if isinstance(joined, Block):
        return joined
    operands, broadcast, out_axis = joined
    follower = False
    for value in constants:
        aligned = out_axis - (rank - value.ndim)
        if aligned >= 0 and value.shape[aligned] != 1:
            follower = True
    return Flow(tuple(sorted(operands)), out_axis, follower=follower, broadcast=tuple(broadcast))


def _constant_weight(view: NodeView) -> np.ndarray | Block:
    """A Conv/ConvTranspose/Gemm weight (input 1) when it and the bias (input 2) are constants, else the Block."""
    weight = view.constant(1)
    if weight is None:
        return Block(f"{view.op} with a computed (non-constant) weight")
    if view.is_variable(2):
        return Block(f"{view.op} with a computed (non-constant) bias")
    return weight


def _conv(view: NodeView) -> Decision:
    weight = _constant_weight(view)
    if isinstance(weight, Block):
        return weight
    group = int(view.attr("group", 1))
    if group == 1:
        return Create(out_axis=1, channels=int(weight.shape[0]))
    in_channels = view.shape(0)[1]
    if group == in_channels and weight.shape[0] == in_channels and weight.shape[1] == 1:
        return _axis_must_be(view, 1, "depthwise Conv") or Flow((0,), 1, follower=True)
    if weight.shape[1] == 1:
        return Block(f"depthwise Conv with channel multiplier {weight.shape[0] // group} is not supported yet")
    return Create(out_axis=1, channels=int(weight.shape[0]), blocks=group)


def _conv_transpose(view: NodeView) -> Decision:
    weight = _constant_weight(view)
    if isinstance(weight, Block):
        return weight
    if int(view.attr("group", 1)) != 1:
        return Block("grouped ConvTranspose is not supported yet")
    return Create(out_axis=1, channels=int(weight.shape[1]))


def _gemm(view: NodeView) -> Decision:
    weight = _constant_weight(view)
    if isinstance(weight, Block):
        return weight
    if weight.ndim != 2:
        return Block("Gemm with a computed (non-constant) weight")
    if view.attr("transA", 0):
        return Block("Gemm with transA=1 is not supported")
    features = weight.shape[0] if view.attr("transB", 0) else weight.shape[1]
    return Create(out_axis=1, channels=int(features))


def _batched_matmul(view: NodeView) -> Decision:
    """A MatMul of two computed tensors (attention's Q·Kᵀ and softmax·V): the axes before the last two are
    batch axes, elementwise with numpy broadcasting; channels on one of them flow through and join the
    other operand's. Channels on a multiplied axis (the last two) are mixed: a block. A follower: its MACs
    scale with the channels kept (MacModel), and it has no constants to slice."""
    with_axis = [i for i in (0, 1) if view.axis(i) is not None]
    carriers = [i for i in with_axis if i not in view.opaque_inputs] or with_axis
    if not carriers:
        return Block("MatMul of two computed tensors that carry no channels")
    for index in carriers:
        shape, axis = view.shape(index), view.axis(index)
        assert axis is not None
        if len(shape) < 3 or axis >= len(shape) - 2:
            return Block("MatMul of two computed tensors multiplies along the channel axis")
    joined = _broadcast_join(view, carriers, (0, 1))
    if isinstance(joined, Block):
        return joined
    operands, broadcast, out_axis = joined
    return Flow(tuple(sorted(operands)), out_axis, follower=True, broadcast=tuple(broadcast))


def _matmul(view: NodeView) -> Decision:
    weight = view.constant(1)
    if view.is_variable(0) and view.is_variable(1):
        return _batched_matmul(view)
    if weight is None or weight.ndim != 2 or not view.is_variable(0):
        return Block("MatMul without a constant 2-D weight as its second input")
    rank = len(view.shape(0))
    if rank < 2:
        return Block("MatMul of a 1-D tensor")
    return Create(out_axis=rank - 1, channels=int(weight.shape[1]), sink_axis=rank - 1)


def _axes_operand(view: NodeView) -> list[int] | None:
    """An `axes` operand: the attribute (older opsets) or constant input 1 (newer); [] when absent, None
    when it is computed at run time."""
    axes = view.attr("axes")
    if axes is None and view.has_input(1):
        value = view.constant(1)
        if value is None:
            return None
        axes = value.tolist()
    return [int(a) for a in axes] if axes is not None else []


def _reduce_axes(view: NodeView) -> list[int] | None:
    """The axes a Reduce* node reduces, or None for all axes (or computed ones, which `_reduce` blocks)."""
    axes = _axes_operand(view)
    if not axes:
        return None
    rank = len(view.shape(0))
    return sorted(int(a) % rank for a in axes)


def _normalizes_opaque_features(view: NodeView, axes: Sequence[int] | None) -> Block | None:
    """A LayerNorm (or its decomposition's ReduceMean) over the last axis of a tensor of rank >= 3 whose
    channels could not be followed: a transformer's residual stream, its hidden size. It blocks, saying so
    (its axis is only assumed there, so passing it through would be a guess anyway)."""
    if 0 not in view.opaque_inputs or view.axis(0) is None:
        return None
    rank = len(view.shape(0))
    if rank >= 3 and axes is not None and list(axes) == [rank - 1]:
        reason = f"{view.op} normalizes over the last axis, but its channels could not be followed ({view.opaque_inputs[0]})"
        return Block(reason, normalizes=True)
    return None


@_on_channels
def _reduce(view: NodeView, axis: int) -> Decision:
    if view.has_input(1) and view.constant(1) is None:
        return Block(f"{view.op} over computed axes")
    axes = _reduce_axes(view)
    if view.op == "ReduceMean" and int(view.attr("keepdims", 1)):
        blocked = _normalizes_opaque_features(view, axes)
        if blocked is not None:
            return blocked
    if axes is None:
        if view.attr("noop_with_empty_axes", 0):
            return Flow((0,), axis)
        return Block(f"{view.op} over all axes mixes the channels")
    if axis in axes:
        return Block(f"{view.op} over the channel axis mixes the channels", normalizes=view.op == "ReduceMean")
    keepdims = view.attr("keepdims", 1)
    out_axis = axis if keepdims else axis - sum(1 for a in axes if a < axis)
    return Flow((0,), out_axis)


@_on_channels
def _softmax(view: NodeView, axis: int) -> Decision:
    rank = len(view.shape(0))
    if view.opset < 13:
        normalized_from = int(view.attr("axis", 1)) % rank
        if axis >= normalized_from:
            return Block(f"{view.op} over the channel axis mixes the channels")
    elif int(view.attr("axis", -1)) % rank == axis:
        return Block(f"{view.op} over the channel axis mixes the channels")
    return Flow((0,), axis)


@_on_channels
def _layer_norm(view: NodeView, axis: int) -> Decision:
    rank = len(view.shape(0))
    blocked = _normalizes_opaque_features(view, list(range(int(view.attr("axis", -1)) % rank, rank)))
    if blocked is not None:
        return blocked
    if int(view.attr("axis", -1)) % rank <= axis:
        return Block("LayerNormalization over the channel axis mixes the channels", normalizes=True)
    return Flow((0,), axis)


@_on_channels
def _pad(view: NodeView, axis: int) -> Decision:
    rank = len(view.shape(0))
    pads = view.attr("pads")
    if pads is None:
        value = view.constant(1)
        if value is None:
            return Block("Pad with computed pads")
        pads = value.tolist()
    if view.has_input(3):
        value = view.constant(3)
        if value is None:
            return Block("Pad with computed axes")
        padded_axes = [int(a) % rank for a in value.tolist()]
    else:
        padded_axes = list(range(rank))
    pads = list(pads)
    count = len(padded_axes)
    for position, padded in enumerate(padded_axes):
        if padded == axis and (pads[position] or pads[position + count]):
            return Block("Pad on the channel axis")
    return Flow((0,), axis)


@_on_channels
def _resize(view: NodeView, axis: int) -> Decision:
    if view.attr("axes") is not None:
        return Block(f"{view.op} with the axes attribute is not supported yet")
    in_shape, out_shape = view.shape(0), view.output_shapes[0]
    assert out_shape is not None
    if in_shape[axis] != out_shape[axis]:
        return Block(f"{view.op} scales the channel axis")
    if any(view.is_variable(i) for i in range(1, len(view.node.inputs))):
        return Block(f"{view.op} with computed scales or sizes")
    sizes_index = 3 if view.op == "Resize" and view.opset >= 11 else None
    has_sizes = sizes_index is not None and view.has_input(sizes_index) and view.constant(sizes_index).size > 0  # type: ignore[union-attr]
    return Flow((0,), axis, follower=has_sizes)


def merged_channel_axis(in_shape: Sequence[int], axis: int, out_shape: Sequence[int]) -> tuple[int, int, int] | None:
    """Where a row-major reshape puts channel axis `axis`: (out_axis, outer, inner) when output dim
    `out_axis` holds every channel whole as `outer` repeats of `inner`-long blocks, else None (the
    reshape splits the channel axis, e.g. a channel shuffle)."""
    before = int(np.prod(in_shape[:axis], dtype=np.int64))
    after = int(np.prod(in_shape[axis + 1 :], dtype=np.int64))
    total = before * in_shape[axis] * after
    leading = 1
    for out_axis, dim in enumerate(out_shape):
        trailing = total // (leading * dim) if leading * dim else 0
        if before % leading == 0 and trailing and after % trailing == 0 and leading * dim * trailing == total:
            outer, inner = before // leading, after // trailing
            if outer * in_shape[axis] * inner == dim:
                return out_axis, outer, inner
        leading *= dim
    return None


def reshape_target(view: NodeView) -> list[int | None] | None:
    """The entries of a Reshape's target, one per output axis: an int where it is a constant, None where
    it is computed at run time (from `Shape`/`Gather`/`Unsqueeze`). The target is a constant or a `Concat`
    of 1-D pieces whose lengths are known; anything else is None (not understood)."""
    target = view.constant(1)
    if target is not None:
        return [int(v) for v in target.reshape(-1)]
    pieces = target_pieces(view.node)
    if pieces is None:
        return None
    entries: list[int | None] = []
    for piece in pieces:
        if isinstance(piece, gs.Constant):
            entries += [int(v) for v in np.asarray(piece.values).reshape(-1)]
            continue
        shape = view.tensor_shape(piece)
        if shape is None or len(shape) != 1:
            return None
        entries += [None] * shape[0]
    return entries


def target_pieces(reshape: gs.Node) -> list[gs.Tensor] | None:
    """The inputs of the `Concat` (on axis 0) that builds a Reshape's target at run time, else None."""
    target = reshape.inputs[1]
    if isinstance(target, gs.Constant) or len(target.inputs) != 1:
        return None
    concat = target.inputs[0]
    if concat.op != "Concat" or int(concat.attrs.get("axis", 0)) != 0:
        return None
    return list(concat.inputs)


def heads_split(in_shape: Sequence[int], axis: int, out_shape: Sequence[int]) -> tuple[int, int, int] | None:
    """Where a row-major reshape splits the last axis, the channels, into the last two (heads, width), the
    axes before it kept as a block ([.., H·D] → [.., H, D]): (head axis, heads, width), else None. Only the
    last axis: a split of an NCHW channel axis is a channel shuffle's first half, which blocks."""
    if axis != len(in_shape) - 1 or len(out_shape) < 2:
        return None
    heads, width = int(out_shape[-2]), int(out_shape[-1])
    before = int(np.prod(in_shape[:axis], dtype=np.int64))
    if int(np.prod(out_shape[:-2], dtype=np.int64)) != before or heads * width != in_shape[axis] or min(heads, width) < 2:
        return None
    return len(out_shape) - 2, heads, width


def _split_heads(view: NodeView, axis: int, out_shape: Sequence[int]) -> Decision:
    """A Reshape that splits the channel axis into (heads, width): a partition into heads, when its target
    can be rewritten for fewer heads at every batch and sequence length."""
    split = heads_split(view.shape(0), axis, out_shape)
    if split is None:
        return Block("Reshape splits the channel axis")
    head_axis, heads, width = split
    entries = reshape_target(view)
    if entries is None or len(entries) != len(out_shape):
        return Block("Reshape splits the channel axis into heads with a target computed in a way the rules do not follow")
    head, columns = entries[head_axis], entries[head_axis + 1]
    if head is None:
        return Block("Reshape splits the channel axis into heads whose count is computed at run time")
    if columns not in (width, -1) or (head, columns) == (-1, -1):
        return Block(f"Reshape splits the channel axis into heads with target entries {head}, {columns}")
    if axis < len(entries) and entries[axis] == 0 and int(view.attr("allowzero", 0)) == 0:
        return Block("Reshape copies the channel count into its output")
    if head == -1:
        return SplitHeads(head_axis, heads, width)
    if head != heads:
        return Block(f"Reshape splits the channel axis into heads with target entry {head} for {heads} heads")
    return SplitHeads(head_axis, heads, width, follower=True)


@_on_channels
def _flatten(view: NodeView, axis: int) -> Decision:
    """Flatten/Reshape: channel c becomes a block of features (NCHW) or every C-th feature (NHWC); a Reshape
    that splits the channel axis into (heads, width) partitions it into heads (`_split_heads`)."""
    out_shape = view.output_shapes[0]
    assert out_shape is not None
    merged = merged_channel_axis(view.shape(0), axis, out_shape)
    if merged is None:
        return _split_heads(view, axis, out_shape) if view.op == "Reshape" else Block(f"{view.op} splits the channel axis")
    out_axis, outer, inner = merged
    names_channels = False
    if view.op == "Reshape":
        entries = reshape_target(view)
        if entries is None or len(entries) != len(out_shape):
            return Block("Reshape with a computed shape")
        entry = entries[out_axis]
        if entry is None:
            return Block("Reshape computes the channel count at run time")
        if entry == 0 and int(view.attr("allowzero", 0)) == 0 and (out_axis != axis or outer * inner != 1):
            return Block("Reshape copies an input dim into the channel axis")
        names_channels = entry > 0
    return Flow((0,), out_axis, follower=names_channels, outer=outer, inner=inner)


def _squeeze(view: NodeView) -> Decision:
    axis = view.axis(0)
    axes = _axes_operand(view)
    if axis is None or axes is None:
        return Block("Squeeze with computed axes" if axes is None else "its input carries no channels")
    shape = view.shape(0)
    squeezed = [a % len(shape) for a in axes] if axes else [a for a, d in enumerate(shape) if d == 1]
    if axis in squeezed:
        return Block("Squeeze of the channel axis")
    return Flow((0,), axis - sum(1 for a in squeezed if a < axis))


def _unsqueeze(view: NodeView) -> Decision:
    axis = view.axis(0)
    axes = _axes_operand(view)
    if axis is None or not axes:
        return Block("Unsqueeze with computed axes" if axes is None else "its input carries no channels")
    out_rank = view.out_rank()
    out_axis = axis
    for inserted in sorted(a % out_rank for a in axes):
        if inserted <= out_axis:
            out_axis += 1
    return Flow((0,), out_axis)


@_on_channels
def _transpose(view: NodeView, axis: int) -> Decision:
    rank = len(view.shape(0))
    perm = view.attr("perm")
    perm_list = list(reversed(range(rank))) if perm is None else [int(p) for p in perm]
    return Flow((0,), perm_list.index(axis))


def _concat(view: NodeView) -> Decision:
    """Concat on the channel axis stacks segments; on another axis it joins its operands' channels."""
    rank = view.out_rank()
    concat_axis = int(view.attr("axis", 0)) % rank
    operands = [i for i in range(len(view.node.inputs)) if view.is_variable(i)]
    if len(operands) < sum(1 for i in range(len(view.node.inputs)) if view.has_input(i)):
        return Block("Concat with a constant operand")
    axes = {view.axis(i) for i in operands}
    if len(axes) != 1 or None in axes:
        return Block("its operands carry channels on different axes")
    axis = axes.pop()
    assert axis is not None
    if any(len(view.shape(i)) != rank for i in operands):
        return Block("Concat of operands of different ranks")
    if axis == concat_axis:
        return Concatenate(tuple(operands), axis)
    return Flow(tuple(operands), axis)


def _split_sizes(view: NodeView, dim: int) -> list[int] | None:
    """Split sizes from the attribute (opset < 13), the input (>= 13), `num_outputs` (>= 18) or equal parts."""
    sizes = view.attr("split")
    if sizes is None and view.has_input(1):
        value = view.constant(1)
        if value is None:
            return None
        sizes = value.tolist()
    if sizes:
        return [int(s) for s in sizes]
    parts = int(view.attr("num_outputs", len(view.node.outputs)))
    chunk = -(-dim // parts)
    return [min(chunk, max(dim - chunk * i, 0)) for i in range(parts)]


@_on_channels
def _split(view: NodeView, axis: int) -> Decision:
    shape = view.shape(0)
    split_axis = int(view.attr("axis", 0)) % len(shape)
    channels = shape[axis]
    if split_axis != axis:
        return Partition(tuple((0, channels) for _ in view.node.outputs), axis)
    sizes = _split_sizes(view, channels)
    if sizes is None:
        return Block("Split with computed sizes")
    if sum(sizes) != channels or len(sizes) != len(view.node.outputs):
        return Block(f"Split sizes {sizes} do not cover the {channels} channels")
    starts = np.cumsum([0, *sizes]).tolist()
    return Partition(tuple(zip(starts[:-1], starts[1:], strict=True)), axis, follower=True)


def _slice_arguments(view: NodeView) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """Slice starts, ends, axes (normalized) and steps from attributes (opset < 10) or constant inputs."""
    rank = len(view.shape(0))
    if view.opset < 10:
        starts, ends = view.attr("starts"), view.attr("ends")
        axes = view.attr("axes")
        steps = None
    else:
        values = [view.constant(i) if view.has_input(i) else None for i in range(1, 5)]
        if any(view.is_variable(i) for i in range(1, 5)):
            return None
        starts, ends, axes, steps = (v.tolist() if v is not None else None for v in values)
    starts_list = [int(v) for v in starts]
    axes_list = [int(a) % rank for a in axes] if axes else list(range(len(starts_list)))
    steps_list = [int(v) for v in steps] if steps else [1] * len(starts_list)
    return starts_list, [int(v) for v in ends], axes_list, steps_list


@_on_channels
def _slice(view: NodeView, axis: int) -> Decision:
    arguments = _slice_arguments(view)
    if arguments is None:
        return Block("Slice with computed starts, ends, axes or steps")
    starts, ends, axes, steps = arguments
    channels = view.shape(0)[axis]
    if axis not in axes:
        return Partition(((0, channels),), axis)
    position = axes.index(axis)
    if steps[position] != 1:
        return Block(f"Slice with step {steps[position]} on the channel axis")
    start, end, _ = slice(starts[position], ends[position]).indices(channels)
    if start >= end:
        return Block("Slice leaves no channel")
    return Partition(((start, end),), axis, follower=True)


def _reads_only(consumer: gs.Node, shape_output: gs.Tensor, excluded: int, length: int) -> bool:
    """Whether `consumer` of a Shape output (a 1-D tensor of `length` dims) reads only entries other than
    `excluded`: a Gather of constant indices on axis 0, or a Slice with constant arguments on axis 0."""
    if consumer.op == "Gather" and consumer.inputs[0] is shape_output and int(consumer.attrs.get("axis", 0)) == 0:
        indices = consumer.inputs[1]
        return isinstance(indices, gs.Constant) and excluded not in (np.asarray(indices.values).reshape(-1) % length)
    if consumer.op == "Slice" and consumer.inputs[0] is shape_output and len(consumer.inputs) >= 3:
        # starts, ends, axes, steps by position (absent optional inputs have no name); on a 1-D tensor the
        # only axis is 0
        arguments = [a if a.name else None for a in consumer.inputs[1:5]]
        if not all(a is None or isinstance(a, gs.Constant) for a in arguments):
            return False
        starts, ends, _, steps = (
            [int(v) for v in np.asarray(a.values).reshape(-1)] if isinstance(a, gs.Constant) else None
            for a in [*arguments, None, None][:4]
        )
        if starts is None or ends is None or len(starts) != 1:
            return False
        return excluded not in range(length)[slice(starts[0], ends[0], steps[0] if steps else 1)]
    return False


@_on_channels
def _shape(view: NodeView, axis: int) -> Decision:
    """Shape passes when the channel count is not in its output (`start`/`end`, opset 15) or when every
    consumer reads only the other entries (`b, _, h, w = x.shape` as PyTorch exports it); else it blocks."""
    rank = len(view.shape(0))
    start, end, _ = slice(int(view.attr("start", 0)), int(view.attr("end", rank))).indices(rank)
    if not start <= axis < end:
        return Unread()
    output = view.node.outputs[0]
    if output.outputs and all(_reads_only(consumer, output, axis - start, end - start) for consumer in output.outputs):
        return Unread()
    return Block("Shape reads the channel count")


def _blocker(reason: str) -> Callable[[NodeView], Decision]:
    def decide_block(view: NodeView) -> Decision:
        return Block(reason)

    return decide_block


# ---------------------------------------------------------------------------------------------- table

_UNARY_OPS = (
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Clip", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Mish", "Gelu", "Erf", "ThresholdedRelu", "Exp", "Log", "Sqrt", "Abs", "Neg",
    "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Dropout", "Identity", "Cast",
)
_POOL_OPS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
_JOIN_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Sum", "Max", "Min", "Mean")
_REDUCE_OPS = (
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
)

RULES: Mapping[str, OpRule] = {
    **{op: OpRule(Behaviour.PASS_THROUGH, _unary) for op in _UNARY_OPS},
    **{op: OpRule(Behaviour.PASS_THROUGH, _spatial) for op in _POOL_OPS},
    **{op: OpRule(Behaviour.JOIN, _elementwise, follower=True) for op in _JOIN_OPS},
    **{op: OpRule(Behaviour.PASS_THROUGH, _reduce) for op in _REDUCE_OPS},
    "PRelu": OpRule(Behaviour.PASS_THROUGH, _elementwise, follower=True),
    "BatchNormalization": OpRule(Behaviour.PASS_THROUGH, _per_channel_norm, follower=True),
    "InstanceNormalization": OpRule(Behaviour.PASS_THROUGH, _per_channel_norm, follower=True),
    "LayerNormalization": OpRule(Behaviour.PASS_THROUGH, _layer_norm),
    "Softmax": OpRule(Behaviour.PASS_THROUGH, _softmax),
    "LogSoftmax": OpRule(Behaviour.PASS_THROUGH, _softmax),
    "Hardmax": OpRule(Behaviour.PASS_THROUGH, _softmax),
    "Pad": OpRule(Behaviour.PASS_THROUGH, _pad),
    "Resize": OpRule(Behaviour.PASS_THROUGH, _resize, follower=True),
    "Upsample": OpRule(Behaviour.PASS_THROUGH, _resize),
    "Flatten": OpRule(Behaviour.PASS_THROUGH, _flatten),
    "Reshape": OpRule(Behaviour.PASS_THROUGH, _flatten, follower=True),
    "Squeeze": OpRule(Behaviour.PASS_THROUGH, _squeeze),
    "Unsqueeze": OpRule(Behaviour.PASS_THROUGH, _unsqueeze),
    "Transpose": OpRule(Behaviour.PASS_THROUGH, _transpose),
    "Concat": OpRule(Behaviour.CONCAT, _concat),
    "Split": OpRule(Behaviour.SPLIT, _split, follower=True),
    "Slice": OpRule(Behaviour.SPLIT, _slice, follower=True),
    "Conv": OpRule(Behaviour.SOURCE, _conv, follower=True),  # follower when depthwise
    "ConvTranspose": OpRule(Behaviour.SOURCE, _conv_transpose),
    "Gemm": OpRule(Behaviour.SOURCE, _gemm),
    "MatMul": OpRule(Behaviour.SOURCE, _matmul, follower=True),  # follower when batched (attention)
    "LRN": OpRule(Behaviour.BLOCKER, _blocker("LRN mixes neighbouring channels")),
    "Shape": OpRule(Behaviour.TERMINAL, _shape),
    "Size": OpRule(Behaviour.BLOCKER, _blocker("Size reads the channel count")),
}


def unsupported(node: gs.Node) -> Block | None:
    """A blocker for ops the table does not know (custom domains included), else None."""
    if node.domain not in (None, "", "ai.onnx"):
        return Block(f"unsupported op {node.domain}.{node.op}")
    if node.op not in RULES:
        return Block(f"unsupported op {node.op}")
    return None


def decide(view: NodeView) -> Decision:
    """The decision for one node: its table entry's, or a blocker for ops the table does not know."""
    node = view.node
    blocked = unsupported(node)
    if blocked is not None:
        return blocked
    rule = RULES[node.op]
    decision = rule.decide(view)
    if isinstance(decision, Flow | Partition | SplitHeads) and decision.follower and not rule.follower:
        raise AssertionError(f"rules: {node.op} decided follower=True but its table entry says it cannot be one")
    return decision


def _check_table(rules: Mapping[str, OpRule], known_op: Callable[[str], bool]) -> Sequence[str]:
    """Problems with the table: unknown op names, entries without one behaviour or a decision function."""
    problems = []
    for op, rule in rules.items():
        if not known_op(op):
            problems.append(f"{op!r} is not an ONNX op")
        if not isinstance(rule, OpRule) or not isinstance(rule.behaviour, Behaviour) or not callable(rule.decide):
            problems.append(f"{op!r} needs exactly one Behaviour and a decision function")
    return problems


_PROBLEMS = _check_table(RULES, onnx.defs.has)
if _PROBLEMS:  # pragma: no cover - a broken table must stop the import, not produce wrong graphs
    raise ImportError("onnxslim.analysis.rules: " + "; ".join(_PROBLEMS))
