"""Importance criteria: small callables `(group, graph) → one score per channel` (higher = more important).

`l1` and `l2` are magnitude criteria: the norm of each source's output-channel weights (a Conv filter
`weight[c]`, a Gemm/MatMul weight column or row). A group with several sources (a residual stage, an SE
gate joined to its block) sums their scores after dividing each source's scores by their mean, so every
source weighs the same whatever the scale of its weights. Followers (BatchNorm, per-channel Mul/Add) are
not scored here; a `bn` criterion can use them later.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.analysis.groups import ChannelGroup, Source
from onnxslim.analysis.rules import RULES, Behaviour
from onnxslim.errors import UsageError

__all__ = ["Criterion", "CRITERIA", "output_channel_weights", "l1_importance", "l2_importance", "score_groups"]

Criterion = Callable[[ChannelGroup, gs.Graph], np.ndarray]


def _conv_out_weights(node: gs.Node) -> np.ndarray:
    return np.asarray(node.inputs[1].values)  # [C_out, C_in, k...]


def _conv_transpose_out_weights(node: gs.Node) -> np.ndarray:
    return np.moveaxis(np.asarray(node.inputs[1].values), 1, 0)  # [C_in, C_out, k...] → C_out first


def _gemm_out_weights(node: gs.Node) -> np.ndarray:
    weight = np.asarray(node.inputs[1].values)
    return weight if node.attrs.get("transB", 0) else weight.T  # rows = output features


def _matmul_out_weights(node: gs.Node) -> np.ndarray:
    return np.asarray(node.inputs[1].values).T


# op type → the source's weights with output channels first
_OUT_WEIGHTS: Mapping[str, Callable[[gs.Node], np.ndarray]] = {
    "Conv": _conv_out_weights,
    "ConvTranspose": _conv_transpose_out_weights,
    "Gemm": _gemm_out_weights,
    "MatMul": _matmul_out_weights,
}

_MISSING = sorted(op for op, rule in RULES.items() if rule.behaviour is Behaviour.SOURCE and op not in _OUT_WEIGHTS)
if _MISSING:  # pragma: no cover - checked once at import
    raise ImportError(f"onnxslim.prune.importance: no output-weight reader for source ops {_MISSING}")


def output_channel_weights(source: Source, graph: gs.Graph) -> np.ndarray:
    """The weights of `source` as a [channels, everything else] matrix."""
    node = _node_named(graph, source.node)
    weights = _OUT_WEIGHTS[source.op_type](node)
    return weights.reshape(weights.shape[0], -1).astype(np.float64)


def _group_rows(source: Source, graph: gs.Graph, group: ChannelGroup) -> np.ndarray:
    """The rows of `source`'s output-channel weights that belong to `group` (a segment after a cut)."""
    return output_channel_weights(source, graph)[source.offset : source.offset + group.channels]


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


def l1_importance(group: ChannelGroup, graph: gs.Graph) -> np.ndarray:
    """Sum over sources of the mean-normalized L1 norm of each channel's weights."""
    return _normalized_sum([np.abs(_group_rows(s, graph, group)).sum(axis=1) for s in group.sources], group.channels)


def l2_importance(group: ChannelGroup, graph: gs.Graph) -> np.ndarray:
    """Sum over sources of the mean-normalized L2 norm of each channel's weights."""
    return _normalized_sum(
        [np.sqrt(np.square(_group_rows(s, graph, group)).sum(axis=1)) for s in group.sources], group.channels
    )


CRITERIA: Mapping[str, Criterion] = {"l1": l1_importance, "l2": l2_importance}


def score_groups(groups: tuple[ChannelGroup, ...], graph: gs.Graph, criterion: str) -> dict[str, np.ndarray]:
    """Scores of every prunable group under the named criterion."""
    if criterion not in CRITERIA:
        raise UsageError(f"unknown criterion {criterion!r}; choose one of {sorted(CRITERIA)}")
    score = CRITERIA[criterion]
    return {group.id: score(group, graph) for group in groups if group.prunable}
