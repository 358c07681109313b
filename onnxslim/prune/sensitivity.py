"""What pruning costs, group by group: each prunable group pruned *alone* at a few ratios, the way the model
will be pruned (same criterion, same recovery), and the damage measured on held-out data.

One analysis and one statistics pass serve every trial (`PruneState` up to the `score` step). A trial folds
the group's constant channels, slices the group out, refits only the layers that read it (its sinks and
the depthwise convs it passes through — not everything downstream, which would cost a whole recovery per
trial), and runs the held-out samples through the result. Damage is 1 − the worst output's cosine against
the original (smooth and label-free; top-1 is reported too when there are labels, but with a few dozen
held-out samples it moves in steps).

`allocate` turns the curves into a plan for a MAC budget: every eligible group starts whole, and the step
(a group losing its next `round_to` channels) with the least interpolated damage per MAC saved is taken
until the budget is met — a greedy knapsack over the measured curves. A group is never cut past its largest
measured ratio.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim.analysis.groups import ChannelGroup
from onnxslim.errors import UsageError
from onnxslim.evaluate import Evaluator, hold_out_every
from onnxslim.graph import GraphIndex
from onnxslim.prune.lossless import fold_constant_channels_into
from onnxslim.prune.plan import (
    BUDGET_TOLERANCE,
    MacBudget,
    MacModel,
    PrunePlan,
    _kept_count,
    _order,
    _plan_from_counts,
    _round_to,
    plan_by_ratio,
)
from onnxslim.prune.recover import RecoverOptions, recover_model
from onnxslim.prune.rewrite import apply_plan_to_graph, kept_output_channels
from onnxslim.prune.state import GroupSensitivity, PruneState, SensitivityCurves, SensitivityPoint

__all__ = [
    "DEFAULT_RATIOS",
    "ALLOCATION_RATIOS",
    "SensitivityPoint",
    "GroupSensitivity",
    "SensitivityCurves",
    "measure_curves",
    "allocate",
]

logger = logging.getLogger(__name__)

DEFAULT_RATIOS = (0.1, 0.3, 0.5)
ALLOCATION_RATIOS = (0.25, 0.5, 0.75)  # what `prune --allocate sensitivity` measures per eligible group
TRIAL_SAMPLES = 128  # calibration samples a trial's refit uses
EVAL_SAMPLES = 256  # --eval samples a trial is measured on


# ------------------------------------------------------------------------------------------ measuring


def _trial(state: PruneState, group: ChannelGroup, plan: PrunePlan, recover: str) -> onnx.ModelProto:
    """The model with only `group` cut as `plan` says, its own readers refit (module docstring)."""
    assert state.lossless is not None
    graph = gs.import_onnx(state.original)  # once per trial, as the pipeline's compensate and rewrite steps do
    fold_constant_channels_into(GraphIndex(graph), state.groups, plan, state.lossless)
    pruned = apply_plan_to_graph(graph, state.original, state.groups, plan)
    if recover == "none" or state.calib is None:
        return pruned
    readers = [s.node for s in group.sinks] + [f.node for f in group.followers if f.op_type == "Conv"]
    order = [n.name for n in state.original.graph.node if n.name in set(readers)]
    options = RecoverOptions(
        method=recover, ridge=state.options.ridge, positions_per_weight=state.options.positions_per_weight,
        memory_budget=state.options.recover_memory, seed=state.options.seed,
    )
    recovered, _ = recover_model(
        state.original, pruned, order, kept_output_channels(state.groups, plan), state.calibration_batches,
        options, fixed_batch=state.calib.fixed_batch,
    )
    return recovered


def measure_curves(
    state: PruneState,
    ratios: Sequence[float],
    groups: Collection[str] | None = None,
    *,
    progress: Any = None,
) -> SensitivityCurves:
    """Prune every prunable group (or those in `groups`) alone at each ratio and measure the damage.

    `state` is a `PruneState` that has run up to the `score` step (analysis, statistics, scores).
    """
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise UsageError(f"ratios must be in (0, 1), not {list(ratios)}")
    started = time.perf_counter()
    # trials are many: each refits on at most TRIAL_SAMPLES calibration samples and is measured on at most
    # EVAL_SAMPLES held-out ones (both within --max-samples)
    limit = state.max_samples or math.inf
    trial_state = copy.copy(state)
    trial_state.max_samples = int(min(limit, TRIAL_SAMPLES))
    eval_samples = int(min(limit, EVAL_SAMPLES)) if state.eval_data is not None else trial_state.max_samples
    assert state.calib is not None
    held = hold_out_every(state.calib, state.eval_data, eval_samples)
    evaluator = Evaluator(state.original, held)
    accuracy_original = evaluator.accuracy_original()
    top1_original = None if accuracy_original is None else accuracy_original.top1
    recover = state.recover_method
    assert state.cost_before is not None
    macs = MacModel(state.groups, {layer.name: layer.macs for layer in state.cost_before.layers})
    chosen = [g for g in state.groups if g.prunable and g.id in state.scores and (groups is None or g.id in groups)]
    total = len(chosen) * len(ratios)
    results, trials, done = [], 0, 0
    for group in chosen:
        points = []
        for ratio in sorted(ratios):
            plan = plan_by_ratio(
                state.groups, state.scores, ratio, 1, min_keep=state.options.min_keep, eligible={group.id},
            )
            removed = len(plan.removed(group))
            if removed:
                comparison = evaluator.compare(_trial(trial_state, group, plan, recover), "a trial model")
                # the worst output, by closeness: strings measured on few samples rank groups too coarsely
                cosine = min(f.closeness for f in comparison.fidelities)
                accuracy = None if comparison.accuracy is None else comparison.accuracy.top1
                trials += 1
            else:
                cosine, accuracy = 1.0, top1_original
            points.append(SensitivityPoint(ratio, removed, cosine, accuracy))
            done += 1
            if progress is not None:
                progress("sensitivity", done, total)
        stake = macs.total - macs.macs_after({group.id: group.channels})
        results.append(GroupSensitivity(group.id, group.channels, stake, tuple(points)))
    results.sort(key=lambda g: (-g.worst_damage, g.group))
    calib_passes = 1 if state.statistics is not None else 0
    per_trial = 1 + (2 if recover != "none" else 0)  # evaluation, plus the recovery's two staged runs
    return SensitivityCurves(
        groups=tuple(results), ratios=tuple(sorted(ratios)), criterion=state.options.criterion, recover=recover,
        data=held.description, samples=held.samples, trials=trials,
        forward_passes=calib_passes + 1 + trials * per_trial, seconds=time.perf_counter() - started,
        accuracy_original=top1_original,
    )


# ------------------------------------------------------------------------------------------ allocating


def allocate(
    groups: Sequence[ChannelGroup],
    scores: Mapping[str, np.ndarray],
    layer_macs: Mapping[str, int],
    target: float,
    curves: SensitivityCurves,
    round_to: int = 1,
    *,
    min_keep: int = 1,
    eligible: Collection[str] | None = None,
    forced: Mapping[str, Collection[int]] | None = None,
) -> MacBudget:
    """Per-group cuts that keep about `target` of the MACs with the least total measured damage (greedy
    on interpolated damage per MAC saved; module docstring). Channels go in each group's score order."""
    forced = forced or {}
    model = MacModel(groups, layer_macs)
    by_id = {g.id: g for g in groups}
    curve = {c.group: c for c in curves.groups}
    chosen = [
        by_id[c.group] for c in curves.groups
        if c.group in by_id and by_id[c.group].prunable and (eligible is None or c.group in eligible) and c.group in scores
    ]
    limits: dict[str, int] = {}  # the most channels a group may lose: its largest measured ratio
    steps: dict[str, list[int]] = {}  # removal counts a group can stop at, in increasing order
    for group in chosen:
        most = max(p.removed for p in curve[group.id].points) if curve[group.id].points else 0
        counts = sorted({
            group.channels - _kept_count(group.channels, remove, _round_to(round_to, group), min_keep, group.blocks)
            for remove in range(group.channels + 1)
        })
        base = len(forced.get(group.id, ()))
        steps[group.id] = [c for c in counts if base <= c <= max(most, base)] or [0]
        limits[group.id] = steps[group.id][-1]
    removed = {g.id: steps[g.id][0] for g in chosen}
    total = model.total or 1.0
    goal = target * total
    current = model.macs_after(removed)
    while current > goal:
        best: tuple[float, str, int, float] | None = None
        for group in chosen:
            position = steps[group.id].index(removed[group.id])
            if position + 1 >= len(steps[group.id]):
                continue
            count = steps[group.id][position + 1]
            trial = {**removed, group.id: count}
            saved = current - model.macs_after(trial)
            if saved <= 0:
                continue
            c = curve[group.id]
            cost = c.damage_at(count / group.channels) - c.damage_at(removed[group.id] / group.channels)
            value = (max(cost, 0.0) + 1e-9) / saved
            if best is None or value < best[0]:
                best = (value, group.id, count, current - saved)
        if best is None:
            break
        _, gid, count, current = best
        removed[gid] = count
    fraction = current / total
    met = fraction <= target + BUDGET_TOLERANCE
    if not met:
        logger.warning(
            "--target-macs %g cannot be met by --allocate sensitivity: cutting every group to its largest "
            "measured ratio keeps %.1f %% of the MACs", target, 100 * fraction,
        )
    orders = {g.id: _order(g, scores, forced.get(g.id, ())) for g in chosen}
    return MacBudget(_plan_from_counts(groups, orders, removed), target, fraction, met)



