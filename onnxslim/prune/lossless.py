"""Dead and constant channels: channels that can go with no change to the outputs (docs/ARCHITECTURE.md, "Lossless removal").

For every prunable group, the value of each channel is followed from its sources to its sinks as a
per-channel constant or *unknown* (NaN). A source makes channel c the constant `bias[c]` when its filter
for c is all zero; each op on the way maps constants by its rule in `_CONSTANT_RULES` (an op without a rule
makes everything unknown: being conservative is never a bug). At the sinks:

- *dead*: the channel is exactly 0 at every sink input. Removing it changes nothing.
- *constant*: a known nonzero value k at some sink input. Removing it is exact only when `k · weights` can
  be added to the sink's bias: a Conv without padding (1×1 or larger; padded borders would see 0, not k),
  a Gemm (transA = 0), or a MatMul whose only reader is an `Add` of a constant bias (the usual exported
  Linear; a bare MatMul has no bias to fold into). Other sinks (a padded Conv) leave it.

Activation values are assumed finite, but 0 · unknown is still unknown: a channel gated by an unknown
(squeeze-excite) is not dead. `fold_constant_channels` adds the constants of the channels a plan removes
into their sinks' biases, before the rewrite slices them away.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim.analysis.groups import ChannelGroup, Member, Sink, Source
from onnxslim.graph import GraphIndex, export_model
from onnxslim.prune.importance import output_channel_weights
from onnxslim.prune.plan import PrunePlan

__all__ = [
    "SOURCE_BIAS_INPUT",
    "LosslessChannels",
    "find_lossless_channels",
    "fold_constant_channels",
    "fold_constant_channels_into",
]


@dataclass(frozen=True)
class LosslessChannels:
    """Group id → dead channels, and group id → {channel: constant} for nonzero constants that fold exactly."""

    dead: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    constant: Mapping[str, Mapping[int, float]] = field(default_factory=dict)

    def removable(self) -> dict[str, tuple[int, ...]]:
        """Group id → every channel that can go losslessly (dead or folded)."""
        ids = sorted({*self.dead, *self.constant})
        return {gid: tuple(sorted({*self.dead.get(gid, ()), *self.constant.get(gid, {})})) for gid in ids}


class _Operands:
    """What a rule sees of a node: per group channel, the value of each input (NaN: unknown)."""

    def __init__(self, node: gs.Node, values: Callable[[int], np.ndarray], in_group: list[int]) -> None:
        self.node = node
        self.value = values
        self.in_group = in_group  # indices of the inputs that carry this group's channels

    def attr(self, name: str, default: float) -> float:
        return float(self.node.attrs.get(name, default))

    def passed(self) -> np.ndarray:
        """The value of the one input carrying the group (pass-through, concat, split)."""
        if len(self.in_group) != 1:
            return self.value(-1)
        return self.value(self.in_group[0])

    def optional(self, index: int, default: float) -> np.ndarray:
        if index < len(self.node.inputs) and self.node.inputs[index].name:
            return self.value(index)
        return np.full_like(self.passed(), default)


def _clip(ops: _Operands) -> np.ndarray:
    low = ops.optional(1, ops.attr("min", -np.inf))
    high = ops.optional(2, ops.attr("max", np.inf))
    return np.where(np.isnan(low) | np.isnan(high), np.nan, np.clip(ops.passed(), low, high))


def _average_pool(ops: _Operands) -> np.ndarray:
    x = ops.passed()
    padded = any(ops.node.attrs.get("pads", [0])) or ops.node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")
    exact = not padded or not ops.node.attrs.get("count_include_pad", 0)
    return x if exact else np.where(x == 0, 0.0, np.nan)


def _pad(ops: _Operands) -> np.ndarray:
    x = ops.passed()
    if ops.node.attrs.get("mode", "constant") != "constant":
        return x
    fill = ops.optional(2, ops.attr("value", 0.0))
    return np.where(x == fill, x, np.nan)


def _batch_norm(ops: _Operands) -> np.ndarray:
    gamma, beta, mean, var = (ops.value(i) for i in range(1, 5))
    return gamma * (ops.value(0) - mean) / np.sqrt(var + ops.attr("epsilon", 1e-5)) + beta


def _depthwise(ops: _Operands) -> np.ndarray:
    """A depthwise Conv (a follower): 0 in gives the bias; k in gives k·Σw + b only without padding."""
    x = ops.value(0)
    bias = ops.optional(2, 0.0)
    weights = ops.node.inputs[1]
    if not isinstance(weights, gs.Constant):
        return np.full_like(x, np.nan)
    padded = any(ops.node.attrs.get("pads", [0])) or ops.node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")
    sums = np.asarray(weights.values, np.float64).reshape(np.asarray(weights.values).shape[0], -1).sum(axis=1)
    position = ops.value(-2).astype(int)  # the channels' positions in the conv's channel axis
    scaled = x * sums[position] + bias
    return np.where(x == 0, bias, np.nan if padded else scaled)


def _sum(ops: _Operands) -> np.ndarray:
    return np.sum([ops.value(i) for i in range(len(ops.node.inputs))], axis=0)


def _elementwise(function: Callable[..., np.ndarray]) -> Callable[[_Operands], np.ndarray]:
    def rule(ops: _Operands) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            result = function(*(ops.value(i) for i in range(len(ops.node.inputs))))
        return np.where(np.isfinite(result), result, np.nan)

    return rule


def _passed(ops: _Operands) -> np.ndarray:
    return ops.passed()


def _unary(function: Callable[[np.ndarray], np.ndarray]) -> Callable[[_Operands], np.ndarray]:
    def rule(ops: _Operands) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            return function(ops.passed())

    return rule


# op type → how a per-channel constant goes through it (NaN in: NaN out). Ops not listed: unknown.
_CONSTANT_RULES: Mapping[str, Callable[[_Operands], np.ndarray]] = {
    **{
        op: _passed
        for op in (
            "Identity", "Dropout", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "MaxPool",
            "GlobalMaxPool", "GlobalAveragePool", "ReduceMean", "ReduceMax", "ReduceMin", "Resize", "Upsample",
            "Concat", "Split", "Slice",
        )
    },
    "Relu": _unary(lambda x: np.maximum(x, 0.0)),
    "Sigmoid": _unary(lambda x: 1.0 / (1.0 + np.exp(-x))),
    "Tanh": _unary(np.tanh),
    "HardSwish": _unary(lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)),
    "LeakyRelu": lambda ops: np.where(ops.passed() >= 0, ops.passed(), ops.attr("alpha", 0.01) * ops.passed()),
    "HardSigmoid": lambda ops: np.clip(ops.attr("alpha", 0.2) * ops.passed() + ops.attr("beta", 0.5), 0.0, 1.0),
    "PRelu": lambda ops: np.where(ops.value(0) >= 0, ops.value(0), ops.value(1) * ops.value(0)),
    "Clip": _clip,
    "AveragePool": _average_pool,
    "Pad": _pad,
    "BatchNormalization": _batch_norm,
    "Conv": _depthwise,  # a Conv that is not a source of the group is a depthwise follower
    "Add": _elementwise(np.add),
    "Sub": _elementwise(np.subtract),
    "Mul": _elementwise(np.multiply),
    "Div": _elementwise(np.divide),
    "Max": _elementwise(lambda *xs: np.max(xs, axis=0)),
    "Min": _elementwise(lambda *xs: np.min(xs, axis=0)),
    "Sum": _sum,
}


def _unpadded(node: gs.Node) -> bool:
    return not any(node.attrs.get("pads", [0])) and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")


def _matmul_bias(matmul: gs.Node, outputs: set[str]) -> tuple[gs.Node, int] | None:
    """The `Add(matmul, bias[O])` that is the only reader of a MatMul's output, and the bias's input index."""
    out = matmul.outputs[0]
    if out.name in outputs or len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return None
    add = out.outputs[0]
    index = 1 if add.inputs[0] is out else 0
    bias = add.inputs[index] if len(add.inputs) == 2 else None
    if not isinstance(bias, gs.Constant) or any(d != 1 for d in np.asarray(bias.values).shape[:-1]):
        return None
    return add, index


def _conv_foldable(conv: gs.Node, outputs: set[str]) -> bool:
    return int(conv.attrs.get("group", 1)) == 1 and _unpadded(conv)


def _gemm_foldable(gemm: gs.Node, outputs: set[str]) -> bool:
    beta = float(gemm.attrs.get("beta", 1.0))
    has_bias = len(gemm.inputs) > 2 and bool(gemm.inputs[2].name)
    return not gemm.attrs.get("transA", 0) and (beta != 0 or not has_bias)


def _matmul_foldable(matmul: gs.Node, outputs: set[str]) -> bool:
    """No bias of its own: only into the Add that follows it."""
    return np.asarray(matmul.inputs[1].values).ndim == 2 and _matmul_bias(matmul, outputs) is not None


def _own_bias(node: gs.Node, outputs: set[str]) -> tuple[gs.Node, int]:
    return node, 2


def _matmul_bias_target(matmul: gs.Node, outputs: set[str]) -> tuple[gs.Node, int]:
    found = _matmul_bias(matmul, outputs)
    assert found is not None  # checked by find_lossless_channels
    return found


def _fold_into_conv(conv: gs.Node, sink: Sink, channels: int, position: int, value: float) -> np.ndarray:
    """value · the conv's weights of input channel `position`, summed over the kernel: what its bias gains."""
    weights = np.asarray(conv.inputs[1].values, np.float64)
    return value * weights[:, position].reshape(weights.shape[0], -1).sum(axis=1)


def _fold_into_features(node: gs.Node, sink: Sink, channels: int, position: int, value: float) -> np.ndarray:
    """Gemm/MatMul: value · the weight rows of the input features that hold the channel (a block after Flatten)."""
    weights = np.asarray(node.inputs[1].values, np.float64)
    rows = weights.T if node.attrs.get("transB", 0) else weights  # [in features, out features]
    extent = sink.extent or channels
    features = [(o * extent + position) * sink.inner + j for o in range(sink.outer) for j in range(sink.inner)]
    delta = value * float(node.attrs.get("alpha", 1.0)) * rows[features].sum(axis=0)
    return delta / float(node.attrs.get("beta", 1.0))


@dataclass(frozen=True)
class _BiasFold:
    """How a constant channel at a sink's input folds into a bias: whether it can (`foldable`, given the
    weights are constant), which (node, input index) holds the bias, and what to add to it."""

    foldable: Callable[[gs.Node, set[str]], bool]
    target: Callable[[gs.Node, set[str]], tuple[gs.Node, int]]
    delta: Callable[[gs.Node, Sink, int, int, float], np.ndarray]  # (node, sink, group channels, position, value)


# sink op type → how constant channels fold into its bias. Sinks not listed never fold (their constant
# channels are not lossless), which is always safe.
_BIAS_FOLDS: Mapping[str, _BiasFold] = {
    "Conv": _BiasFold(_conv_foldable, _own_bias, _fold_into_conv),
    "Gemm": _BiasFold(_gemm_foldable, _own_bias, _fold_into_features),
    "MatMul": _BiasFold(_matmul_foldable, _matmul_bias_target, _fold_into_features),
}

# source op type → the input holding its per-output-channel bias (None: it has none). Every source op must
# be listed (checked in prune/optables.py): a zero filter is the constant bias[c], or 0 without one.
SOURCE_BIAS_INPUT: Mapping[str, int | None] = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2, "MatMul": None}

# ops whose per-channel constants hold the channels on axis 0 (BN statistics, depthwise Conv biases),
# rather than broadcasting numpy-style from the right
_CHANNELS_FIRST_CONSTANTS = frozenset({"BatchNormalization", "Conv"})


def _foldable(sink: Sink, node: gs.Node, outputs: set[str]) -> bool:
    """Whether a constant channel at this sink's input can be folded into its bias exactly."""
    fold = _BIAS_FOLDS.get(sink.op_type)
    return fold is not None and isinstance(node.inputs[1], gs.Constant) and fold.foldable(node, outputs)


def _source_constants(source: Source, node: gs.Node, graph: GraphIndex, channels: int) -> np.ndarray:
    """Channel c of the source is the constant bias[c] when its weights for c are all zero; else unknown."""
    weights = output_channel_weights(source, graph)[source.offset : source.offset + channels]
    zero = ~np.any(weights != 0, axis=1)
    extent = source.extent or channels
    bias = np.zeros(extent)
    at = SOURCE_BIAS_INPUT[source.op_type]
    if at is not None and len(node.inputs) > at and node.inputs[at].name:
        if not isinstance(node.inputs[at], gs.Constant):
            return np.full(channels, np.nan)
        values = np.asarray(node.inputs[at].values, np.float64)
        if values.ndim > 1 and values.shape[0] != 1:
            return np.full(channels, np.nan)  # a Gemm bias that varies over rows
        bias = np.broadcast_to(values.reshape(-1), (extent,)) * float(node.attrs.get("beta", 1.0))
    return np.where(zero, bias[source.offset : source.offset + channels], np.nan)


class _GroupValues:
    """Per member tensor of one group: the value of each of the group's channels (NaN: unknown)."""

    def __init__(self, graph: GraphIndex, group: ChannelGroup) -> None:
        self.graph = graph
        self.group = group
        self.members: dict[str, list[Member]] = {}
        for member in group.members:
            self.members.setdefault(member.tensor, []).append(member)
        self.values: dict[str, np.ndarray] = {}
        self.followers = {f.node: f for f in group.followers}
        self.sources = {s.node: s for s in group.sources}

    def run(self) -> None:
        """Visit the nodes writing the group's members, in topological order: the only ones with a value to set."""
        for node in self.graph.producers_in_order(self.members):
            self.visit(node)

    def unknown(self) -> np.ndarray:
        return np.full(self.group.channels, np.nan)

    def constant(self, node: gs.Node, tensor: gs.Constant) -> np.ndarray:
        """A constant operand per group channel: a scalar, or aligned with the channel axis for a follower."""
        values = np.asarray(tensor.values, np.float64)
        if values.size == 1:
            return np.full(self.group.channels, float(values.reshape(-1)[0]))
        follower = self.followers.get(node.name)
        if follower is None:
            return self.unknown()
        # BN statistics and depthwise biases hold the channels on axis 0; elementwise operands (per-channel
        # Mul/Add, PRelu slopes) broadcast numpy-style, aligned from the right with the follower's rank
        axis = 0 if node.op in _CHANNELS_FIRST_CONSTANTS else follower.axis - (follower.rank - values.ndim)
        if axis < 0 or values.shape[axis] == 1:
            flat = values.reshape(1, -1)
        else:
            flat = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
        per_channel = np.where(np.all(flat == flat[:, :1], axis=1), flat[:, 0], np.nan)
        if per_channel.shape[0] == 1:
            return np.full(self.group.channels, per_channel[0])
        return per_channel[follower.offset + np.arange(self.group.channels)]

    def visit(self, node: gs.Node) -> None:
        outputs = [t for t in node.outputs if t.name in self.members]
        if not outputs:
            return
        sources = self.sources
        for tensor in outputs:
            if len(self.members[tensor.name]) != 1:
                self.values[tensor.name] = self.unknown()
                continue
            out = self.members[tensor.name][0]
            if node.name in sources:
                self.values[tensor.name] = _source_constants(sources[node.name], node, self.graph, self.group.channels)
                continue
            rule = _CONSTANT_RULES.get(node.op)
            if rule is None:
                self.values[tensor.name] = self.unknown()
                continue
            in_group = [i for i, t in enumerate(node.inputs) if t.name in self.members]
            follower = self.followers.get(node.name)

            def operand(index: int, node: gs.Node = node, out: Member = out, follower: object = follower) -> np.ndarray:
                if index == -1:
                    return self.unknown()
                if index == -2:  # positions of the group's channels in the node's channel axis (followers)
                    offset = follower.offset if follower is not None else out.offset  # type: ignore[attr-defined]
                    return (offset + np.arange(self.group.channels)).astype(np.float64)
                tensor = node.inputs[index]
                if isinstance(tensor, gs.Constant):
                    return self.constant(node, tensor)
                if tensor.name in self.values:
                    return self.values[tensor.name]
                return self.unknown()

            with np.errstate(all="ignore"):
                result = np.asarray(rule(_Operands(node, operand, in_group)), np.float64)
            self.values[tensor.name] = np.where(np.isfinite(result), result, np.nan)

    def at_sink(self, sink: Sink, node: gs.Node) -> np.ndarray:
        return self.values.get(node.inputs[sink.input_index].name, self.unknown())


def find_lossless_channels(graph: gs.Graph | GraphIndex, groups: Sequence[ChannelGroup]) -> LosslessChannels:
    """The dead channels of every prunable group, and its nonzero constant channels that fold exactly.

    Linear in the size of the groups: each group visits only the nodes that write its members."""
    index = graph if isinstance(graph, GraphIndex) else GraphIndex(graph)
    nodes, outputs = index.nodes, set(index.outputs)
    dead: dict[str, tuple[int, ...]] = {}
    constant: dict[str, dict[int, float]] = {}
    for group in groups:
        if not group.prunable or group.blocks > 1:  # grouped convs: removals must be balanced, not just dead
            continue
        if group.width > 1:  # attention heads: a head is D values, not one; not searched for dead channels
            continue
        values = _GroupValues(index, group)
        values.run()
        at_sinks = [values.at_sink(sink, nodes[sink.node]) for sink in group.sinks]
        if not at_sinks:
            continue
        known = np.all([np.isfinite(v) for v in at_sinks], axis=0)
        zero = known & np.all([v == 0 for v in at_sinks], axis=0)
        foldable = all(_foldable(sink, nodes[sink.node], outputs) for sink in group.sinks)
        if zero.any():
            dead[group.id] = tuple(int(c) for c in np.flatnonzero(zero))
        if foldable and (known & ~zero).any():
            # a constant channel folds with its value at the first sink; every sink reads the same tensor
            # value only if the values agree, so keep just the channels whose sinks agree
            same = np.all([v == at_sinks[0] for v in at_sinks], axis=0)
            chosen = np.flatnonzero(known & ~zero & same)
            if len(chosen):
                constant[group.id] = {int(c): float(at_sinks[0][c]) for c in chosen}
    return LosslessChannels(dead, constant)


def fold_constant_channels(
    model: onnx.ModelProto, groups: Sequence[ChannelGroup], plan: PrunePlan, channels: LosslessChannels
) -> onnx.ModelProto:
    """`model` with the constant of every constant channel the plan removes added to its sinks' biases."""
    graph = gs.import_onnx(model)
    if not fold_constant_channels_into(GraphIndex(graph), groups, plan, channels):
        return model
    return export_model(graph, model)


def fold_constant_channels_into(
    graph: GraphIndex, groups: Sequence[ChannelGroup], plan: PrunePlan, channels: LosslessChannels
) -> int:
    """Add the constant of every constant channel the plan removes to its sinks' biases, editing the indexed
    graph in place; the number of biases changed."""
    nodes, outputs = graph.nodes, set(graph.outputs)
    deltas: dict[tuple[str, int], np.ndarray] = {}  # (node, input index of the bias) → what to add to it
    for group in groups:
        constants = channels.constant.get(group.id, {})
        removed = [c for c in plan.removed(group) if c in constants]
        for sink in group.sinks if removed else ():
            node, fold = nodes[sink.node], _BIAS_FOLDS[sink.op_type]  # every sink folds: find_lossless_channels
            holder, index = fold.target(node, outputs)
            target = (holder.name, index)
            for c in removed:
                delta = fold.delta(node, sink, group.channels, sink.offset + c, constants[c])
                deltas[target] = deltas.get(target, 0.0) + delta
    for (name, index), delta in sorted(deltas.items()):
        node = nodes[name]
        reference = node.inputs[index] if index < len(node.inputs) and node.inputs[index].name else node.inputs[1]
        dtype = np.asarray(reference.values).dtype
        if index < len(node.inputs) and node.inputs[index].name:
            current = np.asarray(node.inputs[index].values, np.float64)
            shape = (*current.shape[:-1], delta.shape[0]) if current.ndim else (delta.shape[0],)
            values = np.broadcast_to(current, shape) + delta
        else:
            values = delta
        folded = gs.Constant(f"{name}_folded_bias", np.ascontiguousarray(values).astype(dtype))
        while len(node.inputs) <= index:
            node.inputs.append(gs.Variable.empty())
        node.inputs[index] = folded
    return len(deltas)
