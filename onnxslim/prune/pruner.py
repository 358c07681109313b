"""`prune_model`: the prune pipeline, named steps over one `PruneState`, returning a `PruneResult`.

    analyse → lossless → statistics → score → plan → compensate → rewrite → recover → validate → measure

Each step is a function `step(state) -> None` in `PIPELINE`; it reads what earlier steps left in the state
and adds its own part. A step with nothing to do returns at once (no calibration data: `statistics`,
`recover` and `measure` do nothing). To add a step, write the function, give `PruneState` the fields it
fills, and put it in `PIPELINE` where its inputs exist; nothing else changes. Criteria read a
`ScoreContext` (graph, node index, seed, statistics), so a criterion that needs activations only has to
list the tensors it reads in `statistics_requests` (importance.py). Recovery (recover.py) runs after the
rewrite on the physically pruned model, before the one validation.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from onnxslim.activations import channel_statistics
from onnxslim.analysis.cost import compute_cost
from onnxslim.analysis.groups import build_channel_groups
from onnxslim.analysis.quantized import refuse_quantized
from onnxslim.calib import Dataset, first_samples
from onnxslim.errors import UsageError, ValidationError
from onnxslim.evaluate import Evaluator, hold_out_every
from onnxslim.graph import GraphIndex, ProtoIndex, collector_paused
from onnxslim.io import (
    LoadedModel,
    infer_tensor_infos,
    load_model,
    normalize_model,
    resolve_input_shapes,
    validate,
)
from onnxslim.metrics import Accuracy
from onnxslim.model_info import check_exclusions
from onnxslim.progress import Progress
from onnxslim.prune.importance import NEEDS_DATA, ScoreContext, score_groups, statistics_requests
from onnxslim.prune.lossless import find_lossless_channels, fold_constant_channels_into
from onnxslim.prune.outcome import describe_outcome
from onnxslim.prune.plan import (
    PrunePlan,
    eligible_groups,
    load_plan,
    model_sha256,
    plan_by_macs,
    plan_by_ratio,
)
from onnxslim.prune.recover import REFIT_OPS, RecoverOptions, recover_model
from onnxslim.prune.rewrite import apply_plan_to_graph, kept_output_channels
from onnxslim.prune.sensitivity import ALLOCATION_RATIOS, DEFAULT_RATIOS, allocate, measure_curves
from onnxslim.prune.state import (
    ALLOCATIONS,
    BlockedGroup,
    Evaluation,
    OutputFidelity,
    PruneOptions,
    PruneResult,
    PruneState,
    SensitivityCurves,
)

__all__ = [
    "ALLOCATIONS",
    "BlockedGroup",
    "OutputFidelity",
    "PIPELINE",
    "PruneOptions",
    "PruneResult",
    "PruneState",
    "new_state",
    "prune_model",
    "run_pipeline",
    "branch",
    "plan_key",
    "result_of",
    "measure_sensitivity",
]

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ steps


def analyse(state: PruneState) -> None:
    """Shapes, channel groups, MACs, and which groups the budget may touch."""
    options = state.options
    state.shapes = resolve_input_shapes(state.original, state.input_shapes)
    state.infos = infer_tensor_infos(state.original, state.shapes)
    state.graph = gs.import_onnx(state.original)
    state.index = GraphIndex(state.graph)
    state.groups = build_channel_groups(
        state.graph, {name: info.shape for name, info in state.infos.items()}, state.index
    )
    state.cost_before = compute_cost(state.original, state.infos)
    outputs = {t.name for t in state.original.graph.output}
    state.eligible, state.left_alone = eligible_groups(
        state.groups, outputs, exclude=options.exclude,
        protect_first=options.protect_first, protect_last=options.protect_last,
    )


def find_lossless(state: PruneState) -> None:
    """Dead and constant channels; with --lossless they are forced out first."""
    assert state.index is not None
    options = state.options
    state.lossless = find_lossless_channels(state.index, state.groups)
    removable = state.lossless.removable()
    if options.lossless and options.ratio is None and options.target_macs is None and options.plan_path is None:
        for group in state.groups:
            if group.id in state.eligible and group.blocks > 1:
                state.left_alone[group.id] = "--lossless leaves groups of grouped convs (their removals must be balanced)"
    if options.lossless:
        state.forced = {gid: channels for gid, channels in removable.items() if gid in state.eligible}


def collect_statistics(state: PruneState) -> None:
    """Per-channel statistics of every prunable group's sink inputs, when the criterion reads them."""
    options = state.options
    if options.criterion not in NEEDS_DATA or (options.ratio is None and options.target_macs is None):
        return  # a plan file or lossless alone: nothing is scored by data
    assert state.index is not None and state.calib is not None  # new_state checked the options against the data
    requests = statistics_requests(state.groups, state.index)
    calib = state.calib
    state.statistics = channel_statistics(
        state.original, calib, requests, batches=lambda: first_samples(calib, state.max_samples),
        progress=state.progress,
    )


def score(state: PruneState) -> None:
    """One score per channel of every prunable group."""
    if state.options.plan_path is not None:
        return
    assert state.graph is not None
    context = ScoreContext(state.graph, state.options.seed, state.statistics, state.index)
    budget = state.options.ratio is not None or state.options.target_macs is not None
    # lossless alone removes only forced channels: any criterion orders the rest, one without data will do
    criterion = state.options.criterion if budget or state.options.criterion not in NEEDS_DATA else "l1"
    state.scores = score_groups(state.groups, context, criterion)


def plan(state: PruneState) -> None:
    """Which channels of each group are kept: from a plan file, a MAC budget, a ratio, or lossless only."""
    options = state.options
    if options.plan_path is not None:
        state.plan = load_plan(options.plan_path, state.groups, state.digest)
    elif options.target_macs is not None and options.allocate == "sensitivity":
        assert state.cost_before is not None and state.calib is not None  # new_state checked
        if state.sensitivity is None:  # curves given to prune_model (measured once for several budgets) serve
            state.sensitivity = measure_curves(state, ALLOCATION_RATIOS, state.eligible, progress=state.progress)
        budget = allocate(
            state.groups, state.scores, {layer.name: layer.macs for layer in state.cost_before.layers},
            options.target_macs, state.sensitivity, options.round_to, min_keep=options.min_keep,
            eligible=state.eligible, forced=state.forced,
        )
        state.plan, state.budget_met = budget.plan, budget.met
    elif options.target_macs is not None:
        assert state.cost_before is not None
        layer_macs = {layer.name: layer.macs for layer in state.cost_before.layers}
        budget = plan_by_macs(
            state.groups, state.scores, layer_macs, options.target_macs, options.round_to,
            min_keep=options.min_keep, eligible=state.eligible, forced=state.forced,
        )
        state.plan, state.budget_met = budget.plan, budget.met
    else:
        state.plan = plan_by_ratio(
            state.groups, state.scores, options.ratio or 0.0, options.round_to,
            min_keep=options.min_keep, eligible=state.eligible, forced=state.forced,
        )


def compensate(state: PruneState) -> None:
    """Constant channels that go are folded into their sinks' biases, whatever chose them (exact; edits the
    analysis graph in place, for the rewrite)."""
    assert state.lossless is not None and state.index is not None
    state.folded_biases = fold_constant_channels_into(state.index, state.groups, state.plan, state.lossless)


def rewrite(state: PruneState) -> None:
    """The planned channels physically removed from every member of every group (not yet validated)."""
    assert state.graph is not None
    if not state.plan.kept:
        state.pruned = state.original
        return
    graph, state.graph, state.index = state.graph, None, None  # consumed: the pruned model is state.pruned
    try:
        state.pruned = apply_plan_to_graph(graph, state.original, state.groups, state.plan)
    except ValidationError:
        raise
    except (ValueError, IndexError, KeyError) as e:
        raise ValidationError(f"removing the planned channels failed: {type(e).__name__}: {e}") from e
    del graph
    gc.collect()  # the graph's nodes and tensors refer to each other: free its weights now, not after the run


def _refit_nodes(state: PruneState) -> list[str]:
    """Linear nodes downstream of a change: those reading a channel group (sinks, depthwise followers) and
    those past a blocker (the input projections after a Gather of time steps, a classifier after an LSTM),
    which correct the error from upstream too."""
    changed = [g for g in state.groups if state.plan.changes(g)]
    seeds: set[str] = set()
    for group in changed:
        seeds |= {s.node for s in group.sources} | {s.node for s in group.sinks} | {f.node for f in group.followers}
    index = ProtoIndex(state.original.graph)
    downstream, stack = set(seeds), list(seeds)
    while stack:
        node = index.nodes.get(stack.pop())
        for output in node.output if node is not None else ():
            for reader in index.consumers(output):
                if reader.name not in downstream:
                    downstream.add(reader.name)
                    stack.append(reader.name)
    candidates = {s.node for g in state.groups for s in g.sinks}
    candidates |= {f.node for g in state.groups for f in g.followers if f.op_type == "Conv"}
    candidates |= {name for name in downstream if (node := index.nodes.get(name)) is not None and node.op_type in REFIT_OPS}
    return [node.name for node in state.original.graph.node if node.name in candidates & downstream]


def recover(state: PruneState) -> None:
    """Refit the layers that read pruned channels (recover.py), when calibration data is given."""
    method = state.recover_method
    state.unrecovered = state.pruned
    if method == "none" or state.calib is None or not state.plan.kept:
        return
    assert state.pruned is not None
    options = RecoverOptions(
        method=method, ridge=state.options.ridge, positions_per_weight=state.options.positions_per_weight,
        memory_budget=state.options.recover_memory, seed=state.options.seed,
    )
    state.pruned, state.recovery = recover_model(
        state.original, state.pruned, _refit_nodes(state), kept_output_channels(state.groups, state.plan),
        state.calibration_batches, options, fixed_batch=state.calib.fixed_batch, progress=state.progress,
    )
    fallbacks = [node for node in state.recovery.nodes if node.method != node.requested]
    if fallbacks:
        logger.info("recovery: %d of %d layers fell back (%s)", len(fallbacks), len(state.recovery.nodes),
                    "; ".join(f"{n.node}: {n.note}" for n in fallbacks[:3]))


def validate_result(state: PruneState) -> None:
    """Checker, an onnxruntime run, the same inputs and outputs as the original (ValidationError: exit 4)."""
    assert state.pruned is not None
    if state.pruned is not state.original:
        feeds = next(iter(state.calib.batches())).feeds if state.calib is not None else None
        # on random inputs at the analysis shapes, the original's output shapes are known from the analysis
        outputs = {o.name: state.infos[o.name].shape for o in state.original.graph.output if o.name in state.infos}
        state.validation = validate(
            state.pruned, state.original, state.shapes, feeds=feeds, expected_shapes=outputs if feeds is None else None
        )


def measure(state: PruneState) -> None:
    """The whole pruned model against the original on held-out data, before and after recovery."""
    if state.calib is None or state.pruned is None or state.pruned is state.original:
        return
    assert state.unrecovered is not None
    held = hold_out_every(state.calib, state.eval_data, state.max_samples)
    if not held.samples:
        return
    evaluator = Evaluator(state.original, held, progress=state.progress)
    before = evaluator.compare(state.unrecovered, "the pruned model")
    after = before if state.pruned is state.unrecovered else evaluator.compare(state.pruned, "the pruned model")
    fidelities = tuple(
        OutputFidelity(name, b.closeness, a.closeness, b.top1_agreement, a.top1_agreement, b.strings_unchanged,
                       a.strings_unchanged)
        for name, b, a in zip(evaluator.outputs, before.fidelities, after.fidelities, strict=True)
    )
    state.evaluation = Evaluation(
        held.description, held.samples, fidelities, _top1(before.accuracy_original), _top1(before.accuracy),
        _top1(after.accuracy),
    )


def _top1(accuracy: Accuracy | None) -> float | None:
    return None if accuracy is None else accuracy.top1


Step = Callable[[PruneState], None]

PIPELINE: tuple[tuple[str, Step], ...] = (
    ("analyse", analyse),
    ("lossless", find_lossless),
    ("statistics", collect_statistics),
    ("score", score),
    ("plan", plan),
    ("compensate", compensate),
    ("rewrite", rewrite),
    ("recover", recover),
    ("validate", validate_result),
    ("measure", measure),
)


# ------------------------------------------------------------------------------------------- entry point


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


def run_pipeline(state: PruneState, *, start: str | None = None, until: str | None = None) -> PruneState:
    """Run the steps of `PIPELINE` on `state`: from `start` (the first step when None) up to and including
    `until` (the last when None)."""
    names = [name for name, _ in PIPELINE]
    first = 0 if start is None else names.index(start)
    with collector_paused():  # linear time on big graphs (graph.py)
        for name, step in PIPELINE[first:]:
            started = time.perf_counter()
            step(state)
            state.seconds[name] = time.perf_counter() - started
            if name == until:
                break
    return state


# what the steps up to `score` read of the options: a state that has run them serves any budget with these
_SHARED_OPTIONS = ("criterion", "exclude", "protect_first", "protect_last", "seed", "lossless")


def branch(state: PruneState, options: PruneOptions) -> PruneState:
    """A state for another budget (`options`) from `state`, which has run up to `score`: the analysis,
    lossless search, statistics and scores are shared (computed once for every level a search tries);
    the analysis graph is imported afresh, since `compensate` and `rewrite` consume it."""
    assert "score" in state.seconds, "branch a state that has run up to the score step"
    differ = [name for name in _SHARED_OPTIONS if getattr(options, name) != getattr(state.options, name)]
    if differ:
        raise ValueError(f"a branch must keep the options the shared steps read; {', '.join(differ)} differ")
    options.check_data(state.calib is not None, state.eval_data is not None)
    graph = gs.import_onnx(state.original)
    return replace(
        state, options=options, graph=graph, index=GraphIndex(graph), left_alone=dict(state.left_alone),
        plan=PrunePlan(), budget_met=True, folded_biases=0, pruned=None, unrecovered=None, recovery=None,
        evaluation=None, validation=None, seconds={name: 0.0 for name in state.seconds},
    )


def plan_key(plan: PrunePlan) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """What a plan keeps, comparable: two budgets with the same key give the same model."""
    return tuple(sorted((group, tuple(kept)) for group, kept in plan.kept.items()))


def new_state(
    model: LoadedModel | onnx.ModelProto | str | os.PathLike[str],
    options: PruneOptions,
    *,
    input_shapes: Mapping[str | None, Sequence[int]] | None = None,
    calib: Dataset | None = None,
    eval_data: Dataset | None = None,
    progress: Progress | None = None,
    max_samples: int | None = None,
) -> PruneState:
    """A `PruneState` for `model` (normalized, checked), ready for `run_pipeline`."""
    options.check_data(calib is not None, eval_data is not None)
    normalized, size_before, digest = _as_normalized(model)
    refuse_quantized(normalized, "pruning needs float weights. Prune the fp32 model it came from, then quantize the result")
    check_exclusions(normalized, options.exclude)
    return PruneState(
        options, normalized, size_before, digest, input_shapes, calib, eval_data, progress, max_samples=max_samples
    )


def prune_model(
    model: LoadedModel | onnx.ModelProto | str | os.PathLike[str],
    options: PruneOptions | None = None,
    *,
    input_shapes: Mapping[str | None, Sequence[int]] | None = None,
    calib: Dataset | None = None,
    eval_data: Dataset | None = None,
    progress: Progress | None = None,
    sensitivity: SensitivityCurves | None = None,
    max_samples: int | None = None,
    **fields: Any,
) -> PruneResult:
    """Prune `model` as `options` say (or as keyword `fields` of PruneOptions, e.g. `ratio=0.3, round_to=8`).

    The model is analysed at concrete input shapes (`input_shapes`, else its static dims with batch 1);
    the pruned model keeps the original's symbolic dims. With `lossless`, dead channels go first and the
    budget applies to the rest. With `calib` (a `calib.open_dataset`), data-aware criteria can be used,
    the pruned layers are recovered (`recover`, default `lsq`), and the result is measured against the
    original on `eval_data` (else on calibration samples held out of recovery). `max_samples` limits the
    calibration data to its first samples (a caller keeping the rest for its own measurement). Raises
    ValidationError if the result fails validation (a bug in onnxslim).
    """
    options = replace(options, **fields) if options is not None else PruneOptions(**fields)
    state = new_state(
        model, options, input_shapes=input_shapes, calib=calib, eval_data=eval_data, progress=progress,
        max_samples=max_samples,
    )
    state.sensitivity = sensitivity  # `--allocate sensitivity` with curves measured earlier: not measured again
    run_pipeline(state)
    return result_of(state)


def result_of(state: PruneState) -> PruneResult:
    """The `PruneResult` of a state that has run every step."""
    options = state.options
    assert state.pruned is not None and state.cost_before is not None
    pruned = state.pruned
    with collector_paused():
        changed = pruned is not state.original
        cost_after = compute_cost(pruned, infer_tensor_infos(pruned, state.shapes)) if changed else state.cost_before
    removable = state.lossless.removable() if state.lossless is not None else {}
    return PruneResult(
        model=pruned,
        groups=state.groups,
        plan=state.plan,
        options=options,
        analysis_shapes=state.shapes,
        params_before=state.cost_before.params,
        params_after=cost_after.params,
        macs_before=state.cost_before.macs,
        macs_after=cost_after.macs,
        size_before=state.size_before,
        size_after=pruned.ByteSize(),
        model_sha256=state.digest,
        budget_met=state.budget_met,
        left_alone=state.left_alone,
        outcome=describe_outcome(
            state.groups, state.plan, eligible=state.eligible, left_alone=state.left_alone, lossless=removable,
            round_to=options.round_to, min_keep=options.min_keep, target_macs=options.target_macs,
            budget=options.plan_path is None and (options.ratio is not None or options.target_macs is not None),
        ),
        recovery=state.recovery,
        evaluation=state.evaluation,
        sensitivity=state.sensitivity,
        step_seconds=dict(state.seconds),
        validation=state.validation,
    )


def measure_sensitivity(
    model: LoadedModel | onnx.ModelProto | str | os.PathLike[str],
    options: PruneOptions,
    *,
    calib: Dataset | None,
    eval_data: Dataset | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    input_shapes: Mapping[str | None, Sequence[int]] | None = None,
    max_samples: int | None = None,
    progress: Progress | None = None,
) -> SensitivityCurves:
    """`onnxslim sensitivity`: every prunable group's damage curve (`sensitivity.measure_curves`) for `model`,
    with the criterion and recovery of `options` (its budget fields are not used)."""
    if calib is None:
        raise UsageError("sensitivity measures damage on data: give --calib DATA")
    state = new_state(
        model, options, input_shapes=input_shapes, calib=calib, eval_data=eval_data, progress=progress,
        max_samples=max_samples,
    )
    run_pipeline(state, until="score")
    return measure_curves(state, ratios, progress=progress)
