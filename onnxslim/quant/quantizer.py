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
* **Speed guard** (`speed.py`, whose docstring has the rules). The requested configuration is timed
  against the fp32 model (same threads, same batch, interleaved run by run, median, and the ratio on each
  of 5 blocks of the run). Unless it is clearly at least `min_speedup` (5 %) faster — at the median and
  faster in every block; an uncertain verdict is re-timed once, longer — alternatives are tried one change
  at a time, in this order, each kept only when clearly faster than the best so far: the other
  activation type (u8 <-> s8; onnxruntime fuses only some variants into QLinearConv on a given CPU), the
  other format (QDQ <-> QOperator), per-tensor weights, and the `compute` placement when another was in
  force. When no candidate is
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
* **Placement** (`placement.py`): only the nodes int8 pays for may be int8 -- the compute ops onnxruntime
  runs as int8 kernels on this machine (read from its optimized graph), with the activations folded into
  them; every int8 kernel (element-wise ops too) only when timed clearly faster and within the budget.
* **Accuracy guard** (`guard.py`): the int8 model must meet an accuracy budget (default: cosine
  0.99, mean and worst channel). Each activation's range is chosen by the error it causes (`--method
  tensor`, calibrate.py); Concats joining very different ranges are joined in float per input from the
  start; when the budget is missed, the other calibration methods are tried, then every rounding is measured by group
  testing (`sensitivity.py`: whole blocks first, down to the roundings that matter) and those that cost
  most fidelity per MAC are kept in fp32 with the nodes that touch them, within `max_trials` trials. The
  speed guard then runs on that set of nodes: only candidates that meet the budget can be kept.

**The pipeline.** `quantize_model` runs `PIPELINE`, named steps over one `QuantState`, as `prune/pruner.py`
does:

    prepare → modes → range rules → placement → plain int8 → other methods → measure → fp32 fallback → speed
            → dynamic int8 → dynamic fallback → dynamic speed → mode → validate

Each step is a function `step(state) -> None` that reads what earlier steps left and adds its part; a step
with nothing to do returns at once (the budget met by plain int8: `other methods`, `measure` and `fp32
fallback` do nothing). The state owns the shared work: each calibration method's ranges are computed once
(`QuantState.calibrated`), every trial requantizes from them (`QuantState.trial`), and every int8 model is
judged once (`QuantState.judge`, through `evaluate.Evaluator`). To add a remedy, write its step, give the
state the fields it fills, and put it in `PIPELINE` before `speed`. Each step's wall time is in the result.

**Modes.** `modes` picks static, dynamic, or both (`auto`, when MatMul/Gemm carry at least half the MACs);
the static steps return at once without static. `dynamic int8` is onnxruntime's `quantize_dynamic` on the
MatMul/Gemm weights (QInt8, per channel; activations quantized at run time; no calibration), judged like
static; `dynamic fallback` keeps fp32 the MatMuls that cost most fidelity per MAC (each measured int8 alone)
when it misses the budget; `dynamic speed` is the same speed guard; `mode` keeps the one its guard kept, or with both kept, the clearly faster of the two
timed side by side with fp32 in one run (within the noise, the more faithful).

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

from onnxslim.analysis.cost import ModelCost, compute_cost
from onnxslim.analysis.quantized import refuse_quantized
from onnxslim.calib import Dataset
from onnxslim.cpu import CpuChoice, choose_for_cpu, detect_cpu
from onnxslim.errors import DataError, UnsupportedModelError, UsageError, ValidationError, first_line
from onnxslim.evaluate import (
    BudgetCheck,
    Evaluator,
    HeldOut,
    budget_resolution_note,
    check_budget,
    hold_out_tail,
)
from onnxslim.graph import ProtoIndex, sort_nodes
from onnxslim.io import LoadedModel, Validation, normalize_model, validate
from onnxslim.metrics import (
    Accuracy,
    Fidelity,
    select_output,
)
from onnxslim.progress import Progress
from onnxslim.quant.calibrate import calibrate
from onnxslim.quant.config import (
    COMPUTE_OP_TYPES,
    DYNAMIC_METHOD,
    DYNAMIC_OP_TYPES,
    FORMAT_NAMES,
    MATMUL_SHARE,
    METHOD_NAMES,
    ORT_METADATA,
    QUANT_TYPE_NAMES,
    CalibrationSummary,
    CandidateTiming,
    InterleavedTiming,
    MethodTrial,
    ModeCandidate,
    ModeChoice,
    PlacementChoice,
    PreparedModel,
    QuantConfig,
    QuantizeOptions,
    QuantizeResult,
    SpeedDecision,
    Timer,
    TimingBudget,
    dynamic_config,
)
from onnxslim.quant.guard import (
    CLOSE_ENOUGH,
    RESOLUTION,
    Block,
    ExclusionTrial,
    Gate,
    NodeError,
    concat_range_offenders,
    first_count_within,
    layer_norm_blocks,
    node_costs,
    nonfinite_offenders,
    predicted_deficits,
    rank_gates,
    search_exclusions,
    target_deficit,
)
from onnxslim.quant.placement import NodeFate, Placement, build_placements, fate_counts, onnxruntime_fates
from onnxslim.quant.prepare import (
    QUANTIZE_ADVICE,
    declare_like,
    default_opset,
    prepare_model,
    strip_unused_domains,
)
from onnxslim.quant.sensitivity import SENSITIVITY_SECONDS, GateMeasure, gated_model, measure_hierarchically
from onnxslim.quant.speed import beats, measure_latencies, search_fastest
from onnxslim.runtime import open_session, physical_cores, quiet_onnxruntime
from onnxslim.shapes import infer_tensor_infos

__all__ = ["quantize_with_ranges", "quantize_dynamic_weights", "count_quantized_nodes", "quantize_model"]

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
    sort_nodes(quantized.graph)  # its order ignores what If branches read from the outer graph (silero-vad)
    try:
        onnx.checker.check_model(quantized)
    except onnx.checker.ValidationError as e:
        raise UnsupportedModelError(
            f"onnxruntime's quantizer made a model that fails onnx.checker ({config.label}): {first_line(e)}"
        ) from e
    strip_unused_domains(quantized)
    kept = [p for p in quantized.metadata_props if p.key not in ORT_METADATA]
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(kept)
    return quantized


def quantize_dynamic_weights(
    prepared_path: str | os.PathLike[str], config: QuantConfig, *, exclude_nodes: Sequence[str] = (),
    only: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """onnxruntime's dynamic int8 of the prepared model file, as the dynamic `config` says: the weights of its
    MatMul/Gemm ops int8 (QInt8; per channel or per tensor), their activations quantized at run time
    (DynamicQuantizeLinear, MatMulInteger). Only MatMuls with a constant B: attention's activation x
    activation products, the residual Adds and the LayerNorms stay float. `only`: these nodes and no other
    (the fallback's measure).

    Raises UnsupportedModelError when onnxruntime's quantizer fails.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    assert config.mode == "dynamic"
    with tempfile.TemporaryDirectory(prefix="onnxslim-qd-") as scratch, quiet_onnxruntime():
        output = Path(scratch) / "int8.onnx"
        try:
            quantize_dynamic(
                str(prepared_path), str(output), op_types_to_quantize=list(config.op_types or DYNAMIC_OP_TYPES),
                per_channel=config.per_channel, reduce_range=bool(config.reduce_range),
                weight_type=getattr(QuantType, QUANT_TYPE_NAMES[config.weights]), nodes_to_exclude=list(exclude_nodes),
                nodes_to_quantize=None if only is None else list(only), extra_options={"MatMulConstBOnly": True},
            )
        except Exception as e:  # noqa: BLE001 - the quantizer raises anything from ValueError to AssertionError
            raise UnsupportedModelError(f"onnxruntime's dynamic quantizer failed ({config.label}): {first_line(e)}") from e
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
        cache_path: Path | None,
        *,
        method: str,
        exclusions: Callable[[QuantConfig], list[str]],
        threads: int,
        timer: Timer,
        feeds: Mapping[str, np.ndarray],
        progress: Progress | None,
    ) -> None:
        self._source, self._prepared, self._prepared_path, self._cache_path = source, prepared, prepared_path, cache_path
        self._method, self._exclusions, self._threads = method, exclusions, threads
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
            if config.mode == "dynamic":
                result = quantize_dynamic_weights(self._prepared_path, config, exclude_nodes=self._exclusions(config))
            else:
                assert self._cache_path is not None, "static candidates need calibrated ranges"
                result = quantize_with_ranges(
                    self._prepared_path, self._cache_path, config, self._method, exclude_nodes=self._exclusions(config)
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
        return count_quantized_nodes(self._prepared, model, config, self._exclusions(config))

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
class _ModeRun:
    """One mode's speed guard: its decision, every variant tried, the candidates built, the calibration
    method and the nodes kept fp32 its models were judged with (the key of `QuantState.judgements`)."""

    decision: SpeedDecision
    tried: tuple[CandidateTiming, ...]
    candidates: _Candidates
    method: str
    excluded: list[str]


@dataclass
class QuantState:
    """Everything the quantizer's steps share (`PIPELINE`); a field is filled by the step that needs it.

    The calibration ranges of each method are computed once (`calibrated`) and every trial requantizes from
    them; every int8 model built is judged once (`judge`, remembered by configuration, method and the nodes
    kept fp32); what onnxruntime makes of each node is read once (`placements`)."""

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
    fates: dict[str, NodeFate] | None = None  # what onnxruntime makes of each node (`placements`)
    placement_by_name: dict[str, Placement] | None = None
    placement: PlacementChoice | None = None
    placement_timings: dict[QuantConfig, CandidateTiming] = field(default_factory=dict)
    placement_built: dict[QuantConfig, onnx.ModelProto | UnsupportedModelError] = field(default_factory=dict)
    method: str = "minmax"
    trials_left: int = 0
    method_trials: list[MethodTrial] = field(default_factory=list)
    gates: list[Gate] = field(default_factory=list)  # the roundings of the int8 model, in graph order
    measure: GateMeasure | None = None
    exclusion_trials: tuple[ExclusionTrial, ...] = ()
    guarded: dict[str, NodeError] = field(default_factory=dict)  # kept fp32 by the measured search
    guard_note: str | None = None
    excluded: list[str] = field(default_factory=list)  # every node kept fp32 in the end
    candidates: _Candidates | None = None
    decision: SpeedDecision | None = None
    tried: tuple[CandidateTiming, ...] = ()
    validation: Validation | None = None
    modes: tuple[str, ...] = ("static",)  # the modes this run measures (the `modes` step)
    matmul_share: float = 0.0  # share of the MACs in MatMul/Gemm
    mode_reason: str = ""
    static_run: _ModeRun | None = None  # static's guard, when it built any candidate
    static_error: str | None = None  # why static has no candidate, when it has none
    dynamic_run: _ModeRun | None = None
    dynamic_error: str | None = None  # why dynamic has no candidate, when it has none
    dynamic_check: BudgetCheck | None = None  # dynamic int8 with every MatMul/Gemm quantized, against the budget
    dynamic_guarded: dict[str, NodeError] = field(default_factory=dict)  # kept fp32 by dynamic's fallback
    dynamic_trials: tuple[ExclusionTrial, ...] = ()
    mode_choice: ModeChoice | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    _costs: ModelCost | None = None
    _everywhere: dict[QuantConfig, onnx.ModelProto | UnsupportedModelError] = field(default_factory=dict)

    @property
    def prepared_path(self) -> Path:
        return self.scratch / "prepared.onnx"

    @property
    def model(self) -> onnx.ModelProto:
        assert self.prepared is not None
        return self.prepared.model

    @property
    def costs(self) -> ModelCost:
        """MACs and elements written of every node of the prepared model, at the calibration shapes."""
        if self._costs is None:
            self._costs = compute_cost(self.model, infer_tensor_infos(self.model, self.shapes))
        return self._costs

    def placements(self) -> dict[str, Placement]:
        """The placements (placement.py) from what onnxruntime makes of the model with every node the
        quantizer handles in int8, read once (with the method asked for, --exclude and the range rules)."""
        if self.placement_by_name is None:
            handled = _quantized_op_types(replace(self.config, placement="all"))
            qdq = self.qdq_everywhere()
            self.fates = onnxruntime_fates(self.model, qdq, handled, self.base_excluded)
            self.placement_by_name = build_placements(self.model, self.fates)
        return self.placement_by_name

    def qdq_everywhere(self, config: QuantConfig | None = None) -> onnx.ModelProto:
        """The QDQ model with every node the quantizer handles in int8 (the method asked for, --exclude and the
        range rules), built once for the configuration in force. Raises UnsupportedModelError."""
        config = replace(config or self.config, format="qdq", placement="all")
        if config not in self._everywhere:
            try:
                self._everywhere[config] = quantize_with_ranges(
                    self.prepared_path, self.calibrated(self.options.method)[0], config, self.options.method,
                    exclude_nodes=self.base_excluded,
                )
            except UnsupportedModelError as e:
                self._everywhere[config] = e
        built = self._everywhere[config]
        if isinstance(built, UnsupportedModelError):
            raise built
        return built

    def float_nodes(self, config: QuantConfig) -> list[str]:
        """The nodes `config`'s placement keeps float (none for `all`)."""
        if config.placement == "all":
            return []
        return list(self.placements()[config.placement].float_nodes)

    def quantizable(self) -> list[str]:
        """The nodes of the prepared model that may be int8: handled by the quantizer, inside the placement,
        not excluded by --exclude or the range rules."""
        types = _quantized_op_types(self.config)
        outside = {*self.base_excluded, *self.float_nodes(self.config)}
        return [n.name for n in self.model.graph.node if n.op_type in types and n.name not in outside]

    def gated(self) -> tuple[onnx.ModelProto, list[Gate]]:
        """The int8 model in force (QDQ, with the method in force) with a switch on every rounding
        (sensitivity.gated_model), and its gates in graph order (of their first toucher)."""
        qdq = self.build(self.method, self.base_excluded, replace(self.config, format="qdq"), keep_activations=True)
        gated, gates = gated_model(qdq, self.model, self.quantizable())
        position = {n.name: i for i, n in enumerate(self.model.graph.node)}
        return gated, sorted(gates, key=lambda g: min((position[t] for t in g.touchers if t in position), default=len(position)))

    def calibrated(self, method: str) -> tuple[Path, CalibrationSummary]:
        """The ranges file and summary of `method`, calibrated once per run: the method asked for on every
        tensor (the placements are read with it), another only on the op types the placement in force
        quantizes (guessing which method suits the model is no reason to range tensors nobody rounds)."""
        if method not in self.calibrations:
            assert self.split is not None
            path = self.scratch / f"ranges-{method}.json"
            op_types = None
            if method != self.options.method and self.config.placement != "all" and self.placement_by_name is not None:
                kinds = {n.name: n.op_type for n in self.model.graph.node}
                op_types = {kinds[name] for name in self.placement_by_name[self.config.placement].int8}
            summary = calibrate(
                self.model, self.calib, method, batches=self.split.calibration_batches,
                memory=self.options.calibration_memory, cache_path=path, progress=self.progress, op_types=op_types,
            )
            self.calibrations[method] = (path, summary)
        return self.calibrations[method]

    def build(
        self, method: str, nodes: Sequence[str], config: QuantConfig | None = None, *, keep_activations: bool = False
    ) -> onnx.ModelProto:
        """The int8 model of `config` (default: the configuration in force) with `method`'s ranges, `nodes`
        and those outside its placement kept fp32."""
        config = config or self.config
        int8 = quantize_with_ranges(
            self.prepared_path, self.calibrated(method)[0], config, method,
            exclude_nodes=sorted({*self.float_nodes(config), *nodes}), keep_activations=keep_activations,
        )
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

    def trial(self, method: str, nodes: Sequence[str], config: QuantConfig | None = None) -> BudgetCheck:
        """Requantize with `method`'s ranges and `nodes` fp32, and check the budget (no new calibration)."""
        config = config or self.config
        key = (config, method, tuple(sorted(nodes)))
        if key in self.judgements:
            return self.judgements[key].check
        try:
            int8 = self.build(method, nodes, config)
        except UnsupportedModelError as e:
            return BudgetCheck(False, -1.0, None, str(e))
        except DataError as e:
            if method == self.options.method:
                raise  # the method asked for cannot calibrate on this data: the user must know
            # another method tried by the guard: its calibrator failed (a histogram of infinite values)
            return BudgetCheck(False, -1.0, None, f"{method} calibration failed: {first_line(e)}")
        return self.judge(int8, key).check

    def time_models(
        self, entries: Sequence[tuple[QuantConfig | None, onnx.ModelProto]], budget: TimingBudget
    ) -> Sequence[InterleavedTiming]:
        """The models of `entries` (fp32 first) timed in one interleaved run on this run's feeds."""
        return self.time_models_with_feeds(entries, self.feeds, budget)

    def candidates_for(self, method: str, excluded: Sequence[str]) -> _Candidates:
        """Builds and times int8 candidates with `method`'s ranges, `excluded` and each one's placement."""
        return _Candidates(
            self.source, self.model, self.prepared_path, self.calibrated(method)[0], method=method,
            exclusions=lambda config: sorted({*excluded, *self.float_nodes(config)}),
            threads=self.threads, timer=self.time_models_with_feeds, feeds=self.feeds, progress=self.progress,
        )

    def dynamic_candidates(self) -> _Candidates:
        """Builds and times dynamic int8 candidates: no ranges, `--exclude` and dynamic's fallback kept fp32."""
        excluded = sorted({*self.user_excluded, *self.dynamic_guarded})
        return _Candidates(
            self.source, self.model, self.prepared_path, None, method=DYNAMIC_METHOD,
            exclusions=lambda config: excluded,
            threads=self.threads, timer=self.time_models_with_feeds, feeds=self.feeds, progress=self.progress,
        )

    def time_models_with_feeds(
        self, entries: Sequence[tuple[QuantConfig | None, onnx.ModelProto]], feeds: Mapping[str, np.ndarray],
        budget: TimingBudget,
    ) -> Sequence[InterleavedTiming]:
        """A `Timer`: the injected one, or `speed.measure_latencies` with this run's threads."""
        if self.timer is not None:
            return self.timer(entries, feeds, budget)
        return measure_latencies([m for _, m in entries], feeds, threads=self.threads, budget=budget, progress=self.progress)


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


def choose_modes(state: QuantState) -> None:
    """Which modes this run measures: the one asked for, or with `auto` both static and dynamic when
    MatMul/Gemm carry at least `MATMUL_SHARE` of the MACs (a transformer), static alone otherwise (a CNN)."""
    costs = state.costs
    matmul = sum(layer.macs for layer in costs.layers if layer.op_type in DYNAMIC_OP_TYPES)
    state.matmul_share = matmul / costs.macs if costs.macs else 0.0
    share = f"MatMul/Gemm carry {state.matmul_share:.0%} of the MACs"
    asked = state.options.mode
    if asked != "auto":
        state.modes, state.mode_reason = (asked,), f"--mode {asked}"
    elif state.matmul_share >= MATMUL_SHARE:
        state.modes = ("static", "dynamic")
        state.mode_reason = f"{share} (at least {MATMUL_SHARE:.0%}): static and dynamic measured side by side"
    else:
        state.modes = ("static",)
        state.mode_reason = f"{share} (under {MATMUL_SHARE:.0%}): static only"


def _static(state: QuantState) -> bool:
    return "static" in state.modes


def apply_range_rules(state: QuantState) -> None:
    """Calibrate with the method asked for; Concats joining very different ranges and tensors with infinite
    ranges stay fp32 from the start (guard.py)."""
    options = state.options
    state.method = options.method
    if not _static(state):
        return
    path, summary = state.calibrated(options.method)
    if options.range_ratio is not None:
        state.rule_nodes = [
            e for e in concat_range_offenders(state.model, _load_ranges(path), options.range_ratio, COMPUTE_OP_TYPES)
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


def _placement_choice(state: QuantState, chosen: str, reason: str, timings: Sequence[CandidateTiming] = ()) -> None:
    state.config = replace(state.config, placement=chosen)
    placement = state.placements()[chosen] if state.placement_by_name is not None else None
    kinds = {n.name: n.op_type for n in state.model.graph.node}
    float_nodes = () if placement is None else tuple(
        NodeError(name, kinds.get(name, "?"), None, why) for name, why in placement.float_nodes.items()
        if name not in state.base_excluded
    )
    state.placement = PlacementChoice(
        chosen, reason, len(placement.int8) if placement is not None else 0, float_nodes,
        fate_counts(state.fates or {}), tuple(timings),
    )


def settle_weights(state: QuantState) -> None:
    """Weights per tensor when onnxruntime's quantizer fails on this model with per-channel weights and works
    per tensor (on magika's tf2onnx export its int32-bias adjustment indexes a [1, N] Gemm bias as 1-D: "The
    truth value of an array ... is ambiguous"), so that placement, the guard and the fallback have an int8
    model to work on; said in the notes. Otherwise nothing changes (the probe is the model `placements`
    reads, built once)."""
    if not _static(state) or not state.config.per_channel:
        return
    try:
        state.qdq_everywhere()
        return
    except UnsupportedModelError as e:
        failure = e
    per_tensor = replace(state.config, per_channel=False)
    try:
        state.qdq_everywhere(per_tensor)
    except UnsupportedModelError:
        return  # per tensor fails too: the steps below report the failure
    state.config = per_tensor
    state.notes.append(f"weights quantized per tensor: with per-channel weights {failure}")


def place_ops(state: QuantState) -> None:
    """Which nodes may be int8 (placement.py): the `compute` placement, or `kernels` when it is measured
    clearly faster than `compute` (fp32, both, one interleaved run; within the noise, re-timed once longer)
    and meets the budget; `--placement` fixes it. Every later step quantizes within it."""
    if not _static(state):
        return
    asked = state.options.placement
    if asked == "all":
        _placement_choice(state, "all", "--placement all: every node onnxruntime's quantizer handles")
        return
    try:
        placements = state.placements()
    except UnsupportedModelError as e:
        state.notes.append(f"cannot read what onnxruntime makes of the int8 model ({e}): every node placed")
        _placement_choice(state, "all", "onnxruntime's optimized graph could not be read")
        return
    compute, kernels = placements["compute"], placements["kernels"]
    if asked != "auto":
        _placement_choice(state, asked, f"--placement {asked}")
        return
    if not compute.int8:
        _placement_choice(state, "kernels", "no compute op of this model runs in int8 on this machine")
        return
    if set(kernels.int8) == set(compute.int8):
        _placement_choice(state, "compute", "every node onnxruntime runs in int8 here is a compute op")
        return
    configs = {name: replace(state.config, placement=name) for name in ("compute", "kernels")}
    candidates = state.candidates_for(state.method, state.base_excluded)
    timed = {t.config: t for t in candidates.measure(list(configs.values()), TimingBudget())}
    narrow, wide = timed[configs["compute"]], timed[configs["kernels"]]
    verdict = None if narrow.speedup is None or wide.speedup is None else beats(wide, narrow)
    if verdict is None and narrow.speedup is not None and wide.speedup is not None:
        timed = {t.config: replace(t, retimed=True)
                 for t in candidates.measure(list(configs.values()), TimingBudget().longer())}
        narrow, wide = timed[configs["compute"]], timed[configs["kernels"]]
        verdict = bool(beats(wide, narrow))
    state.placement_timings, state.placement_built = dict(timed), dict(candidates.built)
    if wide.speedup is None or not verdict:
        why = wide.error or f"every int8 kernel is not clearly faster than compute ops alone ({_ratio(wide, narrow)})"
        _placement_choice(state, "compute", why, [narrow, wide])
        return
    check = state.trial(state.method, state.base_excluded, configs["kernels"])
    if not check.met:
        _placement_choice(
            state, "compute",
            f"every int8 kernel is faster ({_ratio(wide, narrow)}) but misses the budget ({check.why})", [narrow, wide],
        )
        return
    _placement_choice(state, "kernels", f"every int8 kernel is clearly faster than compute ops alone "
                      f"({_ratio(wide, narrow)}) and meets the budget", [narrow, wide])


def _ratio(challenger: CandidateTiming, best: CandidateTiming) -> str:
    if challenger.speedup is None or best.speedup is None:
        return "not measured"
    return f"{challenger.speedup:.2f}x against {best.speedup:.2f}x of fp32"


def try_plain(state: QuantState) -> None:
    """int8 everywhere the placement and the rules allow, with the method asked for, checked against the
    budget."""
    if not _static(state):
        return
    state.method_trials = [MethodTrial(state.method, state.trial(state.method, state.base_excluded))]


def try_other_methods(state: QuantState) -> None:
    """When the budget is missed: the other calibration methods, one trial each; the best is kept (a tie goes
    to the method asked for). After `tensor` only min-max, and a tie goes to it: the per-tensor choice already
    weighed each tensor's min-max, percentile and least-error clip, so percentile and entropy rarely add
    anything, and where the per-tensor ranges are no better the plainer ones are kept."""
    if not state.method_trials or state.method_trials[0].check.met or not state.trials_left:
        return
    others = ("minmax",) if state.method == "tensor" else ("tensor", "percentile", "entropy", "minmax")
    for other in (m for m in others if m != state.method):
        if not state.trials_left:
            break
        state.trials_left -= 1
        state.method_trials.append(MethodTrial(other, state.trial(other, state.base_excluded)))
    preferred = "minmax" if state.method == "tensor" else state.method
    state.method = max(
        state.method_trials, key=lambda t: (t.check.met, t.check.score, t.method == preferred)
    ).method


def _target(state: QuantState) -> float | None:
    plain = max(state.method_trials, key=lambda t: t.check.score).check
    return target_deficit(state.options.budget, plain)


def measure_roundings(state: QuantState) -> None:
    """When no method meets the budget: every rounding of the int8 model measured, by group testing on a
    gated copy (sensitivity.py), split down to the gates that matter beside the budget."""
    if not state.method_trials or any(t.check.met for t in state.method_trials) or not state.trials_left:
        return
    try:
        gated, state.gates = state.gated()
    except UnsupportedModelError as e:
        state.notes.append(f"cannot measure which nodes int8 hurts: {e}")
        return
    assert state.evaluator is not None
    target = _target(state)
    plain = max(state.method_trials, key=lambda t: t.check.score).check
    resolution = RESOLUTION * (target if target is not None else max(1e-6, 1.0 - plain.score))
    try:
        state.measure = measure_hierarchically(
            gated, state.gates, state.calib.batches(), state.evaluator.outputs, state.evaluator.ensure_layouts(),
            state.evaluator.rows, resolution=resolution, threads=state.threads, progress=state.progress,
            limit=SENSITIVITY_SECONDS,
        )
    except UnsupportedModelError as e:
        state.notes.append(f"cannot measure which nodes int8 hurts: {e}")


def keep_harmful_fp32(state: QuantState) -> None:
    """The roundings that cost most fidelity per MAC kept fp32 with the nodes that touch them, the fewest
    blocks that meet the budget (guard.py)."""
    measure = state.measure
    if measure is None or not measure.deficits:
        return
    kinds = {n.name: n.op_type for n in state.model.graph.node}
    norms = layer_norm_blocks(state.model)
    norm_members = {name for block in norms for name in block}
    costs = node_costs(state.costs.layers)
    ranked = rank_gates(measure.deficits, state.gates, norms, state.quantizable(), costs=costs)
    target = _target(state)
    start = 1 if target is None else first_count_within(predicted_deficits(ranked, state.gates, measure.deficits), target)
    method, base = state.method, state.base_excluded
    search = search_exclusions(
        ranked, lambda nodes: state.trial(method, [*base, *nodes]), state.trials_left, start=start,
        close_enough=CLOSE_ENOUGH * state.costs.macs,
    )
    count = search.blocks
    if count is None and search.trials:  # nothing met the budget: the most faithful set tried
        count = max(search.trials, key=lambda t: t.check.score).blocks
    by_name = {g.name: g for g in state.gates}
    kept: dict[str, NodeError] = {}
    for block in ranked[: count or 0]:
        gate = by_name[block.gate]
        what = f"the weights of {gate.name}" if gate.kind == "weights" else f"tensor {gate.name!r}"
        alone = "alone" if gate.name in measure.alone else "(its share of a group)"
        for name in block.nodes:
            if name in norm_members and name not in gate.touchers:
                why = "part of a decomposed LayerNorm kept in fp32 whole"
            else:
                why = f"int8 at {what} {alone} costs {block.error:.3g} of fidelity"
            kept.setdefault(name, NodeError(name, kinds.get(name, "?"), block.error, why))
    state.exclusion_trials, state.guarded = search.trials, kept
    how = (f"{len(measure.alone)} alone, the rest in groups below {measure.resolution:.2g}" if measure.hierarchical
           else "each alone")
    state.guard_note = (
        f"{measure.gates} roundings measured ({how}) in {measure.runs} runs on {measure.samples} calibration "
        f"sample(s); blocks ranked by fidelity per MAC; search started at {start} of {len(ranked)} block(s)"
    )


def choose_fastest(state: QuantState) -> None:
    """The speed guard (speed.py) over the candidates built from the shared ranges, each judged too. The
    placement's run already timed the configuration in force when nothing since changed it.

    When the fp32 fallback met the budget only by leaving nothing onnxruntime runs in int8 (every compute
    node of a small model kept fp32: no variant can be built), the answer is the fp32 model; the variants
    are then timed and judged without that fallback, so the decision (fp32 kept, the budget missed by
    int8) has the closest int8 variant to show, and a note says why."""
    if not _static(state):
        return
    run = _static_speed(state)
    if run.decision.best is None and state.guarded:
        state.notes.append(
            f"the accuracy budget held only with {len(state.guarded)} node(s) fp32, which leaves nothing to run in "
            "int8: the fp32 model is kept; the int8 variants shown are those without that fallback"
        )
        state.guarded = {}
        run = _static_speed(state)
    if run.decision.best is None:
        state.static_error = run.decision.reason
        return
    state.static_run = run


def _static_speed(state: QuantState) -> _ModeRun:
    options = state.options
    excluded = sorted({*state.base_excluded, *state.guarded})
    candidates = state.candidates_for(state.method, excluded)
    reusable: dict[QuantConfig, CandidateTiming] = {}
    if excluded == state.base_excluded and state.method == options.method:  # the same models as timed
        reusable = dict(state.placement_timings)
        candidates.built.update(state.placement_built)
    return _guard_speed(state, state.config, candidates, state.method, excluded, reusable)


def _guard_speed(
    state: QuantState, requested: QuantConfig, candidates: _Candidates, method: str, excluded: list[str],
    reusable: dict[QuantConfig, CandidateTiming],
) -> _ModeRun:
    """The speed guard (speed.py) from `requested`, every candidate judged against the budget too."""

    def measure(configs: Sequence[QuantConfig], timing_budget: TimingBudget) -> list[CandidateTiming]:
        if len(configs) == 1 and configs[0] in reusable and timing_budget == TimingBudget():
            reused = [reusable.pop(configs[0])]
        else:
            reused = list(candidates.measure(configs, timing_budget))
        timings = []
        for timing in reused:
            built = candidates.built.get(timing.config)
            if timing.error is None and isinstance(built, onnx.ModelProto):
                check = state.judge(built, (timing.config, method, tuple(excluded))).check
                timing = replace(timing, budget_met=check.met, score=check.score)
            timings.append(timing)
        return timings

    assert state.prepared is not None
    decision, tried = search_fastest(
        requested, measure, per_channel_possible=state.prepared.per_channel,
        min_speedup=state.options.min_speedup, force=state.options.force,
    )
    return _ModeRun(decision, tried, candidates, method, excluded)


def _dynamic_excluded(state: QuantState, nodes: Sequence[str] = ()) -> list[str]:
    return sorted({*state.user_excluded, *nodes})


def _dynamic_trial(state: QuantState, nodes: Sequence[str]) -> BudgetCheck:
    """Dynamic int8 with `nodes` (and --exclude) fp32, against the budget on the held-out data."""
    config = dynamic_config(state.config)
    excluded = _dynamic_excluded(state, nodes)
    key = (config, DYNAMIC_METHOD, tuple(excluded))
    if key in state.judgements:
        return state.judgements[key].check
    try:
        int8 = quantize_dynamic_weights(state.prepared_path, config, exclude_nodes=excluded)
        declare_like(int8, state.source)
        open_session(int8, state.threads)  # a model onnxruntime cannot load is a failed trial, not a crash
    except UnsupportedModelError as e:
        return BudgetCheck(False, -1.0, None, str(e))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        return BudgetCheck(False, -1.0, None, f"onnxruntime cannot load the dynamic int8 model: {first_line(e)}")
    return state.judge(int8, key).check


def try_dynamic(state: QuantState) -> None:
    """Dynamic int8 (onnxruntime's quantize_dynamic on MatMul/Gemm weights; no calibration) with every node
    it handles, checked against the budget."""
    if "dynamic" not in state.modes:
        return
    state.dynamic_check = _dynamic_trial(state, ())


DYNAMIC_MEASURE_SAMPLES = 48  # samples the dynamic fallback measures each node on (every n-th held-out one)


def keep_dynamic_harm_fp32(state: QuantState) -> None:
    """When dynamic int8 misses the budget: each MatMul/Gemm measured int8 alone (the others float) on a few
    held-out samples, ranked by deficit per MAC, and the fewest top ones kept fp32 that meet the budget
    (guard.search_exclusions: the same bounded search as static's fallback, within --max-trials)."""
    check = state.dynamic_check
    if check is None or check.met or check.score < 0 or state.options.max_trials < 1:
        return  # met, or no dynamic model could be built at all (the speed step says why)
    assert state.split is not None and state.evaluator is not None
    initializers = {t.name for t in state.model.graph.initializer}
    excluded = set(state.user_excluded)
    nodes = [n.name for n in state.model.graph.node if n.op_type in DYNAMIC_OP_TYPES and len(n.input) > 1
             and n.input[1] in initializers and n.name not in excluded]
    split = state.split
    every = max(1, split.samples // DYNAMIC_MEASURE_SAMPLES)
    few = replace(split, every=every * (split.every or 1), samples=max(1, split.samples // every))
    evaluator = Evaluator(state.source, few, state.judged_outputs, threads=state.threads)
    config, kinds = dynamic_config(state.config), {n.name: n.op_type for n in state.model.graph.node}
    deficits: dict[str, float] = {}
    started = time.perf_counter()
    for done, name in enumerate(nodes, start=1):
        if state.progress is not None:
            state.progress("measuring", done, len(nodes))
        try:
            alone = quantize_dynamic_weights(state.prepared_path, config, exclude_nodes=sorted(excluded), only=[name])
            declare_like(alone, state.source)
            comparison = evaluator.compare(alone, "a dynamic int8 node")
        except (UnsupportedModelError, ValidationError) as e:
            logger.info("dynamic int8 of %s alone: %s", name, e)
            continue
        fidelity = comparison.fidelities[comparison.worst]
        score = check_budget(state.options.budget, fidelity, comparison.accuracy_original, comparison.accuracy,
                             comparison.paired).score
        deficits[name] = max(0.0, 1.0 - score)
    costs = node_costs(state.costs.layers)
    ranked = sorted(
        (Block((name, ), deficit, name, max(costs.get(name, 0.0), 1.0)) for name, deficit in deficits.items() if deficit > 0),
        key=lambda block: block.error / block.cost, reverse=True,
    )
    if len(ranked) == len(nodes):  # keeping every one fp32 is the fp32 model, not a fallback
        ranked = ranked[:-1]
    target = target_deficit(state.options.budget, check)
    predictions = [sum(b.error for b in ranked[count:]) for count in range(len(ranked) + 1)]
    start = 1 if target is None else first_count_within(predictions, target)
    search = search_exclusions(ranked, lambda kept: _dynamic_trial(state, kept), state.options.max_trials, start=start,
                               close_enough=CLOSE_ENOUGH * state.costs.macs)
    count = search.blocks
    if count is None and search.trials:  # nothing met the budget: the most faithful set tried
        count = max(search.trials, key=lambda t: t.check.score).blocks
    state.dynamic_trials = search.trials
    state.dynamic_guarded = {
        block.gate: NodeError(block.gate, kinds.get(block.gate, "?"), block.error,
                              f"dynamic int8 at its weights alone costs {block.error:.3g} of fidelity")
        for block in ranked[: count or 0]
    }
    state.notes.append(
        f"dynamic int8 misses the budget ({check.why}): {len(deficits)} MatMul/Gemm measured int8 alone on "
        f"{few.samples} held-out samples in {time.perf_counter() - started:.0f} s, ranked by fidelity per MAC; "
        f"{len(state.dynamic_guarded)} kept fp32 after {len(search.trials)} trial(s)"
        + ("" if search.blocks is not None else " (none met the budget: the most faithful set tried)")
    )


def choose_fastest_dynamic(state: QuantState) -> None:
    """Dynamic int8 through the same speed guard and the same budget as static: per-channel weights first,
    per-tensor when not clearly faster; with the nodes its fallback kept fp32."""
    if "dynamic" not in state.modes:
        return
    run = _guard_speed(state, dynamic_config(state.config), state.dynamic_candidates(), DYNAMIC_METHOD,
                       _dynamic_excluded(state, list(state.dynamic_guarded)), {})
    if run.decision.best is not None:
        state.dynamic_run = run
    elif not _static(state) or state.static_run is None:
        raise UnsupportedModelError(run.decision.reason + (f"; static: {state.static_error}" if state.static_error else ""))
    else:
        state.dynamic_error = run.decision.reason
        state.notes.append(f"dynamic int8: {run.decision.reason}")


def _mode_candidate(mode: str, run: _ModeRun | None, error: str | None) -> ModeCandidate:
    if run is None:
        return ModeCandidate(mode, None, False, error or "not measured")
    return ModeCandidate(mode, run.decision.best, run.decision.chosen is not None, run.decision.reason)


def _adopt(state: QuantState, run: _ModeRun, decision: SpeedDecision | None = None) -> None:
    """Make `run` the result of the quantizer (what `validate` checks and `_result` reports)."""
    state.decision, state.tried, state.candidates = decision or run.decision, run.tried, run.candidates
    state.method, state.excluded = run.method, run.excluded


def choose_mode(state: QuantState) -> None:
    """Static or dynamic: the mode its own guard kept; both kept, the two timed side by side in one
    interleaved run with fp32 (re-timed once, longer, within the noise), the clearly faster kept, and within
    the noise the more faithful; neither kept, fp32 (the report shows the closer)."""
    static, dynamic = state.static_run, state.dynamic_run
    if static is None and dynamic is None:
        raise UnsupportedModelError(state.static_error or "no int8 model could be built")
    candidates: list[ModeCandidate] = []
    if _static(state):
        candidates.append(_mode_candidate("static", static, state.static_error))
    if "dynamic" in state.modes:
        candidates.append(_mode_candidate("dynamic", dynamic, state.dynamic_error))
    head_to_head: tuple[CandidateTiming, ...] = ()

    def choice(chosen: str, why: str) -> ModeChoice:
        return ModeChoice(chosen, why, state.options.mode, state.matmul_share, tuple(candidates), head_to_head)

    if static is None or dynamic is None:
        only = static or dynamic
        assert only is not None
        name = "static" if only is static else "dynamic"
        _adopt(state, only)
        why = state.mode_reason if len(state.modes) == 1 else f"the only mode with an int8 model ({state.mode_reason})"
        state.mode_choice = choice(name, why)
        return
    kept = {name: run for name, run in (("static", static), ("dynamic", dynamic)) if run.decision.chosen is not None}
    if len(kept) == 1:
        (name, run), = kept.items()
        other = "dynamic" if name == "static" else "static"
        _adopt(state, run)
        state.mode_choice = choice(name, f"{name} int8 is kept by its guard, {other} is not "
                                   f"({(dynamic if other == 'dynamic' else static).decision.reason})")
        return
    if not kept:
        # neither: fp32 stays; the report shows the candidate that met the budget, else the more faithful
        def closeness(run: _ModeRun) -> tuple[bool, float]:
            best = run.decision.best
            assert best is not None
            return (best.budget_met is not False, best.score if best.score is not None else -1.0)

        name, run = max((("static", static), ("dynamic", dynamic)), key=lambda item: closeness(item[1]))
        _adopt(state, run, replace(run.decision, reason=f"neither static nor dynamic int8 is kept: static: "
                                   f"{static.decision.reason}; dynamic: {dynamic.decision.reason}"))
        state.mode_choice = choice(name, "neither mode is clearly faster within the budget; fp32 kept")
        return
    assert static.decision.chosen is not None and dynamic.decision.chosen is not None
    pair = [static.decision.chosen, dynamic.decision.chosen]
    timings = _time_side_by_side(state, pair, TimingBudget())
    verdict = _faster(*timings)
    if verdict is None:
        timings = [replace(t, retimed=True) for t in _time_side_by_side(state, pair, TimingBudget().longer())]
        verdict = _faster(*timings)
    head_to_head = tuple(timings)
    s_time, d_time = timings
    ratio = f"static {s_time.speedup or 0:.2f}x, dynamic {d_time.speedup or 0:.2f}x of fp32 in one run"
    if verdict is None:
        s_score, d_score = static.decision.chosen.score or -1.0, dynamic.decision.chosen.score or -1.0
        name = "dynamic" if d_score > s_score else "static"
        why = (f"static and dynamic are as fast within the noise ({ratio}); {name} is the more faithful "
               f"({max(s_score, d_score):.4f} against {min(s_score, d_score):.4f})")
    else:
        name = verdict
        why = f"{name} int8 is clearly faster than the other ({ratio}), both within the budget"
    run = static if name == "static" else dynamic
    _adopt(state, run)
    state.mode_choice = choice(name, why)


def _time_side_by_side(state: QuantState, pair: Sequence[CandidateTiming], budget: TimingBudget) -> list[CandidateTiming]:
    """The static and dynamic candidates of `pair` timed with fp32 in one interleaved run."""
    models = []
    for timing in pair:
        run = state.static_run if timing.config.mode == "static" else state.dynamic_run
        assert run is not None
        built = run.candidates.built[timing.config]
        assert isinstance(built, onnx.ModelProto)
        models.append((timing.config, built))
    latencies = list(state.time_models([(None, state.source), *models], budget))
    return [
        replace(timing, latency_ms=timed.median_ms, fp32_latency_ms=latencies[0].median_ms,
                block_speedups=timed.block_speedups)
        for timing, timed in zip(pair, latencies[1:], strict=True)
    ]


def _faster(static: CandidateTiming, dynamic: CandidateTiming) -> str | None:
    """The mode clearly faster than the other in their shared run (`speed.beats`), None within the noise."""
    if beats(dynamic, static):
        return "dynamic"
    if beats(static, dynamic):
        return "static"
    return None


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
    ("modes", choose_modes),
    ("range rules", apply_range_rules),
    ("weights", settle_weights),
    ("placement", place_ops),
    ("plain int8", try_plain),
    ("other methods", try_other_methods),
    ("measure", measure_roundings),
    ("fp32 fallback", keep_harmful_fp32),
    ("speed", choose_fastest),
    ("dynamic int8", try_dynamic),
    ("dynamic fallback", keep_dynamic_harm_fp32),
    ("dynamic speed", choose_fastest_dynamic),
    ("mode", choose_mode),
    ("validate", validate_chosen),
)


def run_pipeline(state: QuantState) -> QuantState:
    """Run the steps of `PIPELINE` on `state`, timing each: wall time, and the CPU time of this process (every
    thread: on a shared machine the wall time also counts what other jobs took)."""
    for name, step in PIPELINE:
        started, cpu = time.perf_counter(), time.process_time()
        step(state)
        state.seconds[name] = time.perf_counter() - started
        state.cpu_seconds[name] = time.process_time() - cpu
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
    dynamic = best.config.mode == "dynamic"
    fp32_nodes += list(state.dynamic_guarded.values()) if dynamic else [*state.rule_nodes, *state.guarded.values()]
    macs = {layer.name: layer.macs for layer in state.costs.layers}
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
        calibration=next((state.calibrations[m][1] for m in (state.method, state.options.method)
                          if m in state.calibrations), None),
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
        method_trials=() if dynamic else tuple(state.method_trials),
        exclusion_trials=state.dynamic_trials if dynamic else state.exclusion_trials,
        max_trials=state.options.max_trials,
        validation=state.validation,
        timing=best,
        step_seconds=dict(state.seconds),
        step_cpu_seconds=dict(state.cpu_seconds),
        placement=None if dynamic else state.placement,
        measure=None if dynamic else state.measure,
        fp32_macs=sum(macs.get(n.name, 0) for n in fp32_nodes),
        model_macs=state.costs.macs,
        mode=state.mode_choice,
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
    if options.mode == "dynamic" and eval_data is None:
        eval_data = calib  # nothing is calibrated: all of the data judges
    with tempfile.TemporaryDirectory(prefix="onnxslim-quantize-") as scratch:
        state = QuantState(options, source, size_fp32, calib, eval_data, Path(scratch), progress=progress, timer=timer)
        run_pipeline(state)
        return _result(state)
