"""`prune_model`: analyse, score, plan and rewrite in one library call that returns a `PruneResult`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from onnxslim.analysis.cost import compute_cost
from onnxslim.analysis.groups import ChannelGroup, build_channel_groups
from onnxslim.io import LoadedModel, infer_tensor_infos, load_model, normalize_model, resolve_input_shapes
from onnxslim.prune.importance import score_groups
from onnxslim.prune.plan import PrunePlan, plan_by_ratio
from onnxslim.prune.rewrite import rewrite_model

__all__ = ["BlockedGroup", "PruneResult", "prune_model"]


@dataclass(frozen=True)
class BlockedGroup:
    """A group that cannot be pruned, the node that blocks it and why."""

    group: str
    node: str | None
    reason: str


@dataclass(frozen=True)
class PruneResult:
    """A pruned model and what changed: params, MACs and size before and after, groups and channels."""

    model: onnx.ModelProto
    groups: tuple[ChannelGroup, ...]
    plan: PrunePlan
    criterion: str
    ratio: float
    analysis_shapes: dict[str, tuple[int, ...]]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    size_before: int
    size_after: int

    @property
    def prunable_groups(self) -> int:
        return sum(group.prunable for group in self.groups)

    @property
    def pruned_groups(self) -> int:
        return sum(self.plan.changes(group) for group in self.groups)

    @property
    def channels_removed(self) -> int:
        return sum(len(self.plan.removed(group)) for group in self.groups)

    @property
    def blocked(self) -> tuple[BlockedGroup, ...]:
        return tuple(
            BlockedGroup(group.id, group.blocked_by.node, group.blocked_by.reason)
            for group in self.groups
            if group.blocked_by is not None
        )


def _as_normalized(model: LoadedModel | onnx.ModelProto | str | os.PathLike[str]) -> tuple[onnx.ModelProto, int]:
    if isinstance(model, LoadedModel):
        return model.model, model.size_bytes
    if isinstance(model, onnx.ModelProto):
        return normalize_model(model)[0], model.ByteSize()
    loaded = load_model(model)
    return loaded.model, loaded.size_bytes


def prune_model(
    model: LoadedModel | onnx.ModelProto | str | os.PathLike[str],
    *,
    ratio: float,
    criterion: str = "l1",
    input_shapes: Mapping[str | None, Sequence[int]] | None = None,
    round_to: int = 1,
) -> PruneResult:
    """Remove the lowest-scoring fraction `ratio` of every prunable channel group's channels.

    The model is analysed at concrete input shapes (`input_shapes`, else its static dims with batch 1);
    the pruned model keeps the original's symbolic dims. `round_to` rounds each group's channels kept up
    to a multiple of it. Raises ValidationError if the result fails
    validation (a bug in onnxslim).
    """
    normalized, size_before = _as_normalized(model)
    shapes = resolve_input_shapes(normalized, input_shapes)
    infos = infer_tensor_infos(normalized, shapes)
    graph = gs.import_onnx(normalized)
    groups = build_channel_groups(graph, {name: info.shape for name, info in infos.items()})
    plan = plan_by_ratio(groups, score_groups(groups, graph, criterion), ratio, round_to)
    pruned = rewrite_model(normalized, groups, plan, shapes) if plan.kept else normalized
    cost_before = compute_cost(normalized, infos)
    cost_after = compute_cost(pruned, infer_tensor_infos(pruned, shapes)) if plan.kept else cost_before
    return PruneResult(
        model=pruned,
        groups=groups,
        plan=plan,
        criterion=criterion,
        ratio=ratio,
        analysis_shapes=shapes,
        params_before=cost_before.params,
        params_after=cost_after.params,
        macs_before=cost_before.macs,
        macs_after=cost_after.macs,
        size_before=size_before,
        size_after=pruned.ByteSize(),
    )
