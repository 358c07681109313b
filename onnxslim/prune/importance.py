"""Importance criteria: small callables `(group, graph) → one score per channel` (higher = more important).

`l1` and `l2` are magnitude criteria: the norm of each source's output-channel weights (a Conv filter
`weight[c]`, a Gemm/MatMul weight column or row). A group with several sources (a residual stage, an SE
gate joined to its block) sums their scores after dividing each source's scores by their mean, so every
source weighs the same whatever the scale of its weights. `bn` scores a channel
by |γ| of the BatchNormalization nodes that follow it (each BN mean-normalized, then summed), the
network-slimming criterion; a group without a BN in a model that has some falls back to `l1` (logged). A
model without any BatchNormalization cannot use `bn`: PyTorch eval exports fold BN into the convs.
`random` is a baseline for benchmarks, seeded by `--seed` and the group id (the same run twice is the same).

`activation` and `fluctuation` need calibration statistics (`activations.channel_statistics` of every
sink's input): `activation` scores channel c by sqrt(Σ_f ‖W_sink[:, f]‖² · E[x_f²]) over the input
features f that carry c (one for a Conv, a block of H·W after Flatten → Gemm), per sink, mean-normalized
and summed over the group's sinks (Wanda); `fluctuation` by Σ_f ‖W_sink[:, f]‖² · Var(x_f) the same way
(FLAP: the mean of a removed channel is restored by bias compensation, only its variation is lost). Both
see what magnitude cannot: folded-BN biases and per-channel scales after the activation.

Every criterion is a callable `(group, context) → scores`; `ScoreContext` carries the graph, an index of
its nodes by name, the seed (only `random` reads it) and the statistics when calibration data was given.
A criterion that needs data says so in `NEEDS_DATA`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import InitVar, dataclass, field
from typing import Protocol

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.activations import ChannelStats
from onnxslim.analysis.groups import ChannelGroup, Sink, Source
from onnxslim.errors import UsageError
from onnxslim.graph import GraphIndex

__all__ = [
    "Criterion",
    "CRITERIA",
    "NEEDS_DATA",
    "ScoreContext",
    "statistics_requests",
    "activation_importance",
    "fluctuation_importance",
    "output_channel_weights",
    "l1_importance",
    "l2_importance",
    "bn_importance",
    "random_importance",
    "score_groups",
]

logger = logging.getLogger(__name__)


@dataclass
class ScoreContext:
    """What a criterion may read: the graph and its index (`index`: nodes by name, tensor → producer and
    readers; the pipeline's own, passed as `graph_index`, else built here), the seed, calibration statistics."""

    graph: gs.Graph
    seed: int = 0
    statistics: Mapping[str, ChannelStats] | None = None
    graph_index: InitVar[GraphIndex | None] = None
    index: GraphIndex = field(init=False)
    nodes: dict[str, gs.Node] = field(init=False)

    def __post_init__(self, graph_index: GraphIndex | None) -> None:
        self.index = graph_index if graph_index is not None else GraphIndex(self.graph)
        self.nodes = self.index.nodes

    def node(self, name: str) -> gs.Node:
        return self.index.node(name)


class Criterion(Protocol):
    """Scores one group's channels (higher = more important)."""

    def __call__(self, group: ChannelGroup, context: ScoreContext) -> np.ndarray: ...


def _conv_out_weights(node: gs.Node) -> np.ndarray:
    return np.asarray(node.inputs[1].values)  # [C_out, C_in, k...]


def _conv_transpose_out_weights(node: gs.Node) -> np.ndarray:
    return np.moveaxis(np.asarray(node.inputs[1].values), 1, 0)  # [C_in, C_out, k...] → C_out first


def _gemm_out_weights(node: gs.Node) -> np.ndarray:
    weight = np.asarray(node.inputs[1].values)
    return weight if node.attrs.get("transB", 0) else weight.T  # rows = output features


def _matmul_out_weights(node: gs.Node) -> np.ndarray:
    return np.asarray(node.inputs[1].values).T


# op type → the source's weights with output channels first (every source op: checked in optables.py)
_OUT_WEIGHTS: Mapping[str, Callable[[gs.Node], np.ndarray]] = {
    "Conv": _conv_out_weights,
    "ConvTranspose": _conv_transpose_out_weights,
    "Gemm": _gemm_out_weights,
    "MatMul": _matmul_out_weights,
}


def output_channel_weights(source: Source, graph: gs.Graph | GraphIndex | ScoreContext) -> np.ndarray:
    """The weights of `source` as a [channels, everything else] matrix (give an index or a context when
    calling it for many sources: with a bare graph each call scans it)."""
    node = _node_named(graph, source.node) if isinstance(graph, gs.Graph) else graph.node(source.node)
    weights = _OUT_WEIGHTS[source.op_type](node)
    return weights.reshape(weights.shape[0], -1).astype(np.float64)


def _group_rows(source: Source, context: ScoreContext, group: ChannelGroup) -> np.ndarray:
    """The rows of `source`'s output-channel weights that belong to `group` (a segment after a cut), one per
    channel: an attention head's `unit` columns of the Q/K/V projection side by side."""
    weights = output_channel_weights(source, context)
    rows = weights[source.offset * source.unit : (source.offset + group.channels) * source.unit]
    return rows.reshape(group.channels, -1)


def _node_named(graph: gs.Graph, name: str) -> gs.Node:
    for node in graph.nodes:
        if node.name == name:
            return node
    raise KeyError(f"no node named {name!r}")


def _normalized_sum(per_source: list[np.ndarray], channels: int) -> np.ndarray:
    total = np.zeros(channels, dtype=np.float64)
    for scores in per_source:
        mean = float(scores.mean())
        total += scores / mean if mean > 0 else scores
    return total


def l1_importance(group: ChannelGroup, context: ScoreContext) -> np.ndarray:
    """Sum over sources of the mean-normalized L1 norm of each channel's weights."""
    return _normalized_sum([np.abs(_group_rows(s, context, group)).sum(axis=1) for s in group.sources], group.channels)


def l2_importance(group: ChannelGroup, context: ScoreContext) -> np.ndarray:
    """Sum over sources of the mean-normalized L2 norm of each channel's weights."""
    return _normalized_sum(
        [np.sqrt(np.square(_group_rows(s, context, group)).sum(axis=1)) for s in group.sources], group.channels
    )


def bn_importance(group: ChannelGroup, context: ScoreContext) -> np.ndarray:
    """Sum over the group's BatchNormalization followers of the mean-normalized |γ| of each channel."""
    norms = [follower for follower in group.followers if follower.op_type == "BatchNormalization"]
    if not norms:
        if not any(node.op == "BatchNormalization" for node in context.graph.nodes):
            raise UsageError(
                "--criterion bn needs BatchNormalization nodes, and this model has none (PyTorch eval exports "
                "fold BatchNorm into the convs); use l1 or l2, or export with BatchNorm kept"
            )
        logger.info("group %s has no BatchNormalization; scoring it with l1", group.id)
        return l1_importance(group, context)
    gammas = []
    for follower in norms:
        gamma = np.abs(np.asarray(context.node(follower.node).inputs[1].values, dtype=np.float64))
        gammas.append(gamma[follower.offset : follower.offset + group.channels])
    return _normalized_sum(gammas, group.channels)


def random_importance(group: ChannelGroup, context: ScoreContext) -> np.ndarray:
    """Uniform random scores, reproducible from `seed` and the group id (a baseline)."""
    digest = hashlib.sha256(f"{context.seed}:{group.id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little")).random(group.channels)


# ------------------------------------------------------------------------------ criteria with data


def _conv_in_weights(node: gs.Node, channels: int) -> np.ndarray:
    """A Conv's weights per input channel: [C_in, everything it multiplies] (grouped: its own rows)."""
    weight = np.asarray(node.inputs[1].values)
    groups = int(node.attrs.get("group", 1))
    if groups == 1:
        return np.moveaxis(weight, 1, 0).reshape(weight.shape[1], -1)
    rows, size = weight.shape[0] // groups, weight.shape[1]
    return np.concatenate(
        [np.moveaxis(weight[g * rows : (g + 1) * rows], 1, 0).reshape(size, -1) for g in range(groups)]
    )


def _conv_transpose_in_weights(node: gs.Node, channels: int) -> np.ndarray:
    weight = np.asarray(node.inputs[1].values)
    return weight.reshape(weight.shape[0], -1)


def _gemm_in_weights(node: gs.Node, channels: int) -> np.ndarray:
    weight = np.asarray(node.inputs[1].values)
    return weight.T if node.attrs.get("transB", 0) else weight  # rows = input features


def _matmul_in_weights(node: gs.Node, channels: int) -> np.ndarray:
    return np.asarray(node.inputs[1].values)


# op type → the sink's weights with input features first (every source op: checked in optables.py)
_IN_WEIGHTS: Mapping[str, Callable[[gs.Node, int], np.ndarray]] = {
    "Conv": _conv_in_weights,
    "ConvTranspose": _conv_transpose_in_weights,
    "Gemm": _gemm_in_weights,
    "MatMul": _matmul_in_weights,
}


def _sink_tensor(sink: Sink, context: ScoreContext) -> str:
    return str(context.node(sink.node).inputs[sink.input_index].name)


def statistics_requests(groups: tuple[ChannelGroup, ...], graph: gs.Graph | GraphIndex) -> dict[str, int]:
    """Tensor → channel axis of every prunable group's sink inputs: what `activation` and `fluctuation` read."""
    nodes = (graph if isinstance(graph, GraphIndex) else GraphIndex(graph)).nodes
    return {
        str(nodes[sink.node].inputs[sink.input_index].name): sink.axis
        for group in groups if group.prunable for sink in group.sinks
    }


def _sink_features(sink: Sink, group: ChannelGroup) -> list[np.ndarray]:
    """For each channel of the group, the sink-input features that carry it (after Flatten → Gemm, a block)."""
    extent = sink.extent or group.channels
    features = []
    for channel in range(group.channels):
        blocks = [
            np.arange(((o * extent) + sink.offset + channel) * sink.inner, ((o * extent) + sink.offset + channel + 1) * sink.inner)
            for o in range(sink.outer)
        ]
        features.append(np.concatenate(blocks))
    return features


def _data_scores(
    group: ChannelGroup,
    context: ScoreContext,
    criterion: str,
    per_feature: Callable[[ChannelStats], np.ndarray],
    *,
    root: bool,
) -> np.ndarray:
    """Σ_f ‖W_sink[:, f]‖² · per_feature(x)_f per sink (its square root with `root`), mean-normalized and
    summed over the group's sinks."""
    if context.statistics is None:
        raise UsageError(f"--criterion {criterion} needs calibration data: give --calib DATA")
    per_sink = []
    for sink in group.sinks:
        stats = context.statistics.get(_sink_tensor(sink, context))
        if stats is None:
            continue
        weights = _IN_WEIGHTS[sink.op_type](context.node(sink.node), group.channels).astype(np.float64)
        energy = np.square(weights.reshape(weights.shape[0], -1)).sum(axis=1)  # ‖W[:, f]‖² per input feature
        signal = per_feature(stats)
        if energy.shape != signal.shape:
            logger.debug("sink %s: %d weight rows for %d statistics; skipped", sink.node, energy.size, signal.size)
            continue
        scores = np.array([float(np.sum(energy[f] * signal[f])) for f in _sink_features(sink, group)])
        per_sink.append(np.sqrt(scores) if root else scores)
    if not per_sink:
        logger.info("group %s: no sink statistics; scoring it with l2", group.id)
        return l2_importance(group, context)
    return _normalized_sum(per_sink, group.channels)


def activation_importance(group: ChannelGroup, context: ScoreContext) -> np.ndarray:
    """sqrt(Σ_f ‖W_sink[:, f]‖² · E[x_f²]) per sink (Wanda), mean-normalized, summed over sinks."""
    return _data_scores(group, context, "activation", lambda stats: stats.mean_square, root=True)


def fluctuation_importance(group: ChannelGroup, context: ScoreContext) -> np.ndarray:
    """Σ_f ‖W_sink[:, f]‖² · Var(x_f) per sink (FLAP), mean-normalized, summed over sinks."""
    return _data_scores(group, context, "fluctuation", lambda stats: stats.variance, root=False)


CRITERIA: Mapping[str, Criterion] = {
    "l1": l1_importance,
    "l2": l2_importance,
    "bn": bn_importance,
    "random": random_importance,
    "activation": activation_importance,
    "fluctuation": fluctuation_importance,
}
NEEDS_DATA = frozenset({"activation", "fluctuation"})


def score_groups(
    groups: tuple[ChannelGroup, ...],
    graph: gs.Graph | ScoreContext,
    criterion: str,
    *,
    seed: int = 0,
    statistics: Mapping[str, ChannelStats] | None = None,
) -> dict[str, np.ndarray]:
    """Scores of every prunable group under the named criterion."""
    if criterion not in CRITERIA:
        raise UsageError(f"unknown criterion {criterion!r}; choose one of {sorted(CRITERIA)}")
    context = graph if isinstance(graph, ScoreContext) else ScoreContext(graph, seed, statistics)
    score = CRITERIA[criterion]
    return {group.id: score(group, context) for group in groups if group.prunable}
