"""Importance criteria: small callables `(group, graph) → one score per channel` (higher = more important).

`l1` and `l2` are magnitude criteria: the norm of each source's output-channel weights (a Conv filter
`weight[c]`, a Gemm/MatMul weight column or row). A group with several sources (a residual stage, an SE
gate joined to its block) sums their scores after dividing each source's scores by their mean, so every
source weighs the same whatever the scale of its weights. `bn` scores a channel
by |γ| of the BatchNormalization nodes that follow it (each BN mean-normalized, then summed), the
network-slimming criterion; a group without a BN in a model that has some falls back to `l1` (logged). A
model without any BatchNormalization cannot use `bn`: PyTorch eval exports fold BN into the convs.
`random` is a baseline for benchmarks, seeded by `--seed` and the group id (the same run twice is the same).

Every criterion takes the keyword `seed`; only `random` uses it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.analysis.groups import ChannelGroup, Source
from onnxslim.analysis.rules import RULES, Behaviour
from onnxslim.errors import UsageError

__all__ = [
    "Criterion",
    "CRITERIA",
    "output_channel_weights",
    "l1_importance",
    "l2_importance",
    "bn_importance",
    "random_importance",
    "score_groups",
]

logger = logging.getLogger(__name__)


class Criterion(Protocol):
    """Scores one group's channels (higher = more important)."""

    def __call__(self, group: ChannelGroup, graph: gs.Graph, *, seed: int = 0) -> np.ndarray: ...


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


def l1_importance(group: ChannelGroup, graph: gs.Graph, *, seed: int = 0) -> np.ndarray:
    """Sum over sources of the mean-normalized L1 norm of each channel's weights."""
    return _normalized_sum([np.abs(_group_rows(s, graph, group)).sum(axis=1) for s in group.sources], group.channels)


def l2_importance(group: ChannelGroup, graph: gs.Graph, *, seed: int = 0) -> np.ndarray:
    """Sum over sources of the mean-normalized L2 norm of each channel's weights."""
    return _normalized_sum(
        [np.sqrt(np.square(_group_rows(s, graph, group)).sum(axis=1)) for s in group.sources], group.channels
    )


def bn_importance(group: ChannelGroup, graph: gs.Graph, *, seed: int = 0) -> np.ndarray:
    """Sum over the group's BatchNormalization followers of the mean-normalized |γ| of each channel."""
    norms = [follower for follower in group.followers if follower.op_type == "BatchNormalization"]
    if not norms:
        if not any(node.op == "BatchNormalization" for node in graph.nodes):
            raise UsageError(
                "--criterion bn needs BatchNormalization nodes, and this model has none (PyTorch eval exports "
                "fold BatchNorm into the convs); use l1 or l2, or export with BatchNorm kept"
            )
        logger.info("group %s has no BatchNormalization; scoring it with l1", group.id)
        return l1_importance(group, graph)
    gammas = []
    for follower in norms:
        gamma = np.abs(np.asarray(_node_named(graph, follower.node).inputs[1].values, dtype=np.float64))
        gammas.append(gamma[follower.offset : follower.offset + group.channels])
    return _normalized_sum(gammas, group.channels)


def random_importance(group: ChannelGroup, graph: gs.Graph, *, seed: int = 0) -> np.ndarray:
    """Uniform random scores, reproducible from `seed` and the group id (a baseline)."""
    digest = hashlib.sha256(f"{seed}:{group.id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little")).random(group.channels)


CRITERIA: Mapping[str, Criterion] = {
    "l1": l1_importance,
    "l2": l2_importance,
    "bn": bn_importance,
    "random": random_importance,
}


def score_groups(
    groups: tuple[ChannelGroup, ...], graph: gs.Graph, criterion: str, *, seed: int = 0
) -> dict[str, np.ndarray]:
    """Scores of every prunable group under the named criterion."""
    if criterion not in CRITERIA:
        raise UsageError(f"unknown criterion {criterion!r}; choose one of {sorted(CRITERIA)}")
    score = CRITERIA[criterion]
    return {group.id: score(group, graph, seed=seed) for group in groups if group.prunable}
