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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim.activations import ChannelStats, Progress, channel_statistics
from onnxslim.analysis.cost import ModelCost, compute_cost
from onnxslim.analysis.groups import ChannelGroup, build_channel_groups
from onnxslim.calib import Dataset
from onnxslim.errors import DataError, UsageError, ValidationError, first_line
from onnxslim.graph import GraphIndex, collector_paused
from onnxslim.io import (
    LoadedModel,
    TensorInfo,
    Validation,
    infer_tensor_infos,
    load_model,
    normalize_model,
    resolve_input_shapes,
    validate,
)
from onnxslim.metrics import AccuracyMeter, FidelityMeter, is_classifier_output
from onnxslim.model_info import check_exclusions, refuse_quantized
from onnxslim.prune.importance import NEEDS_DATA, ScoreContext, score_groups, statistics_requests
from onnxslim.prune.lossless import LosslessChannels, find_lossless_channels, fold_constant_channels_into
from onnxslim.prune.outcome import PruneOutcome, describe_outcome
from onnxslim.prune.plan import (
    PrunePlan,
    eligible_groups,
    load_plan,
    model_sha256,
    plan_by_macs,
    plan_by_ratio,
)
from onnxslim.prune.recover import (
    HOLDOUT_EVERY,
    RECOVERY_METHODS,
    RecoverOptions,
    RecoveryReport,
    recover_model,
)
from onnxslim.prune.rewrite import apply_plan_to_graph, kept_output_channels
from onnxslim.runtime import cpu_session

__all__ = [
    "BlockedGroup",
    "OutputFidelity",
    "PIPELINE",
    "PruneOptions",
    "PruneResult",
    "PruneState",
    "prune_model",
]

logger = logging.getLogger(__name__)

COLLAPSE_COSINE = 0.9  # below this on any output (or 10 points of accuracy lost), the result is called broken


@dataclass(frozen=True)
class BlockedGroup:
    """A group that cannot be pruned, the node that blocks it and why."""

    group: str
    node: str | None
    reason: str


@dataclass(frozen=True)
class PruneOptions:
    """What to remove, how to choose it and how to recover. Exactly one of `ratio`, `target_macs` and
    `plan_path` (or none, with `lossless`). The library's defaults are the literal ones: nothing protected
    and exact channel counts (`round_to` 1); the command line turns on `protect_first` and `protect_last` and
    rounds to 8 (README). `recover` None: `lsq` when calibration data is given, else `none`."""

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
    recover: str | None = None
    ridge: float = 3e-2
    positions_per_weight: int = 8
    recover_memory: int = 1 << 30

    def __post_init__(self) -> None:
        budgets = [name for name in ("ratio", "target_macs", "plan_path") if getattr(self, name) is not None]
        if len(budgets) > 1:
            raise UsageError(f"choose one of --ratio, --target-macs and --plan, not {' and '.join(budgets)}")
        if not budgets and not self.lossless:
            raise UsageError("say how much to prune: --ratio, --target-macs, --plan or --lossless")
        if self.recover is not None and self.recover not in RECOVERY_METHODS:
            raise UsageError(f"unknown recovery {self.recover!r}; choose one of {', '.join(RECOVERY_METHODS)}")

    def recovery(self, calibrated: bool) -> str:
        """The recovery method in force: the one asked for, else `lsq` with calibration data, else `none`."""
        if self.recover is not None:
            return self.recover
        return "lsq" if calibrated else "none"


@dataclass(frozen=True)
class OutputFidelity:
    """One output of the pruned model against the original's on held-out data, before and after recovery."""

    output: str
    cosine_before: float
    cosine_after: float


@dataclass(frozen=True)
class Evaluation:
    """The whole model on held-out data: per-output cosine and, with labels, top-1 of each model."""

    data: str
    samples: int
    outputs: tuple[OutputFidelity, ...]
    accuracy_original: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None

    @property
    def collapsed(self) -> bool:
        """The recovered model is broken: an output's cosine under 0.9, or 10 points of accuracy lost."""
        if any(o.cosine_after < COLLAPSE_COSINE for o in self.outputs):
            return True
        return (
            self.accuracy_original is not None
            and self.accuracy_after is not None
            and self.accuracy_original - self.accuracy_after > 0.10
        )


@dataclass(frozen=True)
class PruneResult:
    """A pruned model and what changed: params, MACs and size before and after, groups and channels, and
    with calibration data how it was recovered and how close it stays to the original."""

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
    recovery: RecoveryReport | None = None
    evaluation: Evaluation | None = None
    step_seconds: Mapping[str, float] = field(default_factory=dict)
    validation: Validation | None = field(default=None, repr=False)  # what `validate` proved, for write_validated

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
    def recover(self) -> str:
        return self.recovery.method if self.recovery is not None else "none"

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


@dataclass
class PruneState:
    """Everything the steps share. Filled step by step; a field is None until its step has run.

    The model is imported once: `graph` (and `index`, its one GraphIndex) is the analysis graph that
    lossless search, statistics and scoring read; `compensate` and `rewrite` then edit that same graph in
    place, and `rewrite` consumes it (both are None afterwards, so that its weights do not stay in memory
    beside the pruned model's): later steps read `pruned`. `original` is never changed."""

    options: PruneOptions
    original: onnx.ModelProto  # normalized; never changed
    size_before: int
    digest: str
    input_shapes: Mapping[str | None, Sequence[int]] | None
    calib: Dataset | None = None
    eval_data: Dataset | None = None
    progress: Progress | None = None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    infos: dict[str, TensorInfo] = field(default_factory=dict)
    graph: gs.Graph | None = None
    index: GraphIndex | None = None
    groups: tuple[ChannelGroup, ...] = ()
    cost_before: ModelCost | None = None
    eligible: frozenset[str] = frozenset()
    left_alone: dict[str, str] = field(default_factory=dict)
    lossless: LosslessChannels | None = None
    forced: dict[str, Any] = field(default_factory=dict)
    statistics: Mapping[str, ChannelStats] | None = None
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    plan: PrunePlan = field(default_factory=PrunePlan)
    budget_met: bool = True
    folded_biases: int = 0
    pruned: onnx.ModelProto | None = None
    unrecovered: onnx.ModelProto | None = None
    recovery: RecoveryReport | None = None
    evaluation: Evaluation | None = None
    validation: Validation | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def recover_method(self) -> str:
        return self.options.recovery(self.calib is not None)

    def calibration_batches(self) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        assert self.calib is not None
        for batch in self.calib.batches():
            yield batch.feeds, batch.size


# ------------------------------------------------------------------------------------------------ steps


def analyse(state: PruneState) -> None:
    """Shapes, channel groups, MACs, and which groups the budget may touch."""
    options = state.options
    state.shapes = resolve_input_shapes(state.original, state.input_shapes)
    state.infos = infer_tensor_infos(state.original, state.shapes)
    state.graph = gs.import_onnx(state.original)
    state.index = GraphIndex(state.graph)
    state.groups = build_channel_groups(state.graph, {name: info.shape for name, info in state.infos.items()})
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
    if state.calib is None:
        raise UsageError(f"--criterion {state.options.criterion} needs calibration data: give --calib DATA")
    assert state.index is not None
    requests = statistics_requests(state.groups, state.index)
    state.statistics = channel_statistics(state.original, state.calib, requests, progress=state.progress)


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
    """Linear nodes reading a channel group (sinks, depthwise followers) downstream of a change."""
    changed = [g for g in state.groups if state.plan.changes(g)]
    seeds: set[str] = set()
    for group in changed:
        seeds |= {s.node for s in group.sources} | {s.node for s in group.sinks} | {f.node for f in group.followers}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in state.original.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    by_name = {node.name: node for node in state.original.graph.node}
    downstream, stack = set(seeds), list(seeds)
    while stack:
        node = by_name.get(stack.pop())
        for output in node.output if node is not None else ():
            for reader in readers.get(output, ()):
                if reader.name not in downstream:
                    downstream.add(reader.name)
                    stack.append(reader.name)
    candidates = {s.node for g in state.groups for s in g.sinks}
    candidates |= {f.node for g in state.groups for f in g.followers if f.op_type == "Conv"}
    return [node.name for node in state.original.graph.node if node.name in candidates & downstream]


def recover(state: PruneState) -> None:
    """Refit the layers that read pruned channels (recover.py), when calibration data is given."""
    method = state.recover_method
    if method != "none" and state.calib is None:
        raise UsageError(f"--recover {method} needs calibration data: give --calib DATA")
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


def _held_out(state: PruneState) -> tuple[str, Iterator[tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray]]]:
    """Evaluation batches: --eval data, else the calibration samples recovery held out (every fifth)."""
    if state.eval_data is not None:
        data = state.eval_data

        def batches() -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray]]:
            for batch in data.batches():
                yield batch.feeds, batch.labels, np.arange(batch.size)  # padding rows of a fixed batch go

        return data.description, batches()
    calib = state.calib
    assert calib is not None

    def held() -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray]]:
        first = 0
        for batch in calib.batches():
            rows = np.arange(batch.size)
            chosen = rows[(first + rows) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
            first += batch.size
            if len(chosen):
                labels = None if batch.labels is None else batch.labels[chosen]
                yield batch.feeds, labels, chosen

    return f"every {HOLDOUT_EVERY}th sample of {calib.description} (held out of recovery)", held()


def measure(state: PruneState) -> None:
    """The whole pruned model against the original on held-out data, before and after recovery."""
    if state.calib is None or state.pruned is None or state.pruned is state.original:
        return
    assert state.unrecovered is not None
    description, batches = _held_out(state)
    models = [state.original, state.unrecovered, state.pruned]
    try:
        sessions = [cpu_session(m) for m in models]
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ValidationError(f"a pruned model does not load in onnxruntime: {first_line(e)}") from e
    names = [o.name for o in state.original.graph.output]
    meters = [[FidelityMeter() for _ in names] for _ in range(2)]
    accuracy = [AccuracyMeter() for _ in models]
    labelled, samples = True, 0
    for feeds, labels, rows in batches:
        try:
            outputs = [session.run(names, feeds) for session in sessions]
        except Exception as e:  # noqa: BLE001
            raise DataError(f"the model fails on the evaluation data: {first_line(e)}") from e
        fed = len(next(iter(feeds.values())))

        def chosen(array: Any, rows: np.ndarray = rows, fed: int = fed) -> np.ndarray:
            # only an output whose first axis is the batch has rows to choose; a sequence-first output
            # ([T, N, C]) is compared whole
            array = np.asarray(array)
            return array[rows] if array.ndim and array.shape[0] == fed else array

        for which in range(2):
            for index in range(len(names)):
                meters[which][index].update(chosen(outputs[0][index]), chosen(outputs[which + 1][index]))
        first = chosen(outputs[0][0])
        if labels is None or not is_classifier_output(first.shape) or len(first) != len(labels):
            labelled = False
        elif labelled:
            for meter, out in zip(accuracy, outputs, strict=True):
                meter.update(chosen(out[0]), labels)
        samples += len(rows)
    if not samples:
        return
    fidelities = tuple(
        OutputFidelity(name, meters[0][i].result().cosine, meters[1][i].result().cosine) for i, name in enumerate(names)
    )
    tops = [meter.result().top1 for meter in accuracy] if labelled else [None, None, None]
    state.evaluation = Evaluation(description, samples, fidelities, *tops)
    if state.evaluation.collapsed:
        logger.warning(
            "the pruned model no longer works: %s on %s. Prune less (a higher --target-macs or lower --ratio), "
            "exclude the sensitive layers, or give more calibration data",
            _evaluation_text(state.evaluation), description,
        )


def _evaluation_text(evaluation: Evaluation) -> str:
    parts = [f"{o.output} cosine {o.cosine_after:.3f}" for o in evaluation.outputs]
    if evaluation.accuracy_after is not None and evaluation.accuracy_original is not None:
        parts.append(f"top-1 {100 * evaluation.accuracy_original:.1f}% → {100 * evaluation.accuracy_after:.1f}%")
    return ", ".join(parts)


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


def prune_model(
    model: LoadedModel | onnx.ModelProto | str | os.PathLike[str],
    options: PruneOptions | None = None,
    *,
    input_shapes: Mapping[str | None, Sequence[int]] | None = None,
    calib: Dataset | None = None,
    eval_data: Dataset | None = None,
    progress: Progress | None = None,
    **fields: Any,
) -> PruneResult:
    """Prune `model` as `options` say (or as keyword `fields` of PruneOptions, e.g. `ratio=0.3, round_to=8`).

    The model is analysed at concrete input shapes (`input_shapes`, else its static dims with batch 1);
    the pruned model keeps the original's symbolic dims. With `lossless`, dead channels go first and the
    budget applies to the rest. With `calib` (a `calib.open_dataset`), data-aware criteria can be used,
    the pruned layers are recovered (`recover`, default `lsq`), and the result is measured against the
    original on `eval_data` (else on calibration samples held out of recovery). Raises ValidationError if
    the result fails validation (a bug in onnxslim).
    """
    options = replace(options, **fields) if options is not None else PruneOptions(**fields)
    if options.criterion in NEEDS_DATA and calib is None and options.plan_path is None:
        raise UsageError(f"--criterion {options.criterion} needs calibration data: give --calib DATA")
    normalized, size_before, digest = _as_normalized(model)
    refuse_quantized(normalized)
    check_exclusions(normalized, options.exclude)
    state = PruneState(options, normalized, size_before, digest, input_shapes, calib, eval_data, progress)
    with collector_paused():  # linear time on big graphs (graph.py)
        for name, step in PIPELINE:
            started = time.perf_counter()
            step(state)
            state.seconds[name] = time.perf_counter() - started
        assert state.pruned is not None and state.cost_before is not None
        pruned = state.pruned
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
        size_before=size_before,
        size_after=pruned.ByteSize(),
        model_sha256=digest,
        budget_met=state.budget_met,
        left_alone=state.left_alone,
        outcome=describe_outcome(
            state.groups, state.plan, eligible=state.eligible, left_alone=state.left_alone, lossless=removable,
            round_to=options.round_to, min_keep=options.min_keep, target_macs=options.target_macs,
            budget=options.plan_path is None and (options.ratio is not None or options.target_macs is not None),
        ),
        recovery=state.recovery,
        evaluation=state.evaluation,
        step_seconds=dict(state.seconds),
        validation=state.validation,
    )

