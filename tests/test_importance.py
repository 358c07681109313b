"""Importance criteria and the ratio plan."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from builders import ModelBuilder, encoder_model

from onnxslim.analysis.groups import ChannelGroup, Source, find_channel_groups
from onnxslim.errors import UsageError
from onnxslim.io import normalize_model, resolve_input_shapes
from onnxslim.prune.importance import (
    CRITERIA,
    ScoreContext,
    l1_importance,
    l2_importance,
    output_channel_weights,
    score_groups,
)
from onnxslim.prune.plan import PrunePlan, plan_by_ratio


def analysed(model):
    normalized = normalize_model(model)[0]
    graph = gs.import_onnx(normalized)
    return find_channel_groups(normalized, resolve_input_shapes(normalized)), graph


def conv_weight(graph: gs.Graph, nth: int) -> np.ndarray:
    return np.asarray([n for n in graph.nodes if n.op == "Conv"][nth].inputs[1].values, np.float64)


def test_l1_and_l2_of_a_single_source_are_mean_normalized_filter_norms() -> None:
    b = ModelBuilder((3, 6, 6))
    groups, graph = analysed(b.build(b.conv(b.relu(b.conv(b.input, 8, 3)), 4)))
    weight = conv_weight(graph, 0).reshape(8, -1)
    l1 = np.abs(weight).sum(axis=1)
    l2 = np.sqrt((weight**2).sum(axis=1))
    np.testing.assert_allclose(l1_importance(groups[0], ScoreContext(graph)), l1 / l1.mean())
    np.testing.assert_allclose(l2_importance(groups[0], ScoreContext(graph)), l2 / l2.mean())


def test_several_sources_are_normalized_then_summed() -> None:
    b = ModelBuilder((3, 6, 6))
    x = b.conv(b.input, 8, 3)
    y = b.conv(b.relu(x), 8, 3)
    groups, graph = analysed(b.build(b.conv(b.op("Add", [x, y]), 4)))
    group = next(g for g in groups if len(g.sources) == 2)
    first = np.abs(conv_weight(graph, 0).reshape(8, -1)).sum(axis=1)
    second = np.abs(conv_weight(graph, 1).reshape(8, -1)).sum(axis=1)
    np.testing.assert_allclose(l1_importance(group, ScoreContext(graph)), first / first.mean() + second / second.mean())


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_and_matmul_output_weights_are_rows_per_feature(trans_b: int) -> None:
    b = ModelBuilder((6,))
    y = b.matmul(b.relu(b.gemm(b.input, 5, trans_b=trans_b)), 4)
    groups, graph = analysed(b.build(b.gemm(y, 2)))
    gemm = next(n for n in graph.nodes if n.op == "Gemm")
    weight = np.asarray(gemm.inputs[1].values)
    got = output_channel_weights(Source(gemm.name, "Gemm", 1), graph)
    np.testing.assert_allclose(got, weight if trans_b else weight.T)
    matmul = next(n for n in graph.nodes if n.op == "MatMul")
    got = output_channel_weights(Source(matmul.name, "MatMul", 1), graph)
    np.testing.assert_allclose(got, np.asarray(matmul.inputs[1].values).T)


def test_registry_and_unknown_criterion() -> None:
    assert set(CRITERIA) >= {"l1", "l2"}
    b = ModelBuilder((3, 6, 6))
    groups, graph = analysed(b.build(b.conv(b.conv(b.input, 8, 3), 4)))
    assert set(score_groups(groups, graph, "l2")) == {g.id for g in groups if g.prunable}
    with pytest.raises(UsageError):
        score_groups(groups, graph, "taylor")


def _group(channels: int, prunable: bool = True, gid: str = "g") -> ChannelGroup:
    from onnxslim.analysis.groups import Blocker

    return ChannelGroup(gid, channels, (), (Source("n", "Conv", 1),), (), (), None if prunable else Blocker("n", "x"))


def test_plan_by_ratio_removes_the_lowest_floor_ratio_and_keeps_one() -> None:
    scores = {"g": np.array([5.0, 1.0, 3.0, 0.5, 4.0]), "h": np.array([1.0, 2.0]), "b": np.zeros(4)}
    groups = [_group(5), _group(2, gid="h"), _group(4, prunable=False, gid="b")]
    plan = plan_by_ratio(groups, scores, 0.5)
    assert plan.kept == {"g": (0, 2, 4), "h": (1,)}  # floor(2.5) = 2 removed; floor(1.0) = 1 removed
    assert plan.removed(groups[0]) == (1, 3)
    assert plan_by_ratio(groups, scores, 0.0) == PrunePlan({})
    assert plan_by_ratio([_group(2)], {"g": np.ones(2)}, 0.99).kept == {"g": (1,)}  # ties: lower index first
    with pytest.raises(UsageError):
        plan_by_ratio(groups, scores, 1.0)


def test_bn_criterion_is_normalized_gamma_and_falls_back_to_l1_without_bn() -> None:
    b = ModelBuilder((3, 6, 6))
    x = b.relu(b.bn(b.conv(b.input, 8, 3)))
    y = b.relu(b.conv(x, 6, 3))
    groups, graph = analysed(b.build(b.conv(y, 4)))
    bn = next(n for n in graph.nodes if n.op == "BatchNormalization")
    gamma = np.abs(np.asarray(bn.inputs[1].values, np.float64))
    np.testing.assert_allclose(CRITERIA["bn"](groups[0], ScoreContext(graph)), gamma / gamma.mean())
    np.testing.assert_allclose(CRITERIA["bn"](groups[1], ScoreContext(graph)), l1_importance(groups[1], ScoreContext(graph)))


def test_bn_criterion_on_a_model_without_batchnorm_says_why() -> None:
    b = ModelBuilder((3, 6, 6))
    groups, graph = analysed(b.build(b.conv(b.relu(b.conv(b.input, 8, 3)), 4)))
    with pytest.raises(UsageError, match="fold"):
        score_groups(groups, graph, "bn")


def test_random_criterion_is_seeded() -> None:
    b = ModelBuilder((3, 6, 6))
    groups, graph = analysed(b.build(b.conv(b.relu(b.conv(b.input, 8, 3)), 4)))
    first = score_groups(groups, graph, "random", seed=1)
    assert all(np.array_equal(first[k], v) for k, v in score_groups(groups, graph, "random", seed=1).items())
    assert not np.array_equal(first[groups[0].id], score_groups(groups, graph, "random", seed=2)[groups[0].id])


def test_a_head_is_scored_by_its_columns_of_q_k_and_v_or_by_its_context_at_the_output_projection() -> None:
    """l2: each of Q, K, V gives a head the norm of its head_size columns (mean-normalized, summed);
    activation: ‖W_o rows of the head‖² · E[context²] over the head's features, per sink."""
    from onnxslim.activations import ChannelStats

    model = encoder_model(layers=1, heads=4, head_size=3, ffn=6)
    normalized = normalize_model(model)[0]
    graph = gs.import_onnx(normalized)
    groups = find_channel_groups(normalized, {"x": [2, 5, 12], "attention_mask": [2, 5]})
    group = next(g for g in groups if g.width == 3)
    context = ScoreContext(graph)
    expected = np.zeros(4)
    for source in group.sources:
        columns = np.asarray(context.node(source.node).inputs[1].values, np.float64)  # [12, 12]: heads on columns
        norms = np.sqrt(np.square(columns.reshape(12, 4, 3)).sum(axis=(0, 2)))
        expected += norms / norms.mean()
    np.testing.assert_allclose(l2_importance(group, context), expected)

    sink = group.sinks[0]
    rows = np.asarray(context.node(sink.node).inputs[1].values, np.float64)  # [12 features, 12 outputs]
    mean_square = np.arange(1, 13, dtype=np.float64)  # the context's energy per feature
    stats = ChannelStats(count=1, mean=np.zeros(12), mean_square=mean_square, mean_abs=np.zeros(12))
    tensor = context.node(sink.node).inputs[0].name
    scores = CRITERIA["activation"](group, ScoreContext(graph, statistics={tensor: stats}))
    per_head = np.sqrt((np.square(rows).sum(axis=1) * mean_square).reshape(4, 3).sum(axis=1))
    np.testing.assert_allclose(scores, per_head / per_head.mean())
