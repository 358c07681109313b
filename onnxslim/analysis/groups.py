"""Channel groups: the sets of tensor dimensions that must lose the same channels together.

`build_channel_groups` walks the graph once, in topological order. Every variable tensor gets a *channel
state*: the axis that carries its channels and the *channel spaces* (union-find nodes) those channels
belong to. Sources create spaces, pass-through ops copy their input's, joins unite several, blockers
mark them unprunable (and give their outputs spaces that are blocked from the start). Each class of spaces
collects the group's members, sources, sinks and followers; a group is one final class with at least one
source. Per-op knowledge lives in `rules.py`; this module only applies the decisions.

A tensor's channel dim is a sequence of segments (offset, length), each in one space: Concat on the
channel axis concatenates its operands' segment lists (SPPF, Inception, DenseNet, FPN necks); Split and
Slice give each output the segments of its range; joins unite segment by segment.

Cuts. When a split boundary, or a join of differently segmented operands, falls inside a segment, that
segment's class is *cut* there, on the spot: the class, an uncut union-find root, gets two new spaces as
its `parts` (channels [0, c) and [c, size)), each a class of its own (YOLO C2f: `Conv(2c) → Split(c, c)`
makes two groups of c channels). Nothing else is touched when a class is cut: every tensor that had a
segment in it, however far back (a residual stream fed by a concatenation, the sources of the class), reads
its segments through `_Walker.state`, which replaces a cut space by its parts, recursively, and since joins
only ever unite uncut classes, a cut reaches everything joined with it. What a class collected before the
cut stays on it until `_Spaces.settle`, after the walk, hands it down to the parts (oldest cut first, with
offsets moved to each part). So every node is visited once and every entry is handed down once per cut of
its class, however many concatenations feed residual streams; there is no fixpoint over walks.

Heads. A Reshape that splits the channel axis into (heads, width) (`rules.SplitHeads`) turns the class it
reads into a class of heads: a new space of H channels takes over everything collected so far, each entry
with `unit` = D (channel c of the group is entries (offset + c)·D … (offset + c)·D + D − 1 of its tensor or
weights); the old space is left `heads`-redirected, so every tensor that still names it reads the new one
flattened (`inner` = D), as after a Flatten: only a sink may read it. The class must be whole where it is
split (one segment of every tensor that holds it, none flattened, uncut, unblocked), else the node blocks.

A class already blocked when a node would cut it is not cut (nothing to gain): the node blocks. What a cut
does to grouped convs is kept on the class until it happens (`blocked_if_cut`): the parts of a grouped
conv's output, and channels a grouped conv reads whole, cannot lose channels evenly once cut, so the cut
blocks the class, and such a reader is no sink of the parts.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TypeVar

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
    SplitHeads,
    Unread,
    decide,
    unsupported,
)
from onnxslim.graph import GraphIndex
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

_T = TypeVar("_T")

@dataclass(frozen=True)
class Member:
    """Channels [offset, offset + length) of `tensor` on `axis` belong to the group (each as `unit`
    consecutive entries: attention heads before the head split)."""

    tensor: str
    axis: int
    offset: int
    length: int
    unit: int = 1


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
    unit: int = 1  # attention heads: channel c is output columns (offset + c)·unit … + unit − 1


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
    unit: int = 1  # attention heads: channel c is entries (offset + c)·unit … + unit − 1 on `axis`


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
    # the node normalizing over these channels (LayerNormalization or its decomposition), when one does: the
    # hidden size of a transformer's residual stream, which stays whatever else blocks it first
    normalized_by: str | None = None

    @property
    def prunable(self) -> bool:
        return self.blocked_by is None

    @property
    def width(self) -> int:
        """Entries per channel in the group's sources: D for attention heads (a channel is a head of D
        columns of the Q, K and V projections), 1 otherwise."""
        return max((s.unit for s in self.sources), default=1)

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
    """One channel space (a union-find node): while it is a root and has not been cut, it is a class of
    channels and holds everything collected for it; once cut, its two `parts` are spaces of their own."""

    size: int
    members: list[tuple[int, int, Member]] = field(default_factory=list)
    sources: list[tuple[int, int, Source]] = field(default_factory=list)
    sinks: list[tuple[int, int, Sink]] = field(default_factory=list)
    followers: list[tuple[int, int, Follower]] = field(default_factory=list)
    blocker: tuple[int, Blocker] | None = None
    sourced: bool = False  # some source creates these channels (else they come from a graph input or a blocker)
    blocked_if_cut: tuple[int, Blocker] | None = None  # a grouped conv makes or reads them whole
    parts: tuple[int, int] | None = None  # cut: the spaces of channels [0, c) and [c, size)
    heads: tuple[int, int] | None = None  # split into heads: (the space of the heads, entries per head)
    normalized: tuple[int, str] | None = None  # (order, node) of the first node normalizing over these channels
    origins: list[int] = field(default_factory=list)  # an opaque space: the spaces of the same-shaped inputs of the
    # blocking node that made it (a residual Add blocked by its other operand), so a LayerNorm's mark reaches them


class _Spaces:
    """Union-find over channel spaces that can also be cut.

    A join unites two uncut spaces; a cut turns an uncut root into two new spaces, its parts, and a tensor
    whose segment names a cut space reads the parts instead (`leaves`). What was collected before a cut stays
    on the cut space until `settle` hands it down to the parts, so a cut costs O(1) whatever the class holds.
    """

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.data: list[_Space] = []
        self.cuts: list[int] = []  # spaces in the order they were cut: a space's parts are cut after it
        self.sequence = itertools.count()  # ties entries of one node in the order they were collected

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

    def leaves(self, space: int) -> list[int]:
        """The uncut roots that `space`'s channels are now, in channel order."""
        found: list[int] = []
        stack = [space]
        while stack:
            root = self.find(stack.pop())
            parts = self.data[root].parts
            if parts is None:
                found.append(root)
            else:
                stack += [parts[1], parts[0]]
        return found

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if a > b:
            a, b = b, a
        keep, gone = self.data[a], self.data[b]
        if keep.size != gone.size:
            raise AssertionError(f"joined channel spaces of sizes {keep.size} and {gone.size}")
        if keep.parts is not None or gone.parts is not None:
            raise AssertionError("joined a channel space that was cut; join its parts")
        self.parent[b] = a
        keep.members, gone.members = _merged(keep.members, gone.members), []
        keep.sources, gone.sources = _merged(keep.sources, gone.sources), []
        keep.sinks, gone.sinks = _merged(keep.sinks, gone.sinks), []
        keep.followers, gone.followers = _merged(keep.followers, gone.followers), []
        keep.blocker = _earliest(keep.blocker, gone.blocker)
        keep.blocked_if_cut = _earliest(keep.blocked_if_cut, gone.blocked_if_cut)
        if gone.normalized is not None and (keep.normalized is None or gone.normalized < keep.normalized):
            keep.normalized = gone.normalized
        keep.origins, gone.origins = keep.origins + gone.origins, []
        keep.sourced = keep.sourced or gone.sourced
        return a

    def block(self, space: int, order: int, blocker: Blocker) -> None:
        data = self.get(space)
        data.blocker = _earliest(data.blocker, (order, blocker))

    def block_if_cut(self, space: int, order: int, blocker: Blocker) -> None:
        data = self.get(space)
        data.blocked_if_cut = _earliest(data.blocked_if_cut, (order, blocker))

    def cut(self, space: int, position: int) -> None:
        """Cut the uncut class of `space` into channels [0, position) and [position, size)."""
        root = self.find(space)
        data = self.data[root]
        if data.parts is not None or not 0 < position < data.size:
            raise AssertionError(f"cut of a cut channel space, or at {position} outside 1..{data.size - 1}")
        if data.blocked_if_cut is not None:
            data.blocker = _earliest(data.blocker, data.blocked_if_cut)
        parts = []
        for size in (position, data.size - position):
            part = self.new(size, data.blocker)
            self.data[part].sourced = data.sourced
            self.data[part].blocked_if_cut = data.blocked_if_cut
            self.data[part].normalized = data.normalized
            self.data[part].origins = list(data.origins)
            parts.append(part)
        data.parts = (parts[0], parts[1])
        self.cuts.append(root)

    def settle(self) -> None:
        """Hand what each cut space collected down to its parts (oldest cut first, so that it reaches the
        parts' own parts), each entry with its offset moved to the part and its length the part's size."""
        for space in self.cuts:
            data = self.data[space]
            assert data.parts is not None
            start = 0
            for part in data.parts:
                size, target = self.data[part].size, self.get(part)
                handed = _Space(size)
                handed.members = [(o, n, replace(m, offset=m.offset + start, length=size)) for o, n, m in data.members]
                handed.sources = [(o, n, replace(s, offset=s.offset + start)) for o, n, s in data.sources]
                # a grouped Conv that read the class whole now reads channels of several groups: it blocked
                # the class when it was cut (blocked_if_cut) and is no sink of the parts
                handed.sinks = [(o, n, replace(s, offset=s.offset + start)) for o, n, s in data.sinks if s.blocks == 1]
                handed.followers = [(o, n, replace(f, offset=f.offset + start)) for o, n, f in data.followers]
                start += size
                if target.heads is not None:  # the part was split into heads (a fused QKV projection's part)
                    heads, width = target.heads
                    target = self.get(heads)
                    converted = _as_heads(handed, width, target.size)
                    if converted is None:
                        first = handed.sources[0][2].node if handed.sources else None
                        blocker = Blocker(first, "its columns do not fall on head boundaries")
                        target.blocker = _earliest(target.blocker, (-1, blocker))
                        continue
                    handed = converted
                target.members += handed.members
                target.sources += handed.sources
                target.sinks += handed.sinks
                target.followers += handed.followers
            data.members, data.sources, data.sinks, data.followers = [], [], [], []


def _as_heads(space: _Space, width: int, heads: int) -> _Space | None:
    """The entries of `space` with a head of `width` entries as their channel: offsets and extents divided by
    `width`, members, sources and followers holding a head as `unit` = width entries, sinks reading it as
    `inner` = width features. None when an entry does not fall on head boundaries (or is flattened already)."""
    entries: list[Member | Source | Sink | Follower] = [
        *(m for _, _, m in space.members), *(s for _, _, s in space.sources),
        *(s for _, _, s in space.sinks), *(f for _, _, f in space.followers),
    ]
    for entry in entries:
        held = entry.length if isinstance(entry, Member) else (entry.extent or space.size)
        if entry.offset % width or held % width:
            return None
        if isinstance(entry, Sink) and entry.outer * entry.inner != 1:
            return None
        if not isinstance(entry, Sink) and entry.unit != 1:
            return None

    def extent(value: int | None) -> int:
        return (value or space.size) // width

    converted = _Space(heads)
    converted.members = [(o, n, replace(m, offset=m.offset // width, length=heads, unit=width)) for o, n, m in space.members]
    converted.sources = [
        (o, n, replace(s, offset=s.offset // width, extent=extent(s.extent), unit=width)) for o, n, s in space.sources
    ]
    converted.sinks = [
        (o, n, replace(s, offset=s.offset // width, extent=extent(s.extent), inner=width)) for o, n, s in space.sinks
    ]
    converted.followers = [
        (o, n, replace(f, offset=f.offset // width, extent=extent(f.extent), unit=width)) for o, n, f in space.followers
    ]
    return converted


def _merged(keep: list[_T], gone: list[_T]) -> list[_T]:
    """Both lists in one, extending the longer (entries are sorted when the groups are made)."""
    if len(gone) > len(keep):
        keep, gone = gone, keep
    keep += gone
    return keep


def _earliest(a: tuple[int, Blocker] | None, b: tuple[int, Blocker] | None) -> tuple[int, Blocker] | None:
    """The blocker first in topological order (`a` on a tie)."""
    if a is None or (b is not None and b[0] < a[0]):
        return b
    return a


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

    A tensor's state names the spaces of its segments as they were when it was made; `state` reads them as
    they are now, after the cuts made since. A Split/Slice boundary or a join of differently segmented
    operands that falls inside a segment cuts that segment's class on the spot, unless it is blocked by then
    (nothing to gain: the node blocks instead).
    """

    def __init__(self, graph: gs.Graph, shapes: Mapping[str, Sequence[int]] | None, index: GraphIndex) -> None:
        self.graph = graph
        self.shapes = shapes
        self.index = index
        self.spaces = _Spaces()
        self.states: dict[str, _ChannelState] = {}
        self.opset = int(graph.opset or onnx.defs.onnx_opset_version())

    def shape(self, tensor: gs.Tensor) -> tuple[int, ...] | None:
        return _static_shape(tensor, self.shapes)

    def state(self, name: str) -> _ChannelState | None:
        """Where the channels of tensor `name` are now: its segments follow every cut made since it got them."""
        state = self.states.get(name)
        if state is None:
            return None
        spaces = self.spaces
        roots = [spaces.data[spaces.find(s.space)] for s in state.segments]
        if all(data.parts is None and data.heads is None for data in roots):
            return state
        leaves = [leaf for segment in state.segments for leaf in spaces.leaves(segment.space)]
        redirected = [spaces.data[leaf].heads for leaf in leaves]
        inner = state.inner
        if any(r is not None for r in redirected):
            # split into heads since: the tensor holds heads flattened, `width` entries each
            widths = {r[1] for r in redirected if r is not None}
            if all(r is not None for r in redirected) and len(widths) == 1 and state.outer == 1:
                inner *= widths.pop()
                leaves = [leaf for r in redirected if r is not None for leaf in spaces.leaves(r[0])]
            else:  # heads beside other channels in one tensor: not modelled
                blocker = Blocker(None, f"{name!r} holds attention heads beside other channels")
                for r, leaf in zip(redirected, leaves, strict=True):
                    spaces.block(r[0] if r is not None else leaf, -1, blocker)
                leaves = [leaf for r, leaf in zip(redirected, leaves, strict=True) if r is None]
        segments, offset = [], 0
        for leaf in leaves:
            length = spaces.data[leaf].size
            segments.append(_Segment(offset, length, leaf))
            offset += length
        state = replace(state, segments=tuple(segments), inner=inner)
        self.states[name] = state
        return state

    def segments(self, name: str) -> tuple[_Segment, ...]:
        state = self.state(name)
        return state.segments if state is not None else ()

    def collect(self, order: int, what: list, entry: Member | Source | Sink | Follower) -> None:
        what.append((order, next(self.spaces.sequence), entry))

    def set_state(
        self, tensor: gs.Tensor, order: int, axis: int, segments: Sequence[_Segment], outer: int = 1, inner: int = 1
    ) -> None:
        self.states[tensor.name] = _ChannelState(axis, tuple(segments), outer, inner)
        for segment in segments:
            member = Member(tensor.name, axis, segment.offset, segment.length)
            self.collect(order, self.spaces.get(segment.space).members, member)

    def opaque(self, tensor: gs.Tensor, order: int, blocker: Blocker) -> int | None:
        """Give `tensor` a space that is blocked from the start (graph inputs, outputs of blockers).

        Its channel axis is not known: it is assumed to be 1 (0 for vectors), and rules are told the input is
        opaque (NodeView.opaque_inputs) so that they do not rely on the assumption where it matters."""
        shape = self.shape(tensor)
        if not tensor.name or shape is None or len(shape) == 0:
            return None
        axis = 1 if len(shape) >= 2 else 0
        space = self.spaces.new(shape[axis], (order, blocker))
        self.set_state(tensor, order, axis, [_Segment(0, shape[axis], space)])
        return space

    def mark_normalized(self, tensor: gs.Tensor, order: int, node: gs.Node) -> None:
        """`node` normalizes over the channels of `tensor`: mark its class, and through the opaque spaces'
        origins every class blocked on the way to it (the residual stream's projections), as the hidden size."""
        stack = [segment.space for segment in self.segments(tensor.name)]
        seen: set[int] = set()
        while stack:
            root = self.spaces.find(stack.pop())
            if root in seen:
                continue
            seen.add(root)
            data = self.spaces.data[root]
            data.normalized = data.normalized or (order, node.name)
            stack += data.origins

    def block_input(self, tensor: gs.Tensor, order: int, blocker: Blocker) -> None:
        for segment in self.segments(tensor.name):
            self.spaces.block(segment.space, order, blocker)

    def cut_at(self, wanted: Sequence[tuple[str, int]]) -> bool:
        """Cut classes so that each (tensor, position) of `wanted` falls between two segments of the tensor;
        whether anything was cut.

        Which positions are cut is decided once, on the classes as they are before any of these cuts: none in
        a blocked class (nothing to gain). So a cut that blocks a class (a grouped conv's channels) does not
        stop the node's other cuts in it; a later node finds it blocked and blocks instead."""

        def inside(name: str, position: int) -> _Segment | None:
            return next((s for s in self.segments(name) if s.offset < position < s.offset + s.length), None)

        allowed = [
            (name, position)
            for name, position in wanted
            if (segment := inside(name, position)) is not None and self.spaces.get(segment.space).blocker is None
        ]
        for name, position in allowed:
            segment = inside(name, position)
            if segment is not None:  # else an earlier cut in the same class made it a boundary already
                self.spaces.cut(segment.space, position - segment.offset)
        return bool(allowed)

    def block_subgraph_reads(self, order: int, node: gs.Node) -> None:
        """Channels read inside a subgraph (If/Loop bodies) are not followed there: they block."""
        for name in _outer_references(node):
            blocker = Blocker(node.name, f"its channels are read inside a subgraph of {node.op}", BlockerKind.SUBGRAPH)
            for segment in self.segments(name):
                self.spaces.block(segment.space, order, blocker)

    def run(self) -> None:
        for tensor in self.graph.inputs:
            self.opaque(tensor, -1, Blocker(None, f"its channels come from graph input {tensor.name!r}", BlockerKind.GRAPH_INPUT))
        for order, node in enumerate(self.graph.nodes):
            self.visit(order, node)
        for tensor in self.graph.outputs:
            node = self.index.producer(tensor.name)
            order = -1 if node is None else self.index.position[node.name]
            self.block_input(
                tensor, order, Blocker(
                    node.name if node else None, f"its channels reach graph output {tensor.name!r}", BlockerKind.GRAPH_OUTPUT
                ),
            )
        self.spaces.settle()

    def view(self, node: gs.Node) -> NodeView:
        states = [self.state(t.name) if not isinstance(t, gs.Constant) else None for t in node.inputs]
        return NodeView(
            node=node,
            opset=self.opset,
            input_shapes=tuple(self.shape(t) for t in node.inputs),
            output_shapes=tuple(self.shape(t) for t in node.outputs),
            tensor_shape=self.shape,
            input_axes=tuple(state.axis if state is not None else None for state in states),
            opaque_inputs={
                index: self.opaque_origin(state)
                for index, state in enumerate(states)
                if state is not None and not any(self.spaces.get(segment.space).sourced for segment in state.segments)
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
        elif isinstance(decision, SplitHeads):
            decision = self.check_heads(node, decision)
        if isinstance(decision, Block):
            kind = BlockerKind.GRAPH_OUTPUT if decision.to_output else BlockerKind.OP
            blocker = Blocker(node.name, decision.reason, kind)
            logger.debug("blocker %s (%s): %s", node.name, node.op, decision.reason)
            if decision.normalizes:
                self.mark_normalized(node.inputs[0], order, node)
            out_shape = self.shape(node.outputs[0]) if node.outputs else None
            origins = [
                segment.space
                for tensor in node.inputs
                if tensor.name and not isinstance(tensor, gs.Constant) and self.shape(tensor) == out_shape
                for segment in self.segments(tensor.name)
            ]
            for tensor in node.inputs:
                self.block_input(tensor, order, blocker)
            for tensor in node.outputs:
                space = self.opaque(tensor, order, blocker)
                if space is not None:
                    self.spaces.data[space].origins = origins
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
                for segment in self.segments(node.inputs[index].name):
                    segments.append(_Segment(offset, segment.length, segment.space))
                    offset += segment.length
            self.set_state(node.outputs[0], order, decision.out_axis, segments)
        elif isinstance(decision, Unread):
            handled = {0}  # read, but not its channels; the outputs carry none
        elif isinstance(decision, SplitHeads):
            handled = {0}
            self.split_heads(order, node, view, decision)
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
            state = self.state(node.inputs[index].name)
            if state is not None and state.flattened and not isinstance(decision, Create):
                return Block(f"{node.op} reads channels flattened into features")
        return decision

    def check_join(self, node: gs.Node, decision: Flow) -> Flow | Block:
        """Joined operands must be segmented alike: cut their classes until they are, or block."""
        operands = [node.inputs[i] for i in decision.operands]
        extents = {state.extent for t in operands if (state := self.state(t.name)) is not None}
        if len(extents) > 1:  # cannot happen for a valid model; never join spaces of different sizes
            return Block(f"its operands carry different channel counts {sorted(extents)}")
        while True:
            boundaries = {state.boundaries() for t in operands if (state := self.state(t.name)) is not None}
            if len(boundaries) == 1:
                return decision
            wanted = sorted(set().union(*boundaries))
            # a cut may show up elsewhere in an operand (its class is there twice): look again until none is made
            if not self.cut_at([(t.name, p) for t in operands for p in wanted]):
                return Block("its operands are concatenations of differently sized parts")

    def check_partition(self, node: gs.Node, decision: Partition) -> Partition | Block:
        """A split boundary inside a segment needs that segment's class cut there."""
        tensor = node.inputs[0]
        positions = sorted({p for start, end in decision.ranges for p in (start, end)})
        self.cut_at([(tensor.name, p) for p in positions])
        if any(s.offset < p < s.offset + s.length for p in positions for s in self.segments(tensor.name)):
            return Block(f"{node.op} cuts a group of channels (modelled as separate groups where the source allows)")
        return decision

    def check_heads(self, node: gs.Node, decision: SplitHeads) -> SplitHeads | Block:
        """A head split needs the class it reads whole: one segment of every tensor holding it, none
        flattened, uncut, unblocked and not read whole by a grouped conv."""
        state = self.state(node.inputs[0].name)
        assert state is not None
        if len(state.segments) != 1 or state.flattened:
            return Block("Reshape splits into heads channels of several groups or flattened channels")
        data = self.spaces.get(state.segments[0].space)
        if data.blocker is not None:
            return Block("Reshape splits into heads channels that cannot be pruned")
        if data.blocked_if_cut is not None or not data.sourced:
            return Block("Reshape splits into heads channels that grouped convs or a graph input make")
        if _as_heads(data, decision.width, decision.heads) is None:
            return Block("Reshape splits into heads channels whose layers do not hold them on head boundaries")
        for _, _, member in data.members:
            held = self.state(member.tensor)
            if held is None or len(held.segments) != 1 or held.flattened:
                return Block(f"Reshape splits into heads channels that {member.tensor!r} holds with others")
        return decision

    def split_heads(self, order: int, node: gs.Node, view: NodeView, decision: SplitHeads) -> None:
        """The class read becomes a class of heads: a new space takes over its entries with `unit` = width."""
        spaces, width = self.spaces, decision.width
        state = self.state(node.inputs[0].name)
        assert state is not None
        root = spaces.find(state.segments[0].space)
        data = spaces.data[root]
        heads = spaces.new(decision.heads)
        converted = _as_heads(data, width, decision.heads)
        assert converted is not None  # check_heads
        target = spaces.data[heads]
        target.sourced = data.sourced
        target.members, target.sources = converted.members, converted.sources
        target.sinks, target.followers = converted.sinks, converted.followers
        data.members, data.sources, data.sinks, data.followers = [], [], [], []
        data.heads = (heads, width)
        if decision.follower:
            follower = Follower(node.name, node.op, decision.out_axis, view.out_rank(), 0, decision.heads)
            self.collect(order, target.followers, follower)
        self.set_state(node.outputs[0], order, decision.out_axis, [_Segment(0, decision.heads, heads)])

    def create(self, order: int, node: gs.Node, decision: Create) -> None:
        spaces = self.spaces
        tensor = node.inputs[decision.sink_input]
        state = self.state(tensor.name)
        if state is not None:
            if state.axis != decision.sink_axis:
                reason = f"{node.op} mixes axis {decision.sink_axis}, but the channels are on axis {state.axis}"
                self.block_input(tensor, order, Blocker(node.name, reason))
            elif decision.blocks > 1 and (len(state.segments) > 1 or state.flattened):
                self.block_input(tensor, order, self.grouped_reads_parts(node, decision, state.flattened))
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
                    self.collect(order, spaces.get(segment.space).sinks, sink)
                    if decision.blocks > 1:  # it reads the class whole: a later cut makes it read several
                        spaces.block_if_cut(segment.space, order, self.grouped_reads_parts(node, decision, False))
        space = spaces.new(decision.channels)
        spaces.data[space].sourced = True
        if decision.blocks > 1:
            blocker = Blocker(
                node.name,
                f"the output of a grouped Conv (group={decision.blocks}) is cut into parts (by a Split or Slice, or a "
                "join with a concatenation)",
                BlockerKind.GROUPED,
            )
            spaces.block_if_cut(space, order, blocker)
        source = Source(node.name, node.op, decision.out_axis, 0, decision.channels, decision.blocks)
        self.collect(order, spaces.data[space].sources, source)
        self.set_state(node.outputs[0], order, decision.out_axis, [_Segment(0, decision.channels, space)])

    @staticmethod
    def grouped_reads_parts(node: gs.Node, decision: Create, flattened: bool) -> Blocker:
        what = (
            "channels flattened into features" if flattened
            else "channels of several groups (a Concat, or a Split or Slice elsewhere cuts them)"
        )
        return Blocker(node.name, f"grouped Conv (group={decision.blocks}) reads {what}", BlockerKind.GROUPED)

    def flow(self, order: int, node: gs.Node, view: NodeView, decision: Flow) -> None:
        spaces = self.spaces
        states = [self.state(node.inputs[i].name) for i in decision.operands]
        segments = []
        for parts in zip(*(state.segments for state in states if state is not None), strict=True):
            space = parts[0].space
            for other in parts[1:]:
                space = spaces.union(space, other.space)
            segments.append(_Segment(parts[0].offset, parts[0].length, space))
        for index in decision.broadcast:
            self.block_input(node.inputs[index], order, Blocker(node.name, f"broadcast along the channel axis by {node.op}", BlockerKind.BROADCAST))
        first = states[0]
        assert first is not None
        if decision.follower:
            for segment in segments:
                follower = Follower(node.name, node.op, decision.out_axis, view.out_rank(), segment.offset, first.extent)
                self.collect(order, spaces.get(segment.space).followers, follower)
        if decision.elementwise:
            outer, inner = first.outer, first.inner
        else:
            outer, inner = decision.outer, decision.inner
        self.set_state(node.outputs[0], order, decision.out_axis, segments, outer, inner)

    def partition(self, order: int, node: gs.Node, view: NodeView, decision: Partition) -> None:
        state = self.state(node.inputs[0].name)
        assert state is not None
        if decision.follower:
            for segment in state.segments:
                follower = Follower(node.name, node.op, decision.out_axis, view.out_rank(), segment.offset, state.extent)
                self.collect(order, self.spaces.get(segment.space).followers, follower)
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
        """One group per class of channels that some source creates, in the order of its first source."""
        found = []
        for root, data in enumerate(self.spaces.data):
            if self.spaces.parent[root] != root or data.parts is not None or not data.sources:
                continue
            first, *_ = sorted(data.sources, key=_entry_order)
            sources = [s for _, _, s in sorted(data.sources, key=_entry_order)]
            sinks = tuple(s for _, _, s in sorted(data.sinks, key=_entry_order))
            blocker = data.blocker[1] if data.blocker is not None else None
            if blocker is None and not sinks:
                blocker = Blocker(sources[0].node, "its channels reach no layer that consumes them", BlockerKind.UNCONSUMED)
            group = ChannelGroup(
                id=sources[0].node,
                channels=data.size,
                members=tuple(m for _, _, m in sorted(data.members, key=_entry_order)),
                sources=tuple(sources),
                sinks=sinks,
                followers=tuple(f for _, _, f in sorted(data.followers, key=_entry_order)),
                blocked_by=blocker,
                normalized_by=data.normalized[1] if data.normalized is not None and blocker is not None else None,
            )
            if group.prunable and group.channels // group.blocks <= 1:
                grouped = next(
                    (s.node for s in sources if s.blocks > 1), next((s.node for s in sinks if s.blocks > 1), group.id)
                )
                reason = f"its grouped convs leave one channel in each of its {group.blocks} blocks"
                group = replace(group, blocked_by=Blocker(grouped, reason, BlockerKind.GROUPED))
            found.append((_entry_order(first), group))
        found.sort(key=lambda item: item[0])
        return _unique_ids([group for _, group in found])


def _entry_order(entry: tuple[int, int, Member | Source | Sink | Follower]) -> tuple[int, int, int]:
    """Entries in the order their nodes were visited, one node's in the order it collected them, and the
    parts of one entry (after cuts) in channel order."""
    order, sequence, what = entry
    return order, sequence, what.offset


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
    graph: gs.Graph, shapes: Mapping[str, Sequence[int]] | None = None, index: GraphIndex | None = None
) -> tuple[ChannelGroup, ...]:
    """The channel groups of `graph` (normalized: constants as initializers, nodes uniquely named).

    `shapes` gives the static shape of tensors by name (e.g. from `infer_tensor_infos`); tensors not in it
    use the graph's own static shapes. `index`: the graph's GraphIndex, when the caller has one. Groups come
    in the order of their first source.
    """
    walker = _Walker(graph, shapes, index if index is not None else GraphIndex(graph))
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
