"""Channel groups: the sets of tensor dimensions that must lose the same channels together.

`build_channel_groups` walks the graph once in topological order. Every variable tensor gets a *channel
state*: the axis that carries its channels and the *channel space* (a union-find node) those channels
belong to. Sources create spaces, pass-through ops copy their input's, joins unite several, blockers
mark them unprunable (and give their outputs spaces that are blocked from the start). Each space also
collects the group's members, sources, sinks and followers; a group is one union-find class with at
least one source. Per-op knowledge lives in `rules.py`; this module only applies the decisions.

A tensor's channel dim is a sequence of segments (offset, length), each in one space: Concat on the
channel axis concatenates its operands' segment lists (SPPF, Inception, DenseNet, FPN necks); Split and
Slice give each output the segments of its range. When a split boundary (or a join of differently
segmented operands) falls inside a space, the sources of that space are *cut* there: the next walk
creates their outputs as independent segments, each its own group (YOLO C2f: `Conv(2c) → Split(c, c)`
makes two groups of c channels). Joins unite segment by segment.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

import onnx
import onnx_graphsurgeon as gs

from onnxslim.analysis.rules import (
    Block,
    Concatenate,
    Create,
    Decision,
    Flow,
    NodeView,
    Partition,
    Unread,
    decide,
    unsupported,
)
from onnxslim.io import TensorInfo, infer_tensor_infos

__all__ = [
    "Member",
    "Source",
    "Sink",
    "Follower",
    "Blocker",
    "BlockerKind",
    "ChannelGroup",
    "build_channel_groups",
    "find_channel_groups",
]

logger = logging.getLogger(__name__)

_MAX_PASSES = 16  # walks with ever finer cuts; the last one is conservative whatever the count


@dataclass(frozen=True)
class Member:
    """Channels [offset, offset + length) of `tensor` on `axis` belong to the group."""

    tensor: str
    axis: int
    offset: int
    length: int


@dataclass(frozen=True)
class Source:
    """A node that creates the group's channels: channels [offset, offset + group size) of its `extent`
    output channels on `axis` (its weights are scored and sliced). `extent` None: the group is all of them."""

    node: str
    op_type: str
    axis: int
    offset: int = 0
    extent: int | None = None
    blocks: int = 1  # a grouped Conv: its channels fall into this many equal blocks (ChannelGroup.blocks)


@dataclass(frozen=True)
class Sink:
    """A node that consumes and mixes the group's channels, read as [offset, offset + group size) of the
    `extent` channels of input `input_index` on `axis`."""

    node: str
    op_type: str
    input_index: int
    axis: int
    offset: int = 0
    extent: int | None = None
    outer: int = 1  # Flatten/Reshape → Gemm: the input holds the channels `outer` times …
    inner: int = 1  # … each as `inner` consecutive features: feature (o·extent + c)·inner + j
    blocks: int = 1  # a grouped Conv: its input channels fall into this many equal blocks


@dataclass(frozen=True)
class Follower:
    """A node whose per-channel constants or attributes follow the group on `axis` (of `rank` dims), as
    channels [offset, offset + group size) of `extent`: BatchNorm, per-channel Mul/Add, Split sizes, …"""

    node: str
    op_type: str
    axis: int
    rank: int
    offset: int = 0
    extent: int | None = None


class BlockerKind(Enum):
    """What kind of thing blocks a group; code decides on the kind, people read the reason."""

    GRAPH_INPUT = "graph-input"  # the channels come from a graph input
    GRAPH_OUTPUT = "graph-output"  # the channels reach a graph output (the model's contract)
    OP = "op"  # an op the rules do not model, or model as mixing the channels
    PARAMETER = "parameter"  # the channels are read as a parameter (a shape, an index, a weight)
    BROADCAST = "broadcast"  # broadcast along the channel axis by a join
    SUBGRAPH = "subgraph"  # read inside an If/Loop body
    UNCONSUMED = "unconsumed"  # no layer consumes the channels
    GROUPED = "grouped"  # grouped convs that cannot lose channels evenly


@dataclass(frozen=True)
class Blocker:
    """Why a group cannot be pruned: the first blocking node in topological order (None: a graph input)."""

    node: str | None
    reason: str
    kind: BlockerKind = BlockerKind.OP


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together from every member, with who creates and who consumes them."""

    id: str
    channels: int
    members: tuple[Member, ...]
    sources: tuple[Source, ...]
    sinks: tuple[Sink, ...]
    followers: tuple[Follower, ...]
    blocked_by: Blocker | None

    @property
    def prunable(self) -> bool:
        return self.blocked_by is None

    @property
    def blocks(self) -> int:
        """Equal consecutive blocks the channels fall into, each of which must lose as many channels: the
        groups of every grouped Conv that creates or reads them (1 when there is none)."""
        return math.lcm(1, *(s.blocks for s in self.sources), *(s.blocks for s in self.sinks))


@dataclass(frozen=True)
class _Segment:
    """Channels [offset, offset + length) of a tensor belong to channel space `space`."""

    offset: int
    length: int
    space: int


@dataclass(frozen=True)
class _ChannelState:
    """Where a tensor's channels are: its axis and the segments (each in one space) along it."""

    axis: int
    segments: tuple[_Segment, ...]
    outer: int = 1  # after Flatten/Reshape: the channels repeat `outer` times along the axis …
    inner: int = 1  # … each as `inner` consecutive entries

    @property
    def flattened(self) -> bool:
        return self.outer * self.inner != 1

    @property
    def extent(self) -> int:
        return sum(segment.length for segment in self.segments)

    def boundaries(self) -> tuple[int, ...]:
        return tuple(segment.offset for segment in self.segments[1:])


@dataclass
class _Space:
    """One union-find class of channels while the graph is walked."""

    size: int
    members: list[tuple[int, Member]] = field(default_factory=list)
    sources: list[tuple[int, Source]] = field(default_factory=list)
    sinks: list[tuple[int, Sink]] = field(default_factory=list)
    followers: list[tuple[int, Follower]] = field(default_factory=list)
    blocker: tuple[int, Blocker] | None = None


class _Spaces:
    """Union-find over channel spaces; the root holds everything collected for its class."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.data: list[_Space] = []

    def new(self, size: int, blocker: tuple[int, Blocker] | None = None) -> int:
        self.parent.append(len(self.parent))
        self.data.append(_Space(size, blocker=blocker))
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def get(self, space: int) -> _Space:
        return self.data[self.find(space)]

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if a > b:
            a, b = b, a
        keep, gone = self.data[a], self.data[b]
        if keep.size != gone.size:
            raise AssertionError(f"joined channel spaces of sizes {keep.size} and {gone.size}")
        self.parent[b] = a
        keep.members += gone.members
        keep.sources += gone.sources
        keep.sinks += gone.sinks
        keep.followers += gone.followers
        if gone.blocker is not None and (keep.blocker is None or gone.blocker[0] < keep.blocker[0]):
            keep.blocker = gone.blocker
        return a

    def block(self, space: int, order: int, blocker: Blocker) -> None:
        data = self.get(space)
        if data.blocker is None or order < data.blocker[0]:
            data.blocker = (order, blocker)


def _outer_references(node: gs.Node) -> list[str]:
    """Names of outer-scope tensors that the subgraphs of `node` (If, Loop, Scan) read, recursively."""
    names: list[str] = []
    for value in node.attrs.values():
        subgraphs = value if isinstance(value, list) else [value]
        for graph in subgraphs:
            if not isinstance(graph, gs.Graph):
                continue
            local = {t.name for t in graph.inputs} | {t.name for n in graph.nodes for t in n.outputs}
            for inner in graph.nodes:
                names += [t.name for t in inner.inputs if t.name and t.name not in local and not isinstance(t, gs.Constant)]
                names += [name for name in _outer_references(inner) if name not in local]
            names += [t.name for t in graph.outputs if t.name not in local and not isinstance(t, gs.Constant)]
    return names


def _static_shape(tensor: gs.Tensor, shapes: Mapping[str, Sequence[int]] | None) -> tuple[int, ...] | None:
    if shapes is not None and tensor.name in shapes:
        return tuple(int(d) for d in shapes[tensor.name])
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.shape)
    shape = tensor.shape
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return tuple(shape)


class _Walker:
    """One pass over the graph in topological order, applying each node's decision.

    `cuts` names, per source node, the output-channel positions where its channels are split into
    independent segments (each its own space). A Split/Slice boundary or a join of differently segmented
    operands that falls inside a space asks for new cuts (`new_cuts`) and blocks for this pass; the
    caller walks again with them until no new cut is needed.
    """

    def __init__(
        self, graph: gs.Graph, shapes: Mapping[str, Sequence[int]] | None, cuts: Mapping[str, frozenset[int]]
    ) -> None:
        self.graph = graph
        self.shapes = shapes
        self.cuts = cuts
        self.new_cuts: dict[str, set[int]] = {}
        self.spaces = _Spaces()
        self.states: dict[str, _ChannelState] = {}
        self.opset = int(graph.opset or onnx.defs.onnx_opset_version())

    def shape(self, tensor: gs.Tensor) -> tuple[int, ...] | None:
        return _static_shape(tensor, self.shapes)

    def set_state(
        self, tensor: gs.Tensor, order: int, axis: int, segments: Sequence[_Segment], outer: int = 1, inner: int = 1
    ) -> None:
        self.states[tensor.name] = _ChannelState(axis, tuple(segments), outer, inner)
        for segment in segments:
            member = Member(tensor.name, axis, segment.offset, segment.length)
            self.spaces.get(segment.space).members.append((order, member))

    def opaque(self, tensor: gs.Tensor, order: int, blocker: Blocker) -> None:
        """Give `tensor` a space that is blocked from the start (graph inputs, outputs of blockers).

        Its channel axis is not known: it is assumed to be 1 (0 for vectors), and rules are told the input is
        opaque (NodeView.opaque_inputs) so that they do not rely on the assumption where it matters."""
        shape = self.shape(tensor)
        if not tensor.name or shape is None or len(shape) == 0:
            return
        axis = 1 if len(shape) >= 2 else 0
        space = self.spaces.new(shape[axis], (order, blocker))
        self.set_state(tensor, order, axis, [_Segment(0, shape[axis], space)])

    def block_input(self, tensor: gs.Tensor, order: int, blocker: Blocker) -> None:
        state = self.states.get(tensor.name)
        if state is not None:
            for segment in state.segments:
                self.spaces.block(segment.space, order, blocker)

    def request_cut(self, segment: _Segment, position: int) -> None:
        """Ask for `segment`'s space to be cut at `position` (relative to the segment) in the next pass."""
        data = self.spaces.get(segment.space)
        if data.blocker is not None:
            return  # blocked anyway: nothing to gain from cutting it
        for _, source in data.sources:
            self.new_cuts.setdefault(source.node, set()).add(source.offset + position)

    def block_subgraph_reads(self, order: int, node: gs.Node) -> None:
        """Channels read inside a subgraph (If/Loop bodies) are not followed there: they block."""
        for name in _outer_references(node):
            state = self.states.get(name)
            blocker = Blocker(node.name, f"its channels are read inside a subgraph of {node.op}", BlockerKind.SUBGRAPH)
            for segment in state.segments if state is not None else ():
                self.spaces.block(segment.space, order, blocker)

    def run(self) -> None:
        for tensor in self.graph.inputs:
            self.opaque(tensor, -1, Blocker(None, f"its channels come from graph input {tensor.name!r}", BlockerKind.GRAPH_INPUT))
        for order, node in enumerate(self.graph.nodes):
            self.visit(order, node)
        producers = {out.name: (order, node) for order, node in enumerate(self.graph.nodes) for out in node.outputs}
        for tensor in self.graph.outputs:
            order, node = producers.get(tensor.name, (-1, None))
            self.block_input(
                tensor, order, Blocker(
                    node.name if node else None, f"its channels reach graph output {tensor.name!r}", BlockerKind.GRAPH_OUTPUT
                ),
            )

    def view(self, node: gs.Node) -> NodeView:
        input_axes = tuple(
            (state.axis if (state := self.states.get(t.name)) is not None and not isinstance(t, gs.Constant) else None)
            for t in node.inputs
        )
        return NodeView(
            node=node,
            opset=self.opset,
            input_shapes=tuple(self.shape(t) for t in node.inputs),
            output_shapes=tuple(self.shape(t) for t in node.outputs),
            input_axes=input_axes,
            opaque_inputs={
                index: self.opaque_origin(state)
                for index, t in enumerate(node.inputs)
                if (state := self.states.get(t.name)) is not None
                and not isinstance(t, gs.Constant)
                and not any(self.spaces.get(segment.space).sources for segment in state.segments)
            },
        )

    def opaque_origin(self, state: _ChannelState) -> str:
        """What stopped the channels of an opaque tensor from being followed, for messages."""
        blocked = [data.blocker[1] for s in state.segments if (data := self.spaces.get(s.space)).blocker is not None]
        if not blocked:
            return "they come from an op that blocks"
        return f"{blocked[0].node}: {blocked[0].reason}" if blocked[0].node else blocked[0].reason

    def decide(self, node: gs.Node, view: NodeView) -> Decision:
        blocked = unsupported(node)
        if blocked is not None:
            return blocked
        variables = [t for t in node.inputs if t.name and not isinstance(t, gs.Constant)]
        for tensor in [*variables, *(t for t in node.outputs if t.name)]:
            if self.shape(tensor) is None:
                return Block(f"the shape of {tensor.name!r} is unknown")
        for tensor in variables:
            if tensor.name not in self.states and len(self.shape(tensor) or ()) > 0:
                return Block(f"{tensor.name!r} comes from outside the main graph")
        decision = decide(view)
        if isinstance(decision, Partition):
            return decision
        graph_outputs = {t.name for t in self.graph.outputs}
        if isinstance(decision, Unread) and any(t.name in graph_outputs for t in node.outputs):
            return Block(f"{node.op} reads the channel count into a graph output", to_output=True)
        for index, tensor in enumerate(node.outputs[1:], start=1):
            if tensor.name and (tensor.outputs or tensor.name in graph_outputs):
                return Block(f"output {index} of {node.op} is used")
        return decision

    def visit(self, order: int, node: gs.Node) -> None:
        self.block_subgraph_reads(order, node)
        view = self.view(node)
        decision = self.decide(node, view)
        decision = self.check_flattened(node, decision)
        if isinstance(decision, Flow):
            decision = self.check_join(node, decision)
        elif isinstance(decision, Partition):
            decision = self.check_partition(node, decision)
        if isinstance(decision, Block):
            kind = BlockerKind.GRAPH_OUTPUT if decision.to_output else BlockerKind.OP
            blocker = Blocker(node.name, decision.reason, kind)
            logger.debug("blocker %s (%s): %s", node.name, node.op, decision.reason)
            for tensor in node.inputs:
                self.block_input(tensor, order, blocker)
            for tensor in node.outputs:
                self.opaque(tensor, order, blocker)
            return
        if isinstance(decision, Create):
            handled = {decision.sink_input}
            self.create(order, node, decision)
        elif isinstance(decision, Flow):
            handled = {*decision.operands, *decision.broadcast}
            self.flow(order, node, view, decision)
        elif isinstance(decision, Concatenate):
            handled = set(decision.operands)
            segments, offset = [], 0
            for index in decision.operands:
                for segment in self.states[node.inputs[index].name].segments:
                    segments.append(_Segment(offset, segment.length, segment.space))
                    offset += segment.length
            self.set_state(node.outputs[0], order, decision.out_axis, segments)
        elif isinstance(decision, Unread):
            handled = {0}  # read, but not its channels; the outputs carry none
        else:
            handled = {0}
            self.partition(order, node, view, decision)
        for index, tensor in enumerate(node.inputs):
            if index not in handled and not isinstance(tensor, gs.Constant):
                self.block_input(tensor, order, Blocker(node.name, f"read as a parameter by {node.op}", BlockerKind.PARAMETER))

    def check_flattened(self, node: gs.Node, decision: Decision) -> Decision:
        """Channels flattened into features may only reach a sink, through elementwise ops of one input."""
        if isinstance(decision, Create):
            read = [decision.sink_input]
        elif isinstance(decision, Flow) and decision.elementwise and len(decision.operands) == 1:
            read = []
        elif isinstance(decision, Block):
            return decision
        else:
            read = list(range(len(node.inputs)))
        for index in read:
            state = self.states.get(node.inputs[index].name)
            if state is not None and state.flattened and not isinstance(decision, Create):
                return Block(f"{node.op} reads channels flattened into features")
        return decision

    def check_join(self, node: gs.Node, decision: Flow) -> Flow | Block:
        """Joined operands must be segmented alike; otherwise ask for cuts so that they are next pass."""
        states = [self.states[node.inputs[i].name] for i in decision.operands]
        extents = {state.extent for state in states}
        if len(extents) > 1:  # cannot happen for a valid model; never join spaces of different sizes
            return Block(f"its operands carry different channel counts {sorted(extents)}")
        boundaries = {state.boundaries() for state in states}
        if len(boundaries) == 1:
            return decision
        wanted = sorted(set().union(*boundaries))
        for state in states:
            self.cut_at(state, wanted)
        return Block("its operands are concatenations of differently sized parts")

    def cut_at(self, state: _ChannelState, positions: Sequence[int]) -> None:
        for segment in state.segments:
            for position in positions:
                if segment.offset < position < segment.offset + segment.length:
                    self.request_cut(segment, position - segment.offset)

    def check_partition(self, node: gs.Node, decision: Partition) -> Partition | Block:
        """A split boundary inside a segment needs that segment's space cut there (next pass)."""
        state = self.states[node.inputs[0].name]
        positions = sorted({p for start, end in decision.ranges for p in (start, end)})
        inside = [
            p for p in positions for s in state.segments if s.offset < p < s.offset + s.length
        ]
        if not inside:
            return decision
        self.cut_at(state, inside)
        return Block(f"{node.op} cuts a group of channels (modelled as separate groups where the source allows)")

    def create(self, order: int, node: gs.Node, decision: Create) -> None:
        spaces = self.spaces
        state = self.states.get(node.inputs[decision.sink_input].name)
        if state is not None:
            if state.axis != decision.sink_axis:
                reason = f"{node.op} mixes axis {decision.sink_axis}, but the channels are on axis {state.axis}"
                self.block_input(node.inputs[decision.sink_input], order, Blocker(node.name, reason))
            elif decision.blocks > 1 and (len(state.segments) > 1 or state.flattened):
                what = (
                    "channels flattened into features" if state.flattened
                    else "channels of several groups (a Concat, or a Split or Slice elsewhere cuts them)"
                )
                reason = f"grouped Conv (group={decision.blocks}) reads {what}"
                self.block_input(node.inputs[decision.sink_input], order, Blocker(node.name, reason, BlockerKind.GROUPED))
            else:
                for segment in state.segments:
                    sink = Sink(
                        node.name,
                        node.op,
                        decision.sink_input,
                        decision.sink_axis,
                        segment.offset,
                        state.extent,
                        state.outer,
                        state.inner,
                        decision.blocks,
                    )
                    spaces.get(segment.space).sinks.append((order, sink))
        bounds = [0, *sorted(c for c in self.cuts.get(node.name, ()) if 0 < c < decision.channels), decision.channels]
        segments = []
        split = len(bounds) > 2 and decision.blocks > 1
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            blocker = Blocker(
                node.name,
                f"the output of a grouped Conv (group={decision.blocks}) is cut into parts (by a Split or Slice, or a "
                "join with a concatenation)",
                BlockerKind.GROUPED,
            )
            space = spaces.new(end - start, (order, blocker) if split else None)
            source = Source(node.name, node.op, decision.out_axis, start, decision.channels, decision.blocks)
            spaces.get(space).sources.append((order, source))
            segments.append(_Segment(start, end - start, space))
        self.set_state(node.outputs[0], order, decision.out_axis, segments)

    def flow(self, order: int, node: gs.Node, view: NodeView, decision: Flow) -> None:
        spaces = self.spaces
        states = [self.states[node.inputs[i].name] for i in decision.operands]
        segments = []
        for parts in zip(*(state.segments for state in states), strict=True):
            space = parts[0].space
            for other in parts[1:]:
                space = spaces.union(space, other.space)
            segments.append(_Segment(parts[0].offset, parts[0].length, space))
        for index in decision.broadcast:
            self.block_input(node.inputs[index], order, Blocker(node.name, f"broadcast along the channel axis by {node.op}", BlockerKind.BROADCAST))
        if decision.follower:
            for segment in segments:
                follower = Follower(node.name, node.op, decision.out_axis, view.out_rank(), segment.offset, states[0].extent)
                spaces.get(segment.space).followers.append((order, follower))
        if decision.elementwise:
            outer, inner = states[0].outer, states[0].inner
        else:
            outer, inner = decision.outer, decision.inner
        self.set_state(node.outputs[0], order, decision.out_axis, segments, outer, inner)

    def partition(self, order: int, node: gs.Node, view: NodeView, decision: Partition) -> None:
        state = self.states[node.inputs[0].name]
        if decision.follower:
            for segment in state.segments:
                follower = Follower(node.name, node.op, decision.out_axis, view.out_rank(), segment.offset, state.extent)
                self.spaces.get(segment.space).followers.append((order, follower))
        for tensor, (start, end) in zip(node.outputs, decision.ranges, strict=True):
            if not tensor.name:
                continue
            segments = [
                _Segment(segment.offset - start, segment.length, segment.space)
                for segment in state.segments
                if start <= segment.offset and segment.offset + segment.length <= end
            ]
            self.set_state(tensor, order, decision.out_axis, segments)

    def groups(self) -> tuple[ChannelGroup, ...]:
        roots = sorted({self.spaces.find(s) for s in range(len(self.spaces.parent))})
        found = []
        for root in roots:
            data = self.spaces.data[root]
            if not data.sources:
                continue
            sources = [s for _, s in sorted(data.sources, key=lambda item: item[0])]
            sinks = tuple(s for _, s in sorted(data.sinks, key=lambda item: item[0]))
            blocker = data.blocker[1] if data.blocker is not None else None
            if blocker is None and not sinks:
                blocker = Blocker(sources[0].node, "its channels reach no layer that consumes them", BlockerKind.UNCONSUMED)
            group = ChannelGroup(
                id=sources[0].node,
                channels=data.size,
                members=tuple(m for _, m in sorted(data.members, key=lambda item: item[0])),
                sources=tuple(sources),
                sinks=sinks,
                followers=tuple(f for _, f in sorted(data.followers, key=lambda item: item[0])),
                blocked_by=blocker,
            )
            if group.prunable and group.channels // group.blocks <= 1:
                grouped = next(
                    (s.node for s in sources if s.blocks > 1), next((s.node for s in sinks if s.blocks > 1), group.id)
                )
                reason = f"its grouped convs leave one channel in each of its {group.blocks} blocks"
                group = replace(group, blocked_by=Blocker(grouped, reason, BlockerKind.GROUPED))
            found.append((min(order for order, _ in data.sources), group))
        found.sort(key=lambda item: item[0])
        return _unique_ids([group for _, group in found])


def _unique_ids(groups: list[ChannelGroup]) -> tuple[ChannelGroup, ...]:
    seen: set[str] = set()
    unique = []
    for group in groups:
        name, suffix = group.id, 1
        while name in seen:
            name, suffix = f"{group.id}#{suffix}", suffix + 1
        seen.add(name)
        unique.append(group if name == group.id else ChannelGroup(**{**group.__dict__, "id": name}))
    return tuple(unique)


def build_channel_groups(
    graph: gs.Graph, shapes: Mapping[str, Sequence[int]] | None = None
) -> tuple[ChannelGroup, ...]:
    """The channel groups of `graph` (normalized: constants as initializers, nodes uniquely named).

    `shapes` gives the static shape of tensors by name (e.g. from `infer_tensor_infos`); tensors not in it
    use the graph's own static shapes. Groups come in the order of their first source.
    """
    cuts: dict[str, frozenset[int]] = {}
    for _ in range(_MAX_PASSES):
        walker = _Walker(graph, shapes, cuts)
        walker.run()
        if not walker.new_cuts:
            break
        for node, positions in walker.new_cuts.items():
            cuts[node] = cuts.get(node, frozenset()) | positions
    return walker.groups()


def find_channel_groups(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]],
    infos: Mapping[str, TensorInfo] | None = None,
) -> tuple[ChannelGroup, ...]:
    """The channel groups of a normalized model at the given input shapes (shapes inferred if not given)."""
    if infos is None:
        infos = infer_tensor_infos(model, input_shapes)
    shapes = {name: info.shape for name, info in infos.items()}
    return build_channel_groups(gs.import_onnx(model), shapes)
