"""Static int8 quantization with onnxruntime, made safe for real exported models: a speed guard keeps the
fp32 model when int8 is not faster on this machine, and the result says how close int8 stays to fp32.

The steps, and why each one is here:

* **Refuse quantized inputs.** QDQ pairs, QLinear*, ConvInteger, MatMulInteger, DynamicQuantizeLinear ...:
  quantizing twice is never what the user wants.
* **Pre-processing** that works on dynamic shapes (onnxruntime's `quant_pre_process` fails on them):
  the model as `io.load_model` normalized it (weights held in `Constant` nodes are initializers, so they
  get quantized); opset raised to 13 when per-channel weights need DequantizeLinear's `axis` (per-tensor
  with a warning when the upgrade fails); onnxruntime's *basic* graph optimizations (constant folding,
  Conv+BatchNorm/Add/Mul fusion, redundant node removal: all plain ONNX ops, no hardware-specific layout);
  then onnx shape inference on the symbolic model, so the quantizer knows every tensor's type while the
  saved model keeps its symbolic dims.
* **Calibration in bounded memory.** onnxruntime's calibrators keep what they collect from every batch of
  one `collect_data` call until it ends: entropy and percentile keep every calibrated tensor whole, minmax a
  min and a max per tensor. We call it once per chunk of batches and let it merge (histograms, ranges), so
  it holds at most `chunk` batches, `chunk = max(1, calibration_memory // bytes kept per batch)`, with
  `calibration_memory` 256 MiB by default: memory stays within that bound (or one batch, if larger),
  whatever the number of samples. A chunk never mixes batch shapes (the histogram calibrators stack one
  call's outputs). Ranges are computed once and shared by every candidate below.
* **Speed guard** (`quant_speed.py`, whose docstring has the rules). The requested configuration is timed
  against the fp32 model (same threads, same batch, interleaved run by run, median, and the ratio on each
  of 5 blocks of the run). Unless it is clearly at least `min_speedup` (5 %) faster — at the median and
  faster in every block; an uncertain verdict is re-timed once, longer — alternatives are tried one change
  at a time, in this order, each kept only when clearly faster than the best so far: the other
  activation type (u8 <-> s8; onnxruntime fuses only some variants into QLinearConv on a given CPU), the
  other format (QDQ <-> QOperator), per-tensor weights, and quantizing only the compute ops (Conv,
  ConvTranspose, Gemm, MatMul) so that element-wise ops stop paying Q/DQ overhead. When no candidate is
  clearly `min_speedup` faster, the result is the fp32 model (`quantized` False) unless `force`.
  Timing sessions run with thread spinning off: an idle session's spinning workers otherwise steal the
  cores from the session timed next (two identical models measured 0.70x-1.30x apart that way; without
  spinning within 1.5 %, 8 runs each on a busy 2-core machine). 5 % is over three times that noise, and an
  int8 model costs accuracy, so it has to win clearly.
* **CPU-aware defaults** (`cpu.py`): without VNNI/AMX, u8 x s8 products saturate in int16, so weights are
  7-bit (`reduce_range`) there and when the CPU is unknown; full 8-bit with VNNI. `reduce_range` given
  explicitly wins. The choice and why are in the result (`cpu`).
* **Fidelity** of the int8 model against fp32 on data not used for calibration: the last
  `holdout_fraction` (20 %) of the calibration batches, or all of `eval_data` when given (then every
  calibration batch calibrates). Every element of the output is compared, whatever axis holds the batch
  (`metrics.find_batch_axis`), with the worst channel's cosine besides the mean. Accuracy of both when
  that data has labels and the output is a classifier's.
* **Accuracy guard** (`quant_guard.py`): the int8 model must meet an accuracy budget (default: cosine
  0.99, mean and worst channel). Concats joining very different ranges stay fp32 from the start; when
  the budget is missed, the other calibration methods are tried, then the roundings that hurt most, each
  measured alone (`quant_sensitivity.py`), are kept in fp32 with the nodes that touch them, fewest first,
  within `max_trials` trials. The speed guard then
  runs on that set of nodes: only candidates that meet the budget can be kept.

**The pipeline.** `quantize_model` runs `PIPELINE`, named steps over one `QuantState`, as `prune/pruner.py`
does:

    prepare → range rules → plain int8 → other methods → fp32 fallback → speed → validate

Each step is a function `step(state) -> None` that reads what earlier steps left and adds its part; a step
with nothing to do returns at once (the budget met by plain int8: `other methods` and `fp32 fallback` do
nothing). The state owns the shared work: each calibration method's ranges are computed once
(`QuantState.calibrated`), every trial requantizes from them (`QuantState.trial`), and every int8 model is
judged once (`QuantState.judge`, through `evaluate.Evaluator`). To add a remedy, write its step, give the
state the fields it fills, and put it in `PIPELINE` before `speed`. Each step's wall time is in the result.

The library never prints: progress goes through an optional callback, results are dataclasses that
`report/quantize.py` renders. The concerns live in their own modules of this package (its `__init__`).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from onnxslim.analysis.quantized import refuse_quantized
from onnxslim.calib import Dataset
from onnxslim.cpu import CpuChoice, choose_for_cpu, detect_cpu
from onnxslim.errors import DataError, UnsupportedModelError, UsageError, first_line
from onnxslim.evaluate import (
    AccuracyBudget,
    BudgetCheck,
    Evaluator,
    HeldOut,
    budget_resolution_note,
    check_budget,
    hold_out_tail,
)
from onnxslim.graph import ProtoIndex
from onnxslim.io import LoadedModel, Validation, normalize_model, validate
from onnxslim.metrics import (
    Accuracy,
    Fidelity,
    select_output,
)
from onnxslim.progress import Progress
from onnxslim.quant.calibrate import calibrate
from onnxslim.quant.config import (
    FORMAT_NAMES,
    METHOD_NAMES,
    ORT_METADATA,
    QUANT_TYPE_NAMES,
    CalibrationSummary,
    CandidateTiming,
    InterleavedTiming,
    MethodTrial,
    PreparedModel,
    QuantConfig,
    QuantizeOptions,
    QuantizeResult,
    SpeedDecision,
    Timer,
    TimingBudget,
)
from onnxslim.quant.guard import (
    ExclusionTrial,
    NodeError,
    concat_range_offenders,
    first_count_within,
    layer_norm_blocks,
    nonfinite_offenders,
    predicted_deficits,
    rank_gates,
    search_exclusions,
    target_deficit,
)
from onnxslim.quant.prepare import (
    QUANTIZE_ADVICE,
    declare_like,
    default_opset,
    prepare_model,
    strip_unused_domains,
)
from onnxslim.quant.sensitivity import gated_model, measure_gate_deficits
from onnxslim.quant.speed import measure_latencies, search_fastest
from onnxslim.runtime import open_session, physical_cores, quiet_onnxruntime

__all__ = ["quantize_with_ranges", "count_quantized_nodes", "quantize_model"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- quantization


def quantize_with_ranges(
    prepared_path: str | os.PathLike[str],
    cache_path: str | os.PathLike[str],
    config: QuantConfig,
    method: str,
    *,
    exclude_nodes: Sequence[str] = (),
    keep_activations: bool = False,
) -> onnx.ModelProto:
    """Quantize the prepared model file with ranges from `calibrate`, as `config` says. `keep_activations`:
    Relu/Clip stay explicit instead of being folded into their QuantizeLinear (QDQ; for `gated_model`).

    Raises UnsupportedModelError when onnxruntime's quantizer fails.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory(prefix="onnxslim-q-") as scratch, quiet_onnxruntime():
        output = Path(scratch) / "int8.onnx"
        try:
            quantize_static(
                str(prepared_path),
                str(output),
                calibration_data_reader=None,
                quant_format=getattr(QuantFormat, FORMAT_NAMES[config.format]),
                op_types_to_quantize=list(config.op_types) if config.op_types is not None else None,
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                activation_type=getattr(QuantType, QUANT_TYPE_NAMES[config.activations]),
                weight_type=getattr(QuantType, QUANT_TYPE_NAMES[config.weights]),
                nodes_to_exclude=list(exclude_nodes),
                calibrate_method=getattr(CalibrationMethod, METHOD_NAMES[method]),
                calibration_cache_path=str(cache_path),
                extra_options={"QDQKeepRemovableActivations": True} if keep_activations else None,
            )
        except Exception as e:  # noqa: BLE001 - the quantizer raises anything from ValueError to AssertionError
            raise UnsupportedModelError(f"onnxruntime's quantizer failed ({config.label}): {first_line(e)}") from e
        quantized = onnx.load_model(str(output))
    strip_unused_domains(quantized)
    kept = [p for p in quantized.metadata_props if p.key not in ORT_METADATA]
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(kept)
    return quantized


def _quantized_op_types(config: QuantConfig) -> frozenset[str]:
    if config.op_types is not None:
        return frozenset(config.op_types)
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return frozenset(QLinearOpsRegistry) | frozenset(QDQRegistry)


def count_quantized_nodes(
    fp32: onnx.ModelProto, int8: onnx.ModelProto, config: QuantConfig, exclude_nodes: Sequence[str] = ()
) -> tuple[int, int]:
    """(quantized, fp32) counts over the nodes of the prepared fp32 model.

    Excluded nodes are fp32. Another node counts as quantized when the quantizer replaced it (QOperator
    renames it `<name>_quant`), folded it into its neighbours (Relu/Clip in QDQ), or, still present, it reads
    int8 data: in QDQ an op type the quantizer handles with an input from DequantizeLinear; in QOperator an
    input that is a quantized tensor.
    """
    index = ProtoIndex(int8.graph)
    by_name, producers = index.nodes, index.producers
    op_types = _quantized_op_types(config)
    excluded = set(exclude_nodes)
    quantized = 0
    for node in fp32.graph.node:
        if node.name in excluded:
            continue
        twin = by_name.get(node.name)
        if twin is None or twin.op_type != node.op_type:
            quantized += 1
        elif config.format == "qdq":
            if twin.op_type in op_types and any(
                (p := producers.get(i)) is not None and p.op_type == "DequantizeLinear" for i in twin.input
            ):
                quantized += 1
        elif any(i.endswith("_quantized") for i in twin.input):
            quantized += 1
    return quantized, len(fp32.graph.node) - quantized


# ------------------------------------------------------------------------------------------- fidelity


# ---------------------------------------------------------------------------------------- the command


def _resolve_exclusions(patterns: Sequence[str], models: Sequence[onnx.ModelProto], prepared: onnx.ModelProto) -> list[str]:
    """Node names (in the prepared model) that `--exclude` patterns select: op types or node-name globs."""
    op_types = {n.op_type for m in models for n in m.graph.node}
    names = [n.name for m in models for n in m.graph.node]
    excluded: list[str] = []
    for pattern in patterns:
        if pattern in op_types:
            excluded += [n.name for n in prepared.graph.node if n.op_type == pattern]
            continue
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise UsageError(
                f"--exclude {pattern!r} matches no node name and no op type of the model "
                f"(op types: {', '.join(sorted(op_types))})"
            )
        excluded += [n.name for n in prepared.graph.node if fnmatch.fnmatchcase(n.name, pattern)]
    return sorted(set(excluded))


def _size(model: onnx.ModelProto) -> int:
    return model.ByteSize()


class _Candidates:
    """Builds int8 candidates from the shared ranges (once each) and times them against fp32."""

    def __init__(
        self,
        source: onnx.ModelProto,
        prepared: onnx.ModelProto,
        prepared_path: Path,
        cache_path: Path,
        *,
        method: str,
        exclude_nodes: Sequence[str],
        threads: int,
        timer: Timer,
        feeds: Mapping[str, np.ndarray],
        progress: Progress | None,
    ) -> None:
        self._source, self._prepared, self._prepared_path, self._cache_path = source, prepared, prepared_path, cache_path
        self._method, self._exclude, self._threads = method, list(exclude_nodes), threads
        self._timer, self._feeds, self._progress = timer, feeds, progress
        self.built: dict[QuantConfig, onnx.ModelProto | UnsupportedModelError] = {}

    def build(self, config: QuantConfig) -> onnx.ModelProto | UnsupportedModelError:
        """The int8 model for `config`, or why there is none."""
        if config in self.built:
            return self.built[config]
        if self._progress is not None:
            self._progress("quantizing", len(self.built) + 1, len(self.built) + 1)
        result: onnx.ModelProto | UnsupportedModelError
        try:
            result = quantize_with_ranges(
                self._prepared_path, self._cache_path, config, self._method, exclude_nodes=self._exclude
            )
            declare_like(result, self._source)
            open_session(result, self._threads)  # a candidate onnxruntime cannot load is no candidate
            if self.count(config, result)[0] == 0:
                ops = sorted({n.op_type for n in self._prepared.graph.node})
                result = UnsupportedModelError(
                    f"onnxruntime's quantizer leaves every node of this model in fp32 (op types: {', '.join(ops)})"
                )
        except UnsupportedModelError as e:
            result = e
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            result = UnsupportedModelError(f"onnxruntime cannot load the int8 model ({config.label}): {first_line(e)}")
        if isinstance(result, UnsupportedModelError):
            logger.info("%s", result)
        self.built[config] = result
        return result

    def count(self, config: QuantConfig, model: onnx.ModelProto) -> tuple[int, int]:
        return count_quantized_nodes(self._prepared, model, config, self._exclude)

    def measure(self, configs: Sequence[QuantConfig], budget: TimingBudget) -> list[CandidateTiming]:
        """Build `configs` and time those that built against fp32, in one run of about `budget`."""
        models = {config: self.build(config) for config in configs}
        good = [config for config in configs if isinstance(models[config], onnx.ModelProto)]
        entries: list[tuple[QuantConfig | None, onnx.ModelProto]] = [(None, self._source)]
        entries += [(config, models[config]) for config in good]  # type: ignore[misc]
        latencies = list(self._timer(entries, self._feeds, budget)) if good else []
        timings = []
        for config in configs:
            model = models[config]
            if isinstance(model, UnsupportedModelError):
                timings.append(CandidateTiming(config, None, None, error=str(model)))
                continue
            timed = latencies[1 + good.index(config)]
            timings.append(
                CandidateTiming(
                    config, timed.median_ms, latencies[0].median_ms, _size(model), self.count(config, model)[0],
                    block_speedups=timed.block_speedups,
                )
            )
        return timings


def _load_ranges(cache_path: Path) -> dict[str, tuple[float, float]]:
    """The calibrated (low, high) of every tensor, from the cache `calibrate` wrote."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    ranges = {}
    for name, data in load_tensors_data(cache_path).items():
        low, high = data.range_value
        ranges[name] = (float(np.min(low)), float(np.max(high)))
    return ranges


@dataclass(frozen=True)
class _Kept:
    """What the measured search keeps in fp32: the nodes (with their measured deficit and why), its trials."""

    nodes: dict[str, NodeError]
    trials: tuple[ExclusionTrial, ...]
    note: str


def _keep_harmful_fp32(
    prepared: onnx.ModelProto,
    qdq: onnx.ModelProto,
    excluded: Sequence[str],
    config: QuantConfig,
    budget: AccuracyBudget,
    plain: BudgetCheck,
    evaluator: Evaluator,
    calib: Dataset,
    trial: Callable[[Sequence[str]], BudgetCheck],
    trials_left: int,
    *,
    threads: int,
    progress: Progress | None,
) -> _Kept:
    """The accuracy guard's search (quant_guard module docstring): every rounding of `qdq` (the int8 model,
    `excluded` nodes already fp32) measured alone, blocks ranked by it, the search started where their
    summed deficits meet the budget; `trial(nodes)` quantizes with `nodes` fp32 too and checks the budget."""
    kinds = {n.name: n.op_type for n in prepared.graph.node}
    types = _quantized_op_types(config)
    quantizable = [n.name for n in prepared.graph.node if n.op_type in types and n.name not in excluded]
    gated, gates = gated_model(qdq, prepared, quantizable)
    deficits, samples = measure_gate_deficits(
        gated, gates, calib.batches(), evaluator.outputs, evaluator.ensure_layouts(), evaluator.rows,
        threads=threads, progress=progress,
    )
    norms = layer_norm_blocks(prepared)
    norm_members = {name for block in norms for name in block}
    ranked = rank_gates(deficits, gates, norms, quantizable)
    target = target_deficit(budget, plain)
    start = 1 if target is None else first_count_within(predicted_deficits(ranked, gates, deficits), target)
    search = search_exclusions(ranked, trial, trials_left, start=start)
    count = search.blocks
    if count is None and search.trials:  # nothing met the budget: the most faithful set tried
        count = max(search.trials, key=lambda t: t.check.score).blocks
    by_name = {g.name: g for g in gates}
    kept: dict[str, NodeError] = {}
    for block in ranked[: count or 0]:
        gate = by_name[block.gate]
        what = f"the weights of {gate.name}" if gate.kind == "weights" else f"tensor {gate.name!r}"
        for name in block.nodes:
            if name in norm_members and name not in gate.touchers:
                why = "part of a decomposed LayerNorm kept in fp32 whole"
            else:
                why = f"int8 at {what} alone costs {block.error:.3g} of fidelity"
            kept.setdefault(name, NodeError(name, kinds.get(name, "?"), block.error, why))
    note = f"{len(gates)} roundings measured alone on {samples} calibration sample(s); search started at {start} of {len(ranked)} block(s)"
    return _Kept(kept, search.trials, note)


# ---------------------------------------------------------------------------------------- the pipeline

_Key = tuple[QuantConfig, str, tuple[str, ...]]  # (configuration, calibration method, nodes kept fp32)


@dataclass(frozen=True)
class _Judged:
    """One int8 model against fp32: the worst judged output, its fidelity, both accuracies, the check."""

    output: str
    fidelity: Fidelity
    accuracy_fp32: Accuracy | None
    accuracy_int8: Accuracy | None
    check: BudgetCheck


@dataclass
class QuantState:
    """Everything the quantizer's steps share (`PIPELINE`); a field is filled by the step that needs it.

    The calibration ranges of each method are computed once (`calibrated`) and every trial requantizes from
    them; every int8 model built is judged once (`judge`, remembered by configuration, method and the nodes
    kept fp32)."""

    options: QuantizeOptions
    source: onnx.ModelProto  # normalized; never changed
    size_fp32: int
    calib: Dataset
    eval_data: Dataset | None
    scratch: Path  # prepared model and ranges files, for the run's length
    progress: Progress | None = None
    timer: Timer | None = None
    notes: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    cpu: CpuChoice | None = None
    config: QuantConfig = field(default_factory=QuantConfig)
    prepared: PreparedModel | None = None
    user_excluded: list[str] = field(default_factory=list)
    split: HeldOut | None = None
    threads: int = 1
    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    judged_outputs: list[str] = field(default_factory=list)
    evaluator: Evaluator | None = None
    calibrations: dict[str, tuple[Path, CalibrationSummary]] = field(default_factory=dict)
    judgements: dict[_Key, _Judged] = field(default_factory=dict)
    rule_nodes: list[NodeError] = field(default_factory=list)  # kept fp32 by the range rules
    base_excluded: list[str] = field(default_factory=list)  # --exclude and the range rules
    method: str = "minmax"
    trials_left: int = 0
    method_trials: list[MethodTrial] = field(default_factory=list)
    exclusion_trials: tuple[ExclusionTrial, ...] = ()
    guarded: dict[str, NodeError] = field(default_factory=dict)  # kept fp32 by the measured search
    guard_note: str | None = None
    excluded: list[str] = field(default_factory=list)  # every node kept fp32 in the end
    candidates: _Candidates | None = None
    decision: SpeedDecision | None = None
    tried: tuple[CandidateTiming, ...] = ()
    validation: Validation | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def prepared_path(self) -> Path:
        return self.scratch / "prepared.onnx"

    @property
    def model(self) -> onnx.ModelProto:
        assert self.prepared is not None
        return self.prepared.model

    def calibrated(self, method: str) -> tuple[Path, CalibrationSummary]:
        """The ranges file and summary of `method`, calibrated once per run."""
        if method not in self.calibrations:
            assert self.split is not None
            path = self.scratch / f"ranges-{method}.json"
            summary = calibrate(
                self.model, self.calib, method, batches=self.split.calibration_batches,
                memory=self.options.calibration_memory, cache_path=path, progress=self.progress,
            )
            self.calibrations[method] = (path, summary)
        return self.calibrations[method]

    def build(self, method: str, nodes: Sequence[str]) -> onnx.ModelProto:
        """The int8 model of the configuration in force with `method`'s ranges, `nodes` kept fp32."""
        int8 = quantize_with_ranges(self.prepared_path, self.calibrated(method)[0], self.config, method, exclude_nodes=nodes)
        declare_like(int8, self.source)
        return int8

    def judge(self, int8: onnx.ModelProto, key: _Key) -> _Judged:
        """`int8` against fp32 on the held-out data: every output judged, the budget reads the worst."""
        if key not in self.judgements:
            assert self.evaluator is not None
            comparison = self.evaluator.compare(int8, "the int8 model")
            fidelity = comparison.fidelities[comparison.worst]
            check = check_budget(
                self.options.budget, fidelity, comparison.accuracy_original, comparison.accuracy, comparison.paired
            )
            self.judgements[key] = _Judged(
                self.judged_outputs[comparison.worst], fidelity, comparison.accuracy_original, comparison.accuracy, check
            )
        return self.judgements[key]

    def trial(self, method: str, nodes: Sequence[str]) -> BudgetCheck:
        """Requantize with `method`'s ranges and `nodes` fp32, and check the budget (no new calibration)."""
        key = (self.config, method, tuple(sorted(nodes)))
        if key in self.judgements:
            return self.judgements[key].check
        try:
            int8 = self.build(method, nodes)
        except UnsupportedModelError as e:
            return BudgetCheck(False, -1.0, None, str(e))
        except DataError as e:
            if method == self.options.method:
                raise  # the method asked for cannot calibrate on this data: the user must know
            # another method tried by the guard: its calibrator failed (a histogram of infinite values)
            return BudgetCheck(False, -1.0, None, f"{method} calibration failed: {first_line(e)}")
        return self.judge(int8, key).check


# ------------------------------------------------------------------------------------------------ steps


def prepare(state: QuantState) -> None:
    """Pre-process the model (prepare.py), resolve the configuration for this CPU, the exclusions, which
    data calibrates and which judges, and the outputs judged."""
    options, source, calib = state.options, state.source, state.calib
    state.shapes = dict(calib.input_shapes)
    output = select_output(source, options.output)
    if calib.is_random:
        state.notes.append("calibration data is random: the ranges, fidelity and accuracy mean nothing (smoke test only)")
    state.cpu = choose_for_cpu(options.cpu or detect_cpu(), options.config.reduce_range)
    state.prepared = prepare_model(source, state.shapes, per_channel=options.config.per_channel)
    state.notes += state.prepared.notes
    onnx.save_model(state.prepared.model, str(state.prepared_path))
    state.config = replace(options.config, reduce_range=state.cpu.reduce_range)
    if state.config.per_channel and not state.prepared.per_channel:
        state.config = replace(state.config, per_channel=False)
    state.user_excluded = _resolve_exclusions(options.exclude, [source, state.model], state.model)
    state.split = hold_out_tail(calib, state.eval_data, options.holdout_fraction)
    if state.split.note:
        state.notes.append(state.split.note)
    if options.budget.max_drop is not None and not state.split.labelled:
        raise UsageError("--max-drop needs labels in the evaluation data (--eval, or --calib with labels); "
                         "without labels use --min-fidelity")
    resolution = budget_resolution_note(options.budget, state.split.samples)
    if resolution:
        logger.warning("%s", resolution)
        state.notes.append(resolution)
    state.threads = options.threads or physical_cores()
    state.feeds = next(iter(calib.batches())).feeds
    # every output is judged (a sentence encoder's embedding is its second output): the budget reads the
    # worst one; accuracy reads the first (or --output)
    others = [] if options.output is not None else [o.name for o in source.graph.output if o.name != output]
    state.judged_outputs = [output, *others]
    state.evaluator = Evaluator(source, state.split, state.judged_outputs, threads=state.threads, progress=state.progress)


def apply_range_rules(state: QuantState) -> None:
    """Calibrate with the method asked for; Concats joining very different ranges and tensors with infinite
    ranges stay fp32 from the start (guard.py)."""
    options = state.options
    path, summary = state.calibrated(options.method)
    if options.range_ratio is not None:
        state.rule_nodes = [
            e for e in concat_range_offenders(state.model, _load_ranges(path), options.range_ratio)
            if e.name not in state.user_excluded
        ]
    ruled = {r.name for r in state.rule_nodes}
    state.rule_nodes += [
        e for e in nonfinite_offenders(state.model, summary.infinite_ranges)
        if e.name not in state.user_excluded and e.name not in ruled
    ]
    state.base_excluded = sorted({*state.user_excluded, *(e.name for e in state.rule_nodes)})
    state.method = options.method
    state.trials_left = options.max_trials


def try_plain(state: QuantState) -> None:
    """int8 everywhere the rules allow, with the method asked for, checked against the budget."""
    state.method_trials = [MethodTrial(state.method, state.trial(state.method, state.base_excluded))]


def try_other_methods(state: QuantState) -> None:
    """When the budget is missed: the other calibration methods, one trial each; the best is kept."""
    if state.method_trials[0].check.met or not state.trials_left:
        return
    for other in (m for m in ("percentile", "entropy", "minmax") if m != state.method):
        if not state.trials_left:
            break
        state.trials_left -= 1
        state.method_trials.append(MethodTrial(other, state.trial(other, state.base_excluded)))
    state.method = max(state.method_trials, key=lambda t: (t.check.met, t.check.score)).method


def keep_harmful_fp32(state: QuantState) -> None:
    """When no method meets the budget: the roundings that hurt most, measured alone, kept fp32 (guard.py)."""
    if any(t.check.met for t in state.method_trials) or not state.trials_left:
        return
    try:
        qdq = quantize_with_ranges(
            state.prepared_path, state.calibrated(state.method)[0], replace(state.config, format="qdq"), state.method,
            exclude_nodes=state.base_excluded, keep_activations=True,
        )
    except UnsupportedModelError as e:
        state.notes.append(f"cannot measure which nodes int8 hurts: {e}")
        return
    plain = max(state.method_trials, key=lambda t: t.check.score).check
    method, base = state.method, state.base_excluded
    assert state.evaluator is not None
    outcome = _keep_harmful_fp32(
        state.model, qdq, base, state.config, state.options.budget, plain, state.evaluator, state.calib,
        lambda nodes: state.trial(method, [*base, *nodes]), state.trials_left,
        threads=state.threads, progress=state.progress,
    )
    state.exclusion_trials, state.guard_note, state.guarded = outcome.trials, outcome.note, outcome.nodes


def choose_fastest(state: QuantState) -> None:
    """The speed guard (speed.py) over the candidates built from the shared ranges, each judged too."""
    options = state.options
    state.excluded = sorted({*state.base_excluded, *state.guarded})
    cache_path = state.calibrated(state.method)[0]
    threads, progress = state.threads, state.progress

    def default_timer(
        entries: Sequence[tuple[QuantConfig | None, onnx.ModelProto]], feeds: Mapping[str, np.ndarray], budget: TimingBudget
    ) -> list[InterleavedTiming]:
        return measure_latencies([m for _, m in entries], feeds, threads=threads, budget=budget, progress=progress)

    candidates = _Candidates(
        state.source, state.model, state.prepared_path, cache_path, method=state.method, exclude_nodes=state.excluded,
        threads=threads, timer=state.timer or default_timer, feeds=state.feeds, progress=progress,
    )
    state.candidates = candidates

    def measure(configs: Sequence[QuantConfig], timing_budget: TimingBudget) -> list[CandidateTiming]:
        timings = []
        for timing in candidates.measure(configs, timing_budget):
            built = candidates.built.get(timing.config)
            if timing.error is None and isinstance(built, onnx.ModelProto):
                check = state.judge(built, (timing.config, state.method, tuple(state.excluded))).check
                timing = replace(timing, budget_met=check.met, score=check.score)
            timings.append(timing)
        return timings

    assert state.prepared is not None
    state.decision, state.tried = search_fastest(
        state.config, measure, per_channel_possible=state.prepared.per_channel,
        min_speedup=options.min_speedup, force=options.force,
    )
    if state.decision.best is None:
        raise UnsupportedModelError(state.decision.reason)


def validate_chosen(state: QuantState) -> None:
    """The int8 model kept: onnx.checker, an onnxruntime run, the source's inputs and outputs."""
    assert state.decision is not None and state.decision.best is not None and state.candidates is not None
    if state.decision.chosen is None:
        return
    int8 = state.candidates.built[state.decision.best.config]
    assert isinstance(int8, onnx.ModelProto)
    state.validation = validate(int8, state.source, state.shapes, feeds=state.feeds)


Step = Callable[[QuantState], None]

PIPELINE: tuple[tuple[str, Step], ...] = (
    ("prepare", prepare),
    ("range rules", apply_range_rules),
    ("plain int8", try_plain),
    ("other methods", try_other_methods),
    ("fp32 fallback", keep_harmful_fp32),
    ("speed", choose_fastest),
    ("validate", validate_chosen),
)


def run_pipeline(state: QuantState) -> QuantState:
    """Run the steps of `PIPELINE` on `state`, timing each."""
    for name, step in PIPELINE:
        started = time.perf_counter()
        step(state)
        state.seconds[name] = time.perf_counter() - started
    return state


def _result(state: QuantState) -> QuantizeResult:
    decision, candidates, prepared, cpu = state.decision, state.candidates, state.prepared, state.cpu
    assert decision is not None and decision.best is not None and candidates is not None
    assert prepared is not None and cpu is not None and state.split is not None and state.evaluator is not None
    best = decision.best
    int8 = candidates.built[best.config]
    assert isinstance(int8, onnx.ModelProto)
    judged = state.judgements[(best.config, state.method, tuple(state.excluded))]
    notes = list(state.notes)
    if len(state.judged_outputs) > 1:
        notes.append(f"fidelity is the worst of the {len(state.judged_outputs)} outputs: {judged.output!r}")
    if state.evaluator.note:
        notes.append(state.evaluator.note)
    if state.guard_note:
        notes.append(state.guard_note)
    quantized_nodes, fp32_count = candidates.count(best.config, int8)
    kinds = {n.name: n.op_type for n in prepared.model.graph.node}
    fp32_nodes = [NodeError(n, kinds.get(n, "?"), None, "--exclude") for n in state.user_excluded]
    fp32_nodes += state.rule_nodes
    fp32_nodes += list(state.guarded.values())
    budget = state.options.budget
    if not judged.check.met and decision.chosen is not None:
        logger.warning("the int8 model kept misses the accuracy budget (%s): %s", budget.label, judged.check.why)
    return QuantizeResult(
        model=int8 if decision.chosen is not None else state.source,
        quantized=decision.chosen is not None,
        forced=decision.forced,
        reason=decision.reason,
        int8_model=int8,
        config=best.config,
        method=state.method,
        latency_fp32_ms=best.fp32_latency_ms,
        latency_int8_ms=best.latency_ms,
        speedup=best.speedup,
        size_fp32=state.size_fp32,
        size_int8=best.size_bytes,
        nodes_quantized=quantized_nodes,
        nodes_fp32=fp32_count,
        fidelity=judged.fidelity,
        fidelity_data=state.split.description,
        accuracy_fp32=judged.accuracy_fp32,
        accuracy_int8=judged.accuracy_int8,
        output=judged.output,
        calibration=state.calibrated(state.method)[1],
        candidates=state.tried,
        threads=state.threads,
        timing_shapes={name: tuple(array.shape) for name, array in state.feeds.items()},
        min_speedup=state.options.min_speedup,
        opset=(prepared.source_opset, default_opset(int8)),
        notes=tuple(notes),
        cpu=cpu,
        budget=budget,
        budget_check=judged.check,
        fp32_nodes=tuple(fp32_nodes),
        method_trials=tuple(state.method_trials),
        exclusion_trials=state.exclusion_trials,
        max_trials=state.options.max_trials,
        validation=state.validation,
        timing=best,
        step_seconds=dict(state.seconds),
    )


def quantize_model(
    model: LoadedModel | onnx.ModelProto,
    calib: Dataset,
    options: QuantizeOptions | None = None,
    *,
    eval_data: Dataset | None = None,
    progress: Progress | None = None,
    timer: Timer | None = None,
) -> QuantizeResult:
    """Quantize `model` to int8 with onnxruntime, calibrated on `calib`, guarded for accuracy and speed
    (module docstring): the steps of `PIPELINE` over one `QuantState`.

    `timer` replaces the latency measurement (tests inject timings). A kept int8 model is validated
    (onnx.checker, an onnxruntime run, the source's inputs and outputs); a failure raises ValidationError.
    Raises UnsupportedModelError for already-quantized models or when no candidate could be built,
    DataError for calibration data the model cannot run on, UsageError for --max-drop without labels.
    """
    options = options or QuantizeOptions()
    if isinstance(model, LoadedModel):
        source, size_fp32 = model.model, model.size_bytes
    else:
        source, _ = normalize_model(model)
        size_fp32 = _size(model)
    refuse_quantized(source, QUANTIZE_ADVICE)
    with tempfile.TemporaryDirectory(prefix="onnxslim-quantize-") as scratch:
        state = QuantState(options, source, size_fp32, calib, eval_data, Path(scratch), progress=progress, timer=timer)
        run_pipeline(state)
        return _result(state)
