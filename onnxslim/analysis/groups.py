"""Channel groups: the sets of tensor dimensions that must lose the same channels together.

`build_channel_groups` walks the graph once in topological order. Every variable tensor gets a *channel
state*: the axis that carries its channels and the *channel space* (a union-find node) those channels
belong to. Sources create spaces, pass-through ops copy their input's, joins unite several, blockers
mark them unprunable (and give their outputs spaces that are blocked from the start). Each space also
collects the group's members, sources, sinks and followers; a group is one union-find class with at
least one source. Per-op knowledge lives in `rules.py`; this module only applies the decisions.

A tensor's channel dim is a sequence of segments (offset, length), each in one space. In this version
every tensor has one segment covering the whole axis; Concat/Split add multi-segment states later.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from onnxslim.analysis.rules import Block, Create, Decision, Flow, NodeView, decide, unsupported
from onnxslim.io import TensorInfo, infer_tensor_infos

__all__ = [
    "Member",
    "Source",
    "Sink",
    "Follower",
    "Blocker",
    "ChannelGroup",
    "build_channel_groups",
    "find_channel_groups",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """Channels [offset, offset + length) of `tensor` on `axis` belong to the group."""

    tensor: str
    axis: int
    offset: int
    length: int


@dataclass(frozen=True)
class Source:
    """A node that creates the group's channels on output `axis` (its weights are scored and sliced)."""

    node: str
    op_type: str
    axis: int


@dataclass(frozen=True)
class Sink:
    """A node that consumes and mixes the group's channels from input `input_index` on `axis`."""

    node: str
    op_type: str
    input_index: int
    axis: int


@dataclass(frozen=True)
class Follower:
    """A node whose per-channel constants or attributes follow the group on output `axis` (of `rank` dims)."""

    node: str
    op_type: str
    axis: int
    rank: int


@dataclass(frozen=True)
class Blocker:
    """Why a group cannot be pruned: the first blocking node in topological order (None: a graph input)."""

    node: str | None
    reason: str


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


@dataclass(frozen=True)
class _ChannelState:
    """Where a tensor's channels are: its axis and the space they belong to."""

    axis: int
    space: int


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
    """One pass over the graph in topological order, applying each node's decision."""

    def __init__(self, graph: gs.Graph, shapes: Mapping[str, Sequence[int]] | None) -> None:
        self.graph = graph
        self.shapes = shapes
        self.spaces = _Spaces()
        self.states: dict[str, _ChannelState] = {}
        self.opset = int(graph.opset or onnx.defs.onnx_opset_version())

    def shape(self, tensor: gs.Tensor) -> tuple[int, ...] | None:
        return _static_shape(tensor, self.shapes)

    def set_state(self, tensor: gs.Tensor, order: int, axis: int, space: int) -> None:
        self.states[tensor.name] = _ChannelState(axis, space)
        data = self.spaces.get(space)
        data.members.append((order, Member(tensor.name, axis, 0, data.size)))

    def opaque(self, tensor: gs.Tensor, order: int, blocker: Blocker) -> None:
        """Give `tensor` a space that is blocked from the start (graph inputs, outputs of blockers)."""
        shape = self.shape(tensor)
        if not tensor.name or shape is None or len(shape) == 0:
            return
        axis = 1 if len(shape) >= 2 else 0
        self.set_state(tensor, order, axis, self.spaces.new(shape[axis], (order, blocker)))

    def block_input(self, tensor: gs.Tensor, order: int, blocker: Blocker) -> None:
        state = self.states.get(tensor.name)
        if state is not None:
            self.spaces.block(state.space, order, blocker)

    def run(self) -> None:
        for tensor in self.graph.inputs:
            self.opaque(tensor, -1, Blocker(None, f"its channels come from graph input {tensor.name!r}"))
        for order, node in enumerate(self.graph.nodes):
            self.visit(order, node)
        producers = {out.name: (order, node) for order, node in enumerate(self.graph.nodes) for out in node.outputs}
        for tensor in self.graph.outputs:
            order, node = producers.get(tensor.name, (-1, None))
            self.block_input(
                tensor, order, Blocker(node.name if node else None, f"its channels reach graph output {tensor.name!r}")
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
        )

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
        graph_outputs = {t.name for t in self.graph.outputs}
        for index, tensor in enumerate(node.outputs[1:], start=1):
            if tensor.name and (tensor.outputs or tensor.name in graph_outputs):
                return Block(f"output {index} of {node.op} is used")
        return decide(view)

    def visit(self, order: int, node: gs.Node) -> None:
        view = self.view(node)
        decision = self.decide(node, view)
        if isinstance(decision, Flow):
            sizes = {self.spaces.get(self.states[node.inputs[i].name].space).size for i in decision.operands}
            if len(sizes) > 1:  # cannot happen for a valid model; never join spaces of different sizes
                decision = Block(f"its operands carry different channel counts {sorted(sizes)}")
        spaces = self.spaces
        handled: set[int] = set()
        if isinstance(decision, Block):
            blocker = Blocker(node.name, decision.reason)
            logger.debug("blocker %s (%s): %s", node.name, node.op, decision.reason)
            for tensor in node.inputs:
                self.block_input(tensor, order, blocker)
            for tensor in node.outputs:
                self.opaque(tensor, order, blocker)
            return
        if isinstance(decision, Create):
            handled.add(decision.sink_input)
            state = self.states.get(node.inputs[decision.sink_input].name)
            if state is not None:
                if state.axis != decision.sink_axis:
                    spaces.block(
                        state.space,
                        order,
                        Blocker(node.name, f"{node.op} mixes axis {decision.sink_axis}, but the channels are on axis {state.axis}"),
                    )
                else:
                    sink = Sink(node.name, node.op, decision.sink_input, decision.sink_axis)
                    spaces.get(state.space).sinks.append((order, sink))
            space = spaces.new(decision.channels)
            spaces.get(space).sources.append((order, Source(node.name, node.op, decision.out_axis)))
            self.set_state(node.outputs[0], order, decision.out_axis, space)
        else:
            handled.update(decision.operands, decision.broadcast)
            operand_spaces = [self.states[node.inputs[i].name].space for i in decision.operands]
            space = operand_spaces[0]
            for other in operand_spaces[1:]:
                space = spaces.union(space, other)
            for index in decision.broadcast:
                self.block_input(
                    node.inputs[index], order, Blocker(node.name, f"broadcast along the channel axis by {node.op}")
                )
            if decision.follower:
                follower = Follower(node.name, node.op, decision.out_axis, view.out_rank())
                spaces.get(space).followers.append((order, follower))
            self.set_state(node.outputs[0], order, decision.out_axis, space)
        for index, tensor in enumerate(node.inputs):
            if index not in handled and not isinstance(tensor, gs.Constant):
                self.block_input(tensor, order, Blocker(node.name, f"read as a parameter by {node.op}"))

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
                blocker = Blocker(sources[0].node, "its channels reach no layer that consumes them")
            found.append(
                (
                    min(order for order, _ in data.sources),
                    ChannelGroup(
                        id=sources[0].node,
                        channels=data.size,
                        members=tuple(m for _, m in sorted(data.members, key=lambda item: item[0])),
                        sources=tuple(sources),
                        sinks=sinks,
                        followers=tuple(f for _, f in sorted(data.followers, key=lambda item: item[0])),
                        blocked_by=blocker,
                    ),
                )
            )
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
    walker = _Walker(graph, shapes)
    walker.run()
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
