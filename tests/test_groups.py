"""Group structure: which nodes end up in which group, which groups block and why."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import ModelBuilder, encoder_model
from oracle import check_prune

from onnxslim.analysis.groups import ChannelGroup, Member, find_channel_groups
from onnxslim.io import normalize_model, resolve_input_shapes


def groups_of(model: onnx.ModelProto, shapes: dict | None = None) -> tuple[ChannelGroup, ...]:
    normalized = normalize_model(model)[0]
    return find_channel_groups(normalized, resolve_input_shapes(normalized, shapes))


def by_first_source_op(groups: tuple[ChannelGroup, ...], node: str) -> ChannelGroup:
    return next(g for g in groups if any(s.node == node for s in g.sources))


def node_names(model: onnx.ModelProto, op: str) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == op]


def test_conv_chain_groups_sources_sinks_members_and_ids() -> None:
    b = ModelBuilder((3, 8, 8))
    y = b.relu(b.bn(b.conv(b.input, 8, 3)))
    model = b.build(b.conv(y, 4))
    groups = groups_of(model)
    convs, bn = node_names(model, "Conv"), node_names(model, "BatchNormalization")
    assert [g.id for g in groups] == convs  # stable ids: the first source's node name
    first, last = groups
    assert first.channels == 8 and first.prunable
    assert [s.node for s in first.sources] == [convs[0]]
    assert [(s.node, s.input_index, s.axis) for s in first.sinks] == [(convs[1], 0, 1)]
    assert [f.node for f in first.followers] == bn
    assert len(first.members) == 3 and all(m.axis == 1 and m.offset == 0 and m.length == 8 for m in first.members)
    assert not last.prunable
    assert last.blocked_by is not None and last.blocked_by.node == convs[1]
    assert "graph output" in last.blocked_by.reason


def test_squeeze_excite_structure() -> None:
    b = ModelBuilder((3, 6, 6))
    x = b.relu(b.conv(b.input, 8, 3))
    model = b.build(b.conv(b.se(x, 4, "HardSigmoid"), 4))
    main_conv, squeeze, expand, last = node_names(model, "Conv")
    groups = groups_of(model)
    main = by_first_source_op(groups, main_conv)
    assert [s.node for s in main.sources] == [main_conv, expand]  # the gate joins via the Mul
    assert [s.node for s in main.sinks] == [squeeze, last]
    squeezed = by_first_source_op(groups, squeeze)
    assert squeezed.channels == 4 and [s.node for s in squeezed.sinks] == [expand]
    assert main.prunable and squeezed.prunable


def test_silu_and_residual_are_one_group() -> None:
    b = ModelBuilder((3, 6, 6))
    x = b.silu(b.conv(b.input, 8, 3))
    y = b.conv(b.relu(b.conv(x, 5, 3)), 8, 3)
    model = b.build(b.conv(b.op("Add", [x, y]), 4))
    first, inner, second, last = node_names(model, "Conv")
    groups = groups_of(model)
    assert len(groups) == 3
    residual = by_first_source_op(groups, first)
    assert [s.node for s in residual.sources] == [first, second]
    assert [s.node for s in residual.sinks] == [inner, last]


def test_spatial_attention_is_blocked_as_broadcast_and_the_main_group_is_not() -> None:
    b = ModelBuilder((3, 6, 6))
    x = b.relu(b.conv(b.input, 8, 3))
    model = b.build(b.conv(b.op("Mul", [x, b.op("Sigmoid", [b.conv(x, 1, 3)])]), 4))
    main_conv, attention, _ = node_names(model, "Conv")
    groups = groups_of(model)
    assert by_first_source_op(groups, main_conv).prunable
    blocked = by_first_source_op(groups, attention).blocked_by
    assert blocked is not None and blocked.reason == "broadcast along the channel axis by Mul"


def test_graph_input_joined_with_conv_blocks_it() -> None:
    b = ModelBuilder((3, 6, 6))
    model = b.build(b.conv(b.op("Add", [b.input, b.conv(b.input, 3, 3)]), 4))
    group = groups_of(model)[0]
    assert group.blocked_by is not None
    assert group.blocked_by.node is None and "graph input 'input'" in group.blocked_by.reason


def test_unknown_op_is_named_as_the_blocker() -> None:
    b = ModelBuilder((3, 6, 6))
    x = b.relu(b.conv(b.input, 8, 3))
    y = b.conv(b.op("LpNormalization", [x], axis=1), 6, 3)
    model = b.build(b.conv(b.relu(y), 4))
    lp = node_names(model, "LpNormalization")[0]
    groups = groups_of(model)
    assert groups[0].blocked_by is not None
    assert (groups[0].blocked_by.node, groups[0].blocked_by.reason) == (lp, "unsupported op LpNormalization")
    assert groups[1].prunable  # the conv after the unknown op consumes blocked channels but creates its own


def test_custom_domain_op_with_unknown_shape_blocks() -> None:
    b = ModelBuilder((3, 6, 6))
    x = b.relu(b.conv(b.input, 8, 3))
    y = b.op("Mystery", [x], domain="com.example")
    model = b.build(b.conv(b.relu(b.conv(y, 6, 3)), 4))
    groups = groups_of(model)
    assert groups[0].blocked_by is not None and groups[0].blocked_by.reason == "unsupported op com.example.Mystery"
    # the convs after it have shapes nothing can infer: they are blockers themselves and create no group
    assert len(groups) == 1


def test_blocking_ops_and_their_reasons() -> None:
    cases = {
        "Softmax": ({"axis": 1}, "over the channel axis"),
        "ReduceMean": ({"axes": [1]}, "over the channel axis"),
        "LRN": ({"size": 3}, "neighbouring channels"),
    }
    for op, (attrs, reason) in cases.items():
        b = ModelBuilder((3, 6, 6))
        model = b.build(b.conv(b.op(op, [b.relu(b.conv(b.input, 8, 3))], **attrs), 4))
        group = groups_of(model)[0]
        assert group.blocked_by is not None and reason in group.blocked_by.reason, op


def test_softmax_over_spatial_axis_passes() -> None:
    b = ModelBuilder((3, 6, 6))
    model = b.build(b.conv(b.op("Softmax", [b.conv(b.input, 8, 3)], axis=-1), 4))
    assert groups_of(model)[0].prunable


def test_pad_on_channel_axis_blocks() -> None:
    b = ModelBuilder((3, 6, 6))
    padded = b.op("Pad", [b.conv(b.input, 8, 3), b.const(np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64))])
    b.channels[padded] = 10
    groups = groups_of(b.build(b.conv(padded, 4)))
    assert "Pad on the channel axis" in [g.blocked_by.reason for g in groups if g.blocked_by]


def test_grouped_conv_is_a_source_and_a_sink_in_blocks() -> None:
    """conv(8) -> grouped conv(12, group=4) -> conv: the first group is read in 4 blocks of 2, the second is
    created in 4 blocks of 3; a concatenation read by a grouped conv, or a Split of its output, blocks."""
    b = ModelBuilder((3, 6, 6))
    first = b.conv(b.input, 8, 3)
    grouped = b.conv(first, 12, 3, group=4)
    model = b.build(b.conv(grouped, 4))
    convs = node_names(model, "Conv")
    groups = groups_of(model)
    read, made = by_first_source_op(groups, convs[0]), by_first_source_op(groups, convs[1])
    assert read.prunable and made.prunable and (read.blocks, made.blocks) == (4, 4)
    assert [s.blocks for s in read.sinks] == [4] and [s.blocks for s in made.sources] == [4]

    b = ModelBuilder((3, 6, 6))
    grouped = b.conv(b.concat(b.conv(b.input, 4, 1), b.conv(b.input, 4, 1)), 8, 3, group=2)
    left, right = b.split(grouped, [4, 4])
    model = b.build(b.conv(left, 4), b.conv(right, 4))
    reasons = [g.blocked_by.reason for g in groups_of(model) if g.blocked_by]
    assert sum("grouped Conv (group=2) reads channels of several groups" in r for r in reasons) == 2
    assert sum("the output of a grouped Conv (group=2) is cut into parts" in r for r in reasons) == 2


def test_groups_whose_grouped_convs_leave_one_channel_per_block_block() -> None:
    """group 4 and group 3 convs both read 12 channels: lcm 12 blocks of one channel, nothing can go."""
    b = ModelBuilder((3, 6, 6))
    x = b.relu(b.conv(b.input, 12, 3))
    model = b.build(b.conv(b.conv(x, 8, 3, group=4), 4), b.conv(b.conv(x, 6, 3, group=3), 4))
    group = groups_of(model)[0]
    assert group.channels == 12 and group.blocks == 12 and group.blocked_by is not None
    assert group.blocked_by.reason == "its grouped convs leave one channel in each of its 12 blocks"


def test_depthwise_conv_follows_and_multiplier_blocks() -> None:
    b = ModelBuilder((3, 6, 6))
    x = b.conv(b.input, 8, 1)
    y = b.depthwise(x, 3)
    multiplied = b.op("Conv", [y, b.const(b.random(16, 1, 3, 3))], channels=16, group=8, pads=[1, 1, 1, 1])
    model = b.build(b.conv(multiplied, 4))
    first = groups_of(model)[0]
    assert [f.op_type for f in first.followers] == ["Conv"]
    assert first.blocked_by is not None and "channel multiplier 2" in first.blocked_by.reason


def test_transpose_moves_the_channel_axis() -> None:
    b = ModelBuilder((3, 4, 4))
    y = b.op("Transpose", [b.conv(b.input, 8, 3)], perm=[0, 2, 3, 1])
    model = b.build(b.matmul(y, 5))
    group = groups_of(model)[0]
    transposed = next(n.output[0] for n in model.graph.node if n.op_type == "Transpose")
    assert Member(transposed, 3, 0, 8) in group.members
    assert group.sinks[0].axis == 3 and group.prunable


def test_conv_after_channels_last_transpose_blocks() -> None:
    b = ModelBuilder((3, 4, 4))
    y = b.op("Transpose", [b.conv(b.input, 8, 3)], perm=[0, 2, 3, 1])  # [N, H, W, C]
    b.channels[y] = 4
    model = b.build(b.conv(y, 4))
    group = groups_of(model)[0]
    assert group.blocked_by is not None and "axis 1, but the channels are on axis 3" in group.blocked_by.reason


def test_flatten_with_spatial_extent_maps_each_channel_to_a_block_of_features() -> None:
    b = ModelBuilder((3, 4, 4))
    flat = b.op("Flatten", [b.relu(b.conv(b.input, 8, 3))])
    b.channels[flat] = 8 * 16
    model = b.build(b.gemm(flat, 5))
    group = groups_of(model)[0]
    assert group.prunable
    assert [(s.op_type, s.outer, s.inner) for s in group.sinks] == [("Gemm", 1, 16)]


def test_channel_shuffle_reshape_blocks() -> None:
    b = ModelBuilder((3, 4, 4), opset=13)
    x = b.relu(b.conv(b.input, 8, 3))
    grouped = b.op("Reshape", [x, b.const(np.array([1, 2, 4, 4, 4], np.int64), prefix="shape")])
    swapped = b.op("Transpose", [grouped], perm=[0, 2, 1, 3, 4])
    shuffled = b.op("Reshape", [swapped, b.const(np.array([1, 8, 4, 4], np.int64), prefix="shape")], channels=8)
    model = b.build(b.conv(shuffled, 4))
    group = groups_of(model)[0]
    assert group.blocked_by is not None and group.blocked_by.reason == "Reshape splits the channel axis"


def test_concat_output_is_a_sequence_of_segments() -> None:
    b = ModelBuilder((3, 6, 6))
    left, right = b.conv(b.input, 8, 3), b.conv(b.input, 4, 1)
    stacked = b.concat(b.relu(left), b.relu(right))
    model = b.build(b.conv(stacked, 4))
    first, second, last = node_names(model, "Conv")
    groups = groups_of(model)
    concat_out = next(n.output[0] for n in model.graph.node if n.op_type == "Concat")
    left_group, right_group = by_first_source_op(groups, first), by_first_source_op(groups, second)
    assert Member(concat_out, 1, 0, 8) in left_group.members
    assert Member(concat_out, 1, 8, 4) in right_group.members
    assert [(s.node, s.offset, s.extent) for s in right_group.sinks] == [(last, 8, 12)]


def test_c2f_split_cuts_its_producer_into_two_groups() -> None:
    b = ModelBuilder((3, 6, 6), opset=13)
    cv1 = b.conv(b.input, 8, 1)
    halves = b.split(b.silu(cv1), [4, 4])
    model = b.build(b.conv(b.concat(halves[0], b.relu(halves[1]), halves[1]), 4))
    cv1_name, cv2 = node_names(model, "Conv")
    split = node_names(model, "Split")[0]
    groups = [g for g in groups_of(model) if g.sources[0].node == cv1_name]
    assert [(g.channels, [(s.offset, s.extent) for s in g.sources]) for g in groups] == [(4, [(0, 8)]), (4, [(4, 8)])]
    assert all(g.prunable for g in groups)
    assert [(s.node, s.offset) for s in groups[1].sinks] == [(cv2, 4), (cv2, 8)]
    assert [(f.node, f.offset) for f in groups[1].followers if f.op_type == "Split"] == [(split, 4)]



def concat_fed_residual_chain(blocks: int, channels: int = 24, step: int = 4) -> onnx.ModelProto:
    """A residual stream of `channels` fed by a concatenation in every block, split at step, 2·step, … in
    turn: each block's join needs the cuts of every block before it (one more walk each, when the analysis
    re-walked the graph), and in the end the whole stream is cut into channels / step groups."""
    b = ModelBuilder((3, 6, 6))
    x = b.relu(b.conv(b.input, channels, 3))
    for block in range(blocks):
        x = b.concat_residual(x, step * (1 + block % (channels // step - 1)))
    return b.build(b.conv(x, 4))


def test_cuts_learnt_late_reach_every_block_of_a_long_concatenation_fed_residual_stream() -> None:
    blocks = 20  # more than the 16 walks the analysis used to stop at (it then blocked the last blocks)
    model = concat_fed_residual_chain(blocks)
    groups = groups_of(model)
    stem, head = node_names(model, "Conv")[0], node_names(model, "Conv")[-1]
    stream = [g for g in groups if g.sources[0].node == stem]
    assert [(g.channels, g.sources[0].offset) for g in stream] == [(4, offset) for offset in range(0, 24, 4)]
    assert all(len(g.sources) == 1 + blocks and g.prunable for g in stream)  # the stem and one conv per block
    assert len(groups) == len(stream) + blocks + 1  # and each block's hidden conv, and the head
    assert [g.id for g in groups if not g.prunable] == [head]

    result = check_prune(model, ratio=0.5)
    assert all(result.plan.changes(g) for g in result.groups if g.sources[0].node == stem)


def test_a_grouped_conv_that_read_a_group_whole_blocks_it_when_a_later_split_cuts_it() -> None:
    """The grouped conv comes first and reads x as one group; the Split after it cuts that group in two, so the
    grouped conv reads channels of two groups: both block, naming it, and it is a sink of neither."""
    b = ModelBuilder((3, 6, 6), opset=13)
    x = b.relu(b.conv(b.input, 8, 1))
    grouped = b.conv(x, 8, 3, group=2)
    left, right = b.split(x, [3, 5])
    model = b.build(b.conv(b.concat(grouped, b.relu(left)), 4), b.conv(right, 4))
    first, grouped_conv = node_names(model, "Conv")[:2]
    parts = [g for g in groups_of(model) if g.sources[0].node == first]
    assert [(g.channels, g.sources[0].offset) for g in parts] == [(3, 0), (5, 3)]
    for part in parts:
        assert part.blocked_by is not None and part.blocked_by.node == grouped_conv
        assert part.blocked_by.reason.startswith("grouped Conv (group=2) reads channels of several groups")
        assert grouped_conv not in [s.node for s in part.sinks] and part.sinks


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_attention_heads_are_one_group_per_layer_and_the_hidden_size_stays(exporter: str) -> None:
    """Q, K and V of a layer are one group of heads (a head is head_size columns of each), read by the output
    projection as head_size features per head; the FFN is a group of neurons; the residual stream is the
    hidden size, normalized by every LayerNorm: blocked, and said so."""
    model = encoder_model(exporter=exporter, layers=2, heads=4, head_size=3, ffn=10)
    groups = groups_of(model, {"x": [2, 5, 12], "attention_mask": [2, 5]})
    heads = [g for g in groups if g.width > 1]
    assert len(heads) == 2
    for group in heads:
        assert group.prunable and group.channels == 4 and group.width == 3
        assert len(group.sources) == 3 and all(s.unit == 3 and s.extent == 4 for s in group.sources)
        assert [(s.inner, s.extent) for s in group.sinks] == [(3, 4)]
    ffn = [g for g in groups if g.prunable and g.width == 1]
    assert [g.channels for g in ffn] == [10, 10]
    hidden = [g for g in groups if not g.prunable]
    assert hidden and all(g.normalized_by is not None and g.channels == 12 for g in hidden)


def test_a_head_split_of_a_tensor_read_elsewhere_reads_it_as_flattened_heads() -> None:
    """The projection's output also feeds a MatMul sink: after the split it is heads of width D there too."""
    b = ModelBuilder((1,), opset=17, seed=3)
    b.inputs = [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 5, 8])]
    b.channels["input"] = 8
    q = b.matmul(b.input, 8)
    heads = b.op("Reshape", [q, b.const(np.array([0, 0, 2, 4], np.int64), prefix="target")], channels=2)
    axes = b.const(np.array([3], np.int64), prefix="axes")
    summed = b.op("ReduceSum", [heads, axes], keepdims=0, channels=2)  # [batch, 5, 2]: per-head sums
    side = b.matmul(q, 3)  # a second reader of the 8 columns
    out = b.op("Add", [b.matmul(summed, 3), side], channels=3)
    model = b.build(out)
    group = by_first_source_op(groups_of(model), node_names(model, "MatMul")[0])
    assert group.channels == 2 and group.width == 4
    assert sorted(s.inner for s in group.sinks) == [1, 4]
    check_prune(model, ratio=0.5)


@pytest.mark.parametrize("second_reader", [False, True])
def test_a_fused_qkv_projection_split_into_parts_is_one_group_of_heads(second_reader: bool) -> None:
    """One MatMul makes Q, K and V and a Split cuts them apart (the Split's cut reaches the MatMul only after
    the head splits): one group of heads whose source is the MatMul three times, a head's columns in each part.
    A second reader of the fused output, after the head splits, reads the three parts' heads flattened."""
    b = ModelBuilder((1,), opset=17, seed=3)
    b.inputs = [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 5, 8])]
    b.channels["input"] = 8
    parts = [b.name("part") for _ in range(3)]
    sizes = b.const(np.array([8, 8, 8], np.int64), prefix="sizes")
    fused = b.matmul(b.input, 24)
    b.nodes.append(onnx.helper.make_node("Split", [fused, sizes], parts, name="qkv_split", axis=2))
    q, k, v = parts
    target = b.const(np.array([0, 0, 2, 4], np.int64), prefix="target")
    b.channels.update({q: 8, k: 8, v: 8})
    heads = [b.op("Reshape", [t, target], channels=2) for t in (q, k, v)]
    scores = b.op("MatMul", [b.op("Transpose", [heads[0]], perm=[0, 2, 1, 3]),
                             b.op("Transpose", [heads[1]], perm=[0, 2, 3, 1])], channels=2)
    context = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), b.op("Transpose", [heads[2]], perm=[0, 2, 1, 3])])
    merged = b.op("Reshape", [b.op("Transpose", [context], perm=[0, 2, 1, 3]),
                              b.const(np.array([0, 0, 8], np.int64), prefix="m")], channels=8)
    out = b.matmul(merged, 3)
    if second_reader:
        out = b.op("Add", [out, b.matmul(fused, 3, bias=False)])
    model = b.build(out)
    groups = groups_of(model)
    fused = by_first_source_op(groups, node_names(model, "MatMul")[0])
    assert fused.prunable and fused.channels == 2 and fused.width == 4
    assert [(s.offset, s.extent, s.unit) for s in fused.sources] == [(0, 6, 4), (2, 6, 4), (4, 6, 4)]
    assert len(fused.sinks) == (4 if second_reader else 1) and all(s.inner == 4 for s in fused.sinks)
    result = check_prune(model, ratio=0.5)
    weight = next(n for n in result.model.graph.node if n.op_type == "MatMul").input[1]
    assert next(t.dims for t in result.model.graph.initializer if t.name == weight) == [8, 12]
