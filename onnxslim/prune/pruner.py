"""`prune_model`: analyse, score, plan and rewrite in one library call that returns a `PruneResult`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from onnxslim.analysis.cost import compute_cost
from onnxslim.analysis.groups import ChannelGroup, build_channel_groups
from onnxslim.errors import UsageError
from onnxslim.io import LoadedModel, infer_tensor_infos, load_model, normalize_model, resolve_input_shapes
from onnxslim.model_info import check_exclusions, refuse_quantized
from onnxslim.prune.importance import score_groups
from onnxslim.prune.lossless import find_lossless_channels, fold_constant_channels
from onnxslim.prune.outcome import PruneOutcome, describe_outcome
from onnxslim.prune.plan import (
    PrunePlan,
    eligible_groups,
    load_plan,
    model_sha256,
    plan_by_macs,
    plan_by_ratio,
)
from onnxslim.prune.rewrite import rewrite_model

__all__ = ["BlockedGroup", "PruneOptions", "PruneResult", "prune_model"]


@dataclass(frozen=True)
class BlockedGroup:
    """A group that cannot be pruned, the node that blocks it and why."""

    group: str
    node: str | None
    reason: str


@dataclass(frozen=True)
class PruneOptions:
    """What to remove and how to choose it. Exactly one of `ratio`, `target_macs` and `plan_path` (or none,
    with `lossless`). The library's defaults are the literal ones: nothing protected and exact channel counts
    (`round_to` 1); the command line turns on `protect_first` and `protect_last` and rounds to 8 (README)."""

    ratio: float | None = None
    target_macs: float | None = None
    criterion: str = "l1"
    round_to: int = 1
    min_keep: int = 1
    exclude: tuple[str, ...] = ()
    protect_first: bool = False
    protect_last: bool = False
    seed: int = 0
    lossless: bool = False
    plan_path: str | None = None

    def __post_init__(self) -> None:
        budgets = [name for name in ("ratio", "target_macs", "plan_path") if getattr(self, name) is not None]
        if len(budgets) > 1:
            raise UsageError(f"choose one of --ratio, --target-macs and --plan, not {' and '.join(budgets)}")
        if not budgets and not self.lossless:
            raise UsageError("say how much to prune: --ratio, --target-macs, --plan or --lossless")


@dataclass(frozen=True)
class PruneResult:
    """A pruned model and what changed: params, MACs and size before and after, groups and channels."""

    model: onnx.ModelProto
    groups: tuple[ChannelGroup, ...]
    plan: PrunePlan
    options: PruneOptions
    analysis_shapes: dict[str, tuple[int, ...]]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    size_before: int
    size_after: int
    model_sha256: str
    budget_met: bool = True
    left_alone: Mapping[str, str] = field(default_factory=dict)  # group id → why the budget skipped it
    outcome: PruneOutcome = field(default_factory=PruneOutcome)  # lossless counts, groups left whole, warnings

    @property
    def lossless_removed(self) -> int:
        return self.outcome.lossless_removed

    @property
    def lossless_found(self) -> int:
        return self.outcome.lossless_found

    @property
    def criterion(self) -> str:
        return self.options.criterion

    @property
    def ratio(self) -> float | None:
        return self.options.ratio

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


def _as_normalized(
    model: LoadedModel | onnx.ModelProto | str | os.PathLike[str],
) -> tuple[onnx.ModelProto, int, str]:
    """The normalized model, its size and the sha256 of its file's bytes (of its serialization if in memory)."""
    if isinstance(model, onnx.ModelProto):
        return normalize_model(model)[0], model.ByteSize(), model_sha256(model.SerializeToString(deterministic=True))
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    digest = model_sha256(loaded.path) if loaded.path.is_file() else model_sha256(
        loaded.model.SerializeToString(deterministic=True)
    )
    return loaded.model, loaded.size_bytes, digest


def prune_model(
    model: LoadedModel | onnx.ModelProto | str | os.PathLike[str],
    options: PruneOptions | None = None,
    *,
    input_shapes: Mapping[str | None, Sequence[int]] | None = None,
    **fields: Any,
) -> PruneResult:
    """Prune `model` as `options` say (or as keyword `fields` of PruneOptions, e.g. `ratio=0.3, round_to=8`).

    The model is analysed at concrete input shapes (`input_shapes`, else its static dims with batch 1);
    the pruned model keeps the original's symbolic dims. With `lossless`, dead channels go first and the
    budget applies to the rest. Raises ValidationError if the result fails validation (a bug in onnxslim).
    """
    options = replace(options, **fields) if options is not None else PruneOptions(**fields)
    normalized, size_before, digest = _as_normalized(model)
    refuse_quantized(normalized)
    check_exclusions(normalized, options.exclude)
    shapes = resolve_input_shapes(normalized, input_shapes)
    infos = infer_tensor_infos(normalized, shapes)
    graph = gs.import_onnx(normalized)
    groups = build_channel_groups(graph, {name: info.shape for name, info in infos.items()})
    cost_before = compute_cost(normalized, infos)
    outputs = {t.name for t in normalized.graph.output}
    eligible, left_alone = eligible_groups(
        groups, outputs, exclude=options.exclude, protect_first=options.protect_first, protect_last=options.protect_last
    )
    lossless = find_lossless_channels(graph, groups)
    removable = lossless.removable()
    if options.lossless and options.ratio is None and options.target_macs is None and options.plan_path is None:
        for group in groups:
            if group.id in eligible and group.blocks > 1:
                left_alone[group.id] = "--lossless leaves groups of grouped convs (their removals must be balanced)"
    forced = {gid: channels for gid, channels in removable.items() if gid in eligible} if options.lossless else {}
    budget_met = True
    if options.plan_path is not None:
        plan = load_plan(options.plan_path, groups, digest)
    elif options.target_macs is not None:
        scores = score_groups(groups, graph, options.criterion, seed=options.seed)
        layer_macs = {layer.name: layer.macs for layer in cost_before.layers}
        budget = plan_by_macs(
            groups, scores, layer_macs, options.target_macs, options.round_to,
            min_keep=options.min_keep, eligible=eligible, forced=forced,
        )
        plan, budget_met = budget.plan, budget.met
    else:
        scores = score_groups(groups, graph, options.criterion, seed=options.seed)
        plan = plan_by_ratio(
            groups, scores, options.ratio or 0.0, options.round_to,
            min_keep=options.min_keep, eligible=eligible, forced=forced,
        )
    # constant channels that go are folded into their sinks' biases whatever chose them (exact, see lossless.py)
    folded = fold_constant_channels(normalized, groups, plan, lossless)
    pruned = rewrite_model(folded, groups, plan, shapes) if plan.kept else normalized
    cost_after = compute_cost(pruned, infer_tensor_infos(pruned, shapes)) if plan.kept else cost_before
    return PruneResult(
        model=pruned,
        groups=groups,
        plan=plan,
        options=options,
        analysis_shapes=shapes,
        params_before=cost_before.params,
        params_after=cost_after.params,
        macs_before=cost_before.macs,
        macs_after=cost_after.macs,
        size_before=size_before,
        size_after=pruned.ByteSize(),
        model_sha256=digest,
        budget_met=budget_met,
        left_alone=left_alone,
        outcome=describe_outcome(
            groups, plan, eligible=eligible, left_alone=left_alone, lossless=removable, round_to=options.round_to,
            min_keep=options.min_keep, target_macs=options.target_macs,
            budget=options.plan_path is None and (options.ratio is not None or options.target_macs is not None),
        ),
    )
