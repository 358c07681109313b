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

from onnxslim.activations import ChannelStats, channel_statistics
from onnxslim.analysis.cost import ModelCost, compute_cost
from onnxslim.analysis.groups import ChannelGroup, build_channel_groups
from onnxslim.analysis.quantized import refuse_quantized
from onnxslim.calib import Batch, Dataset
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
from onnxslim.metrics import (
    AccuracyMeter,
    Fidelity,
    FidelityMeter,
    OutputLayout,
    has_one_position,
    layout_of,
)
from onnxslim.model_info import check_exclusions
from onnxslim.progress import Progress
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
from onnxslim.prune.sensitivity import ALLOCATION_RATIOS, SensitivityCurves, allocate, measure_curves
from onnxslim.runtime import cpu_session

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
]

logger = logging.getLogger(__name__)

ALLOCATIONS = ("global", "sensitivity")
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
    allocate: str = "global"  # or "sensitivity": per-group cuts from measured damage (sensitivity.py)

    def __post_init__(self) -> None:
        budgets = [name for name in ("ratio", "target_macs", "plan_path") if getattr(self, name) is not None]
        if len(budgets) > 1:
            raise UsageError(f"choose one of --ratio, --target-macs and --plan, not {' and '.join(budgets)}")
        if not budgets and not self.lossless:
            raise UsageError("say how much to prune: --ratio, --target-macs, --plan or --lossless")
        if self.allocate not in ALLOCATIONS:
            raise UsageError(f"unknown allocation {self.allocate!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.allocate == "sensitivity" and self.target_macs is None:
            raise UsageError("--allocate sensitivity spends a MAC budget: give --target-macs")
        if self.recover is not None and self.recover not in RECOVERY_METHODS:
            raise UsageError(f"unknown recovery {self.recover!r}; choose one of {', '.join(RECOVERY_METHODS)}")

    def recovery(self, calibrated: bool) -> str:
        """The recovery method in force: the one asked for, else `lsq` with calibration data, else `none`."""
        if self.recover is not None:
            return self.recover
        return "lsq" if calibrated else "none"


@dataclass(frozen=True)
class OutputFidelity:
    """One output of the pruned model against the original's on held-out data, before and after recovery:
    the cosine score (the lower of the mean cosine and the worst output channel's, `Fidelity.score`) and,
    where the output has a class axis, the share of positions whose top-1 class agrees (every time step of
    a `[T, N, C]` recognizer output, for instance)."""

    output: str
    cosine_before: float
    cosine_after: float
    agreement_before: float | None = None
    agreement_after: float | None = None


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
        """The recovered model is broken: an output's cosine or top-1 agreement under 0.9, or 10 points of
        accuracy lost."""
        if any(not o.cosine_after >= COLLAPSE_COSINE for o in self.outputs):  # NaN (a broken output) too
            return True
        if any(o.agreement_after is not None and o.agreement_after < COLLAPSE_COSINE for o in self.outputs):
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
    sensitivity: SensitivityCurves | None = None  # with --allocate sensitivity: the curves it allocated by
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
    max_samples: int | None = None  # of calibration (and evaluation) data used, None: all
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
    sensitivity: SensitivityCurves | None = None
    validation: Validation | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def recover_method(self) -> str:
        return self.options.recovery(self.calib is not None)

    def calibration_batches(self) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        assert self.calib is not None
        for batch in _limited(self.calib, self.max_samples):
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
    calib = state.calib
    state.statistics = channel_statistics(
        state.original, calib, requests, batches=lambda: _limited(calib, state.max_samples),
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
        if state.calib is None:
            raise UsageError("--allocate sensitivity measures each group's damage on data: give --calib DATA")
        assert state.cost_before is not None
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


def _limited(data: Dataset, samples: int | None) -> Iterator[Batch]:
    """The batches of `data` up to `samples` samples: the last one cut (a fixed batch keeps its rows and
    marks the rest as padding)."""
    seen = 0
    for batch in data.batches():
        if samples is not None and seen >= samples:
            return
        if samples is not None and seen + batch.size > samples:
            keep = samples - seen
            feeds = batch.feeds if data.fixed_batch else {name: array[:keep] for name, array in batch.feeds.items()}
            batch = Batch(feeds, None if batch.labels is None else batch.labels[:keep], keep)
        seen += batch.size
        yield batch


def held_out_batches(state: PruneState) -> tuple[str, Iterator[tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray]]]:
    """(description, batches of (feeds, labels or None, evaluated rows)) that `measure` compares on: --eval
    data, else the calibration samples recovery held out (every fifth)."""
    if state.eval_data is not None:
        data = state.eval_data

        def batches() -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray]]:
            for batch in _limited(data, state.max_samples):
                yield batch.feeds, batch.labels, np.arange(batch.size)  # padding rows of a fixed batch go

        return data.description, batches()
    calib = state.calib
    assert calib is not None

    def held() -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray]]:
        first = 0
        for batch in _limited(calib, state.max_samples):
            rows = np.arange(batch.size)
            chosen = rows[(first + rows) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
            first += batch.size
            if len(chosen):
                labels = None if batch.labels is None else batch.labels[chosen]
                yield batch.feeds, labels, chosen

    return f"every {HOLDOUT_EVERY}th sample of {calib.description} (held out of recovery)", held()


class HeldOut:
    """The held-out batches (`held_out_batches`), the original's outputs on them with each output's layout
    (batch axis found, not assumed; class and channel axes, `metrics.output_layout`), and a comparison of
    candidates against them. The original's outputs are kept while they fit in `cache_bytes`."""

    def __init__(self, state: PruneState, *, cache_bytes: int = 256 << 20) -> None:
        self.original = state.original
        self.description, batches = held_out_batches(state)
        self.batches = list(batches)
        self.names = [o.name for o in self.original.graph.output]
        self.samples = sum(len(rows) for _, _, rows in self.batches)
        self._session = _session(self.original)
        self._cache: list[list[np.ndarray] | None] = []
        self.layouts: list[OutputLayout] = []
        left = cache_bytes
        for feeds, _, rows in self.batches:
            produced = self._run_original(feeds)
            if not self.layouts:
                self.layouts = [self._layout(name, feeds, out) for name, out in zip(self.names, produced, strict=True)]
            chosen = self._select(produced, feeds, rows)
            size = sum(a.nbytes for a in chosen)
            self._cache.append(chosen if size <= left else None)
            left -= size if size <= left else 0
        self.labelled = bool(self.batches) and all(labels is not None for _, labels, _ in self.batches) and (
            has_one_position(np.shape(self.reference(0)[0]), self.layouts[0]) if self.layouts else False
        )
        self.accuracy_original = self._accuracy([self.reference(i) for i in range(len(self.batches))])

    def _run_original(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return [np.asarray(o) for o in self._session.run(self.names, dict(feeds))]
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise DataError(f"the model fails on the evaluation data: {first_line(e)}") from e

    def _layout(self, name: str, feeds: Mapping[str, np.ndarray], produced: np.ndarray) -> OutputLayout:
        return layout_of(self.original, name, produced, feeds, lambda resized: self._session.run([name], dict(resized))[0])

    def _select(self, outputs: Sequence[np.ndarray], feeds: Mapping[str, np.ndarray], rows: np.ndarray) -> list[np.ndarray]:
        """The evaluated rows of each output, on its own batch axis (a whole output when it has none)."""
        fed = len(next(iter(feeds.values())))
        chosen = []
        for array, layout in zip(outputs, self.layouts, strict=True):
            axis = layout.batch_axis
            if axis is not None and array.ndim > axis and array.shape[axis] == fed and len(rows) < fed:
                array = np.take(array, rows, axis=axis)
            chosen.append(array)
        return chosen

    def reference(self, index: int) -> list[np.ndarray]:
        cached = self._cache[index]
        if cached is not None:
            return cached
        feeds, _, rows = self.batches[index]
        return self._select(self._run_original(feeds), feeds, rows)

    def _accuracy(self, outputs: Sequence[Sequence[np.ndarray]]) -> float | None:
        if not self.labelled:
            return None
        meter = AccuracyMeter(self.layouts[0])
        for (_, labels, _), produced in zip(self.batches, outputs, strict=True):
            assert labels is not None
            meter.update(produced[0], labels)
        return meter.result().top1

    def compare(self, model: onnx.ModelProto, progress: Progress | None = None) -> tuple[list[Fidelity], float | None]:
        """Each output's fidelity against the original, and top-1 with labels (one pass of `model`)."""
        session = _session(model)
        meters = [FidelityMeter(layout) for layout in self.layouts]
        produced_all = []
        for index, (feeds, _, rows) in enumerate(self.batches):
            try:
                produced = self._select([np.asarray(o) for o in session.run(self.names, dict(feeds))], feeds, rows)
            except Exception as e:  # noqa: BLE001
                raise DataError(f"the pruned model fails on the evaluation data: {first_line(e)}") from e
            for meter, want, got in zip(meters, self.reference(index), produced, strict=True):
                meter.update(want, got)
            produced_all.append(produced if self.labelled else [])
            if progress is not None:
                progress("evaluating", index + 1, len(self.batches))
        return [meter.result() for meter in meters], self._accuracy(produced_all)


def _session(model: onnx.ModelProto) -> Any:
    try:
        return cpu_session(model)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ValidationError(f"a model does not load in onnxruntime: {first_line(e)}") from e


def measure(state: PruneState) -> None:
    """The whole pruned model against the original on held-out data, before and after recovery."""
    if state.calib is None or state.pruned is None or state.pruned is state.original:
        return
    assert state.unrecovered is not None
    held = HeldOut(state)
    if not held.samples:
        return
    before, accuracy_before = held.compare(state.unrecovered, state.progress)
    after, accuracy_after = (
        (before, accuracy_before) if state.pruned is state.unrecovered else held.compare(state.pruned, state.progress)
    )
    fidelities = tuple(
        OutputFidelity(name, b.score, a.score, b.top1_agreement, a.top1_agreement)
        for name, b, a in zip(held.names, before, after, strict=True)
    )
    state.evaluation = Evaluation(
        held.description, held.samples, fidelities, held.accuracy_original, accuracy_before, accuracy_after
    )


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


def run_pipeline(state: PruneState, *, until: str | None = None) -> PruneState:
    """Run the steps of `PIPELINE` on `state`, all of them or up to and including `until`."""
    with collector_paused():  # linear time on big graphs (graph.py)
        for name, step in PIPELINE:
            started = time.perf_counter()
            step(state)
            state.seconds[name] = time.perf_counter() - started
            if name == until:
                break
    return state


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
    if options.criterion in NEEDS_DATA and calib is None and options.plan_path is None:
        raise UsageError(f"--criterion {options.criterion} needs calibration data: give --calib DATA")
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
    with collector_paused():  # linear time on big graphs (graph.py)
        run_pipeline(state)
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

