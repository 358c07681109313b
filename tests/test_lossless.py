"""`--lossless`: planted dead channels (chains, residual groups, Concat segments) go with the outputs unchanged;
a constant channel goes, folded into the sinks' biases, only where that is exact."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from builders import ModelBuilder
from numpy import testing as npt
from onnx import numpy_helper
from oracle import run_model

from onnxslim.analysis.groups import find_channel_groups
from onnxslim.io import normalize_model, random_inputs
from onnxslim.prune import PruneResult, prune_model
from onnxslim.prune.lossless import find_lossless_channels


def plant(model: onnx.ModelProto, conv: int, channels: Sequence[int], bias: float = 0.0) -> onnx.ModelProto:
    """Zero the filters of `channels` of the `conv`-th Conv (graph order) and set their bias to `bias`."""
    node = [n for n in model.graph.node if n.op_type == "Conv"][conv]
    initializers = {t.name: t for t in model.graph.initializer}
    weight = numpy_helper.to_array(initializers[node.input[1]]).copy()
    weight[list(channels)] = 0.0
    initializers[node.input[1]].CopyFrom(numpy_helper.from_array(weight, node.input[1]))
    if len(node.input) > 2:
        values = numpy_helper.to_array(initializers[node.input[2]]).copy()
        values[list(channels)] = bias
        initializers[node.input[2]].CopyFrom(numpy_helper.from_array(values, node.input[2]))
    return model


def check_unchanged(model: onnx.ModelProto, result: PruneResult, tolerance: float = 1e-5) -> float:
    """The pruned model's outputs equal the original's to `tolerance` of the output's scale (max |y|, at least
    1: the builder's random weights give outputs in the hundreds, where float32 summation order alone moves
    the last digits); returns the largest difference relative to that scale."""
    onnx.checker.check_model(result.model)
    normalized = normalize_model(model)[0]
    feeds = random_inputs(normalized, result.analysis_shapes, seed=3)
    worst = 0.0
    for got, want in zip(run_model(result.model, feeds), run_model(normalized, feeds), strict=True):
        scale = max(1.0, float(np.abs(want).max()))
        npt.assert_allclose(got, want, atol=tolerance * scale, rtol=0)
        worst = max(worst, float(np.abs(got - want).max()) / scale)
    return worst


def removed_of(result: PruneResult, source_part: str) -> tuple[int, ...]:
    group = next(g for g in result.groups if any(s.node == source_part for s in g.sources))
    return result.plan.removed(group)


def test_dead_channels_in_a_chain_a_residual_group_and_a_concat_segment_all_go() -> None:
    b = ModelBuilder((3, 10, 10))
    chain = b.relu(b.conv(b.input, 8, 3))  # conv 0: channels 2 and 5 dead
    residual = b.conv(chain, 8, 3)  # conv 1 and conv 2 share a residual group: channel 3 dead in both
    residual = b.relu(b.op("Add", [residual, b.conv(b.relu(residual), 8, 3)]))
    left, right = b.conv(residual, 6, 3), b.conv(residual, 10, 1)  # conv 3, conv 4: channel 1 of conv 4 dead
    y = b.op("MaxPool", [b.op("LeakyRelu", [b.concat(left, right)], alpha=0.1)], kernel_shape=[2, 2], strides=[2, 2])
    model = b.build(b.conv(y, 4, 3))
    plant(plant(plant(plant(model, 0, [2, 5]), 1, [3]), 2, [3]), 4, [1])
    names = [n.name for n in normalize_model(model)[0].graph.node if n.op_type == "Conv"]
    result = prune_model(model, lossless=True)
    assert removed_of(result, names[0]) == (2, 5)
    assert removed_of(result, names[1]) == (3,)
    assert removed_of(result, names[4]) == (1,)
    assert result.lossless_removed == 4 and result.channels_removed == 4
    check_unchanged(model, result)
    with_budget = prune_model(model, lossless=True, ratio=0.5)  # dead ones first, the budget takes the rest
    assert {2, 5} <= set(removed_of(with_budget, names[0])) and with_budget.lossless_removed == 4
    by_macs = prune_model(model, lossless=True, target_macs=0.6)
    assert {2, 5} <= set(removed_of(by_macs, names[0])) and by_macs.lossless_removed == 4
    assert by_macs.budget_met and by_macs.macs_after <= 0.61 * by_macs.macs_before  # coarse steps in a tiny model


def test_a_channel_that_is_not_provably_zero_stays() -> None:
    b = ModelBuilder((3, 8, 8))
    x = b.conv(b.input, 8, 3)
    y = b.op("Sigmoid", [x])  # sigmoid(0) = 0.5: constant, and the padded 3x3 sink cannot fold it
    model = plant(b.build(b.conv(y, 4, 3)), 0, [2])
    result = prune_model(model, lossless=True)
    assert result.channels_removed == 0 and result.lossless_removed == 0


def _constant_before(sink: str) -> onnx.ModelProto:
    """conv(8) with channel 2 a constant (zero filter, bias 0.7, BN shift 1: about 1.7 after Relu), then `sink`."""
    b = ModelBuilder((3, 8, 8))
    x = b.relu(b.bn(b.conv(b.input, 8, 3)))
    if sink == "1x1":
        out = b.conv(x, 4, 1)
    elif sink == "unpadded3x3":
        weight = b.const(b.random(4, 8, 3, 3))
        out = b.op("Conv", [x, weight, b.const(b.random(4))], channels=4, kernel_shape=[3, 3], pads=[0, 0, 0, 0])
    elif sink == "gemm":
        out = b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1), 5)
    elif sink == "gemm_flattened":  # each channel is a block of 8·8 features of the Gemm's input
        out = b.gemm(b.op("Flatten", [x], axis=1, channels=8 * 8 * 8), 5)
    elif sink == "matmul":  # MatMul → Add(bias), the usual exported Linear
        out = b.matmul(b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1), 5)
    elif sink == "bare_matmul":
        out = b.matmul(b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1), 5, bias=False)
    else:
        out = b.conv(x, 4, 3)  # padded 3x3
    model = plant(b.build(out), 0, [2], bias=0.7)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    initializers = {t.name: t for t in model.graph.initializer}
    for name, value in zip(bn.input[1:5], (1.0, 1.0, 0.0, 1.0), strict=True):  # γ, β, μ, σ²: 0.7 → ≈1.7 > 0
        values = numpy_helper.to_array(initializers[name]).copy()
        values[2] = value
        initializers[name].CopyFrom(numpy_helper.from_array(values, name))
    return model


@pytest.mark.parametrize("sink", ["1x1", "unpadded3x3", "gemm", "gemm_flattened", "matmul"])
def test_a_constant_channel_folds_into_a_sink_where_that_is_exact(sink: str) -> None:
    model = _constant_before(sink)
    result = prune_model(model, lossless=True)
    first = next(n.name for n in normalize_model(model)[0].graph.node if n.op_type == "Conv")
    assert removed_of(result, first) == (2,) and result.lossless_removed == 1
    check_unchanged(model, result)
    graph = gs.import_onnx(normalize_model(model)[0])
    found = find_lossless_channels(graph, prune_model(model, ratio=0.0).groups)
    assert not found.dead and list(found.constant.values()) == [{2: pytest.approx(1.7, abs=1e-3)}]


@pytest.mark.parametrize("sink", ["padded3x3", "bare_matmul"])
def test_a_constant_channel_before_a_padded_conv_or_a_bare_matmul_is_kept(sink: str) -> None:
    model = _constant_before(sink)
    result = prune_model(model, lossless=True)
    assert result.channels_removed == 0 and result.lossless_removed == 0
    found = find_lossless_channels(gs.import_onnx(normalize_model(model)[0]), result.groups)
    assert not found.dead and not found.constant  # a constant, but padded borders read 0, not 1.7 (no bias to
    # fold into for the bare MatMul)


def test_groups_of_grouped_convs_are_left_alone_and_said_so() -> None:
    """Dead channels 0, 4, 8, 12 of a group-4 conv's output (one per block): --lossless does not touch such
    groups (a removal there must be balanced across blocks) and lists them as left alone."""
    b = ModelBuilder((3, 6, 6))
    x = b.relu(b.conv(b.input, 8, 3))
    y = b.relu(b.conv(x, 16, 3, group=4))
    model = plant(normalize_model(b.build(b.conv(y, 4)))[0], 1, [0, 4, 8, 12])
    result = prune_model(model, lossless=True)
    grouped = next(g for g in result.groups if g.blocks == 4 and any(s.blocks == 4 for s in g.sources))
    assert not result.plan.changes(grouped) and "grouped convs" in result.left_alone[grouped.id]
    assert result.lossless_removed == 0


def test_the_search_visits_only_the_nodes_writing_each_groups_members(monkeypatch: pytest.MonkeyPatch) -> None:
    """Linear time: every group looks at its own members' producers, never at the whole graph (the search
    visited every node once per group, 35 s on a 10k-node chain), and it still finds the planted channel."""
    from onnxslim.prune import lossless

    b = ModelBuilder((4, 6, 6))
    x = b.relu(b.conv(b.input, 4, 3))
    for _ in range(12):
        x = b.relu(b.conv(x, 4, 3))
    model = normalize_model(plant(b.build(b.conv(x, 2)), conv=5, channels=[1]))[0]
    graph = gs.import_onnx(model)
    visits: list[str] = []
    real_visit = lossless._GroupValues.visit

    def counting(self: object, node: gs.Node) -> None:
        visits.append(node.name)
        real_visit(self, node)  # type: ignore[arg-type]

    monkeypatch.setattr(lossless._GroupValues, "visit", counting)
    groups = find_channel_groups(model, {"input": (1, 4, 6, 6)})
    found = find_lossless_channels(graph, groups)
    prunable = [g for g in groups if g.prunable]
    members = sum(len({m.tensor for m in g.members}) for g in prunable)
    assert len(prunable) == 13 and len(visits) <= members < len(graph.nodes) * len(prunable) / 4
    assert list(found.dead.values()) == [(1,)]
