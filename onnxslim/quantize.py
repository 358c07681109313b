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
* **Speed guard.** The requested configuration is timed against the fp32 model (same threads, same batch,
  interleaved run by run, median). Unless it is at least `min_speedup` (5 %) faster, alternatives are tried
  one change at a time, in this order, each kept only when faster than the best so far: the other
  activation type (u8 <-> s8; onnxruntime fuses only some variants into QLinearConv on a given CPU), the
  other format (QDQ <-> QOperator), per-tensor weights, and quantizing only the compute ops (Conv,
  ConvTranspose, Gemm, MatMul) so that element-wise ops stop paying Q/DQ overhead. When no candidate is
  `min_speedup` faster, the result is the fp32 model (`quantized` False) unless `force`.
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
  the budget is missed, the other calibration methods are tried, then the nodes whose quantization adds the
  most measured error are kept in fp32, fewest first, within `max_trials` trials. The speed guard then
  runs on that set of nodes: only candidates that meet the budget can be kept.

The library never prints: progress goes through an optional callback, results are dataclasses that
`report.py` renders.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxslim.calib import Batch, Dataset
from onnxslim.cpu import CpuChoice, CpuFeatures, choose_for_cpu, detect_cpu
from onnxslim.errors import DataError, ModelLoadError, UnsupportedModelError, UsageError, first_line
from onnxslim.io import LoadedModel, Validation, infer_tensor_infos, normalize_model, validate
from onnxslim.metrics import (
    Accuracy,
    AccuracyMeter,
    Fidelity,
    FidelityMeter,
    OutputLayout,
    find_batch_axis,
    has_one_position,
    output_layout,
    select_output,
)
from onnxslim.quant_guard import (
    MAX_TRIALS,
    RANGE_RATIO,
    AccuracyBudget,
    BudgetCheck,
    ExclusionTrial,
    NodeError,
    check_budget,
    concat_range_offenders,
    finish_errors,
    layer_norm_blocks,
    node_errors,
    rank_blocks,
    relative_errors,
    search_exclusions,
)
from onnxslim.runtime import cpu_session, physical_cores, session_options, time_interleaved
from onnxslim.runtime import ort as _ort

__all__ = [
    "FORMATS",
    "METHODS",
    "INT8_TYPES",
    "COMPUTE_OP_TYPES",
    "QUANTIZED_OP_TYPES",
    "MIN_SPEEDUP",
    "QuantConfig",
    "QuantizeOptions",
    "CandidateTiming",
    "SpeedDecision",
    "CalibrationSummary",
    "PreparedModel",
    "QuantizeResult",
    "MethodTrial",
    "Timer",
    "ProgressCallback",
    "find_quantized_nodes",
    "prepare_model",
    "calibrate",
    "quantize_with_ranges",
    "count_quantized_nodes",
    "alternatives",
    "decide",
    "search_fastest",
    "measure_latencies",
    "quantize_model",
]

logger = logging.getLogger(__name__)

FORMATS = ("qdq", "qoperator")
METHODS = ("minmax", "entropy", "percentile")
INT8_TYPES = ("u8", "s8")
MIN_SPEEDUP = 1.05  # int8 must be at least 5 % faster than fp32 to be kept (see the module docstring)
HOLDOUT_FRACTION = 0.2
CALIBRATION_MEMORY = 256 * 2**20
PER_CHANNEL_OPSET = 13  # DequantizeLinear's `axis` (per-channel weights in QDQ) needs opset 13
MIN_QUANT_OPSET = 10  # QuantizeLinear/DequantizeLinear exist from opset 10

# Ops that mean a model is already quantized: refused, never quantized twice.
QUANTIZED_OP_TYPES = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "ConvInteger",
        "MatMulInteger",
        "QGemm",
        "QAttention",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "MatMulIntegerToFloat",
        "MatMulNBits",
    }
)
# The compute ops: the "compute ops only" alternative quantizes these and nothing else.
COMPUTE_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")

_QUANT_TYPE_NAMES = {"u8": "QUInt8", "s8": "QInt8"}
_METHOD_NAMES = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
_FORMAT_NAMES = {"qdq": "QDQ", "qoperator": "QOperator"}
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
_ORT_METADATA = ("onnx.infer", "onnx.quant.pre_process")


# --------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class QuantConfig:
    """One way to quantize: format, activation and weight types, weight granularity, which op types.

    op_types None means every op type onnxruntime's quantizer handles; otherwise only these.
    """

    format: str = "qdq"
    activations: str = "u8"
    weights: str = "s8"
    per_channel: bool = True
    reduce_range: bool | None = None  # None: chosen for the CPU (see cpu.py)
    op_types: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UsageError(f"quantization format must be one of {list(FORMATS)}, not {self.format!r}")
        for what, value in (("activations", self.activations), ("weights", self.weights)):
            if value not in INT8_TYPES:
                raise UsageError(f"{what} type must be one of {list(INT8_TYPES)}, not {value!r}")
        if self.activations == "s8" and self.weights == "u8":
            raise UsageError("s8 activations with u8 weights is not supported by onnxruntime; use --weights s8")

    @property
    def label(self) -> str:
        """'qdq u8/s8 per-channel', '+ compute ops only' when op types are restricted."""
        text = f"{self.format} {self.activations}/{self.weights} {'per-channel' if self.per_channel else 'per-tensor'}"
        if self.reduce_range:
            text += " reduce-range"
        if self.op_types is not None:
            text += " compute-ops-only" if set(self.op_types) == set(COMPUTE_OP_TYPES) else f" ops={','.join(self.op_types)}"
        return text


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything `quantize_model` needs besides the model and the data.

    exclude: node-name globs or op types (an entry equal to an op type in the model excludes every node of
        that type) left in fp32.
    force: keep the fastest int8 model even when no candidate is `min_speedup` faster than fp32.
    threads: intra-op threads for the timing sessions (None: the physical cores available).
    calibration_memory: bytes of intermediate outputs the calibrator may hold at once (see module docstring).
    """

    config: QuantConfig = field(default_factory=QuantConfig)
    method: str = "minmax"
    exclude: tuple[str, ...] = ()
    force: bool = False
    min_speedup: float = MIN_SPEEDUP
    threads: int | None = None
    holdout_fraction: float = HOLDOUT_FRACTION
    calibration_memory: int = CALIBRATION_MEMORY
    output: str | None = None  # the output fidelity and accuracy read; default the first
    budget: AccuracyBudget = field(default_factory=AccuracyBudget)
    max_trials: int = MAX_TRIALS  # trial quantizations the accuracy guard may run (0: only check the budget)
    cpu: CpuFeatures | None = None  # None: detected from /proc/cpuinfo
    range_ratio: float | None = RANGE_RATIO  # Concats whose inputs' ranges differ more stay fp32 (None: never)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"calibration method must be one of {list(METHODS)}, not {self.method!r}")
        if self.min_speedup <= 0:
            raise UsageError(f"min_speedup must be positive, not {self.min_speedup}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be at least 1, not {self.threads}")
        if not 0 <= self.holdout_fraction < 1:
            raise UsageError(f"holdout fraction must be in [0, 1), not {self.holdout_fraction}")
        if self.calibration_memory < 1:
            raise UsageError("calibration memory must be positive")
        if self.max_trials < 0:
            raise UsageError(f"max trials must be 0 or more, not {self.max_trials}")


# --------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class CandidateTiming:
    """One int8 candidate as measured: median latency next to fp32's from the same interleaved run.

    On failure (the quantizer or onnxruntime refused it) the numbers are None and `error` says why.
    """

    config: QuantConfig
    latency_ms: float | None
    fp32_latency_ms: float | None
    size_bytes: int | None = None
    nodes_quantized: int | None = None
    error: str | None = None
    budget_met: bool | None = None  # None: not checked (counts as met)
    score: float | None = None  # fidelity score on the held-out data, when checked

    @property
    def speedup(self) -> float | None:
        if self.latency_ms is None or self.fp32_latency_ms is None or self.latency_ms <= 0:
            return None
        return self.fp32_latency_ms / self.latency_ms


@dataclass(frozen=True)
class SpeedDecision:
    """What the speed guard chose: `chosen` is the int8 candidate to keep (None: keep fp32); `best` is the
    fastest int8 candidate that ran (None when none did)."""

    chosen: CandidateTiming | None
    best: CandidateTiming | None
    reason: str


@dataclass(frozen=True)
class CalibrationSummary:
    """How calibration ran: the data used and the memory bound it kept."""

    method: str
    data: str
    samples: int
    batches: int
    batch_size: int
    tensors: int  # tensors whose ranges were calibrated
    chunk_batches: int  # batches per collection call: the most the calibrator holds at once
    bytes_per_batch: int  # intermediate outputs of one batch, over the calibrated tensors
    memory_bound_bytes: int  # chunk_batches * bytes_per_batch
    peak_held_batches: int  # the most batches the calibrator actually held (measured)
    random: bool = False


@dataclass(frozen=True)
class PreparedModel:
    """The fp32 model as the quantizer sees it: opset-upgraded, basic-optimized, shape-inferred."""

    model: onnx.ModelProto
    source_opset: int
    opset: int
    per_channel: bool  # False when per-channel was asked for but the opset upgrade failed
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuantizeResult:
    """The model to write and everything the report shows.

    `model` is the int8 model when `quantized`, else the (normalized) fp32 model. The int8 fields
    (`config`, `latency_int8_ms`, `size_int8`, `fidelity`, ...) describe the fastest int8 candidate even when
    it was not kept, so the report can say what int8 would have cost and gained.
    """

    model: onnx.ModelProto
    quantized: bool
    forced: bool
    reason: str
    int8_model: onnx.ModelProto  # the fastest int8 candidate (== model when quantized)
    config: QuantConfig | None
    method: str
    latency_fp32_ms: float | None
    latency_int8_ms: float | None
    speedup: float | None
    size_fp32: int
    size_int8: int | None
    nodes_quantized: int | None
    nodes_fp32: int | None
    fidelity: Fidelity | None
    fidelity_data: str
    accuracy_fp32: Accuracy | None
    accuracy_int8: Accuracy | None
    output: str
    calibration: CalibrationSummary
    candidates: tuple[CandidateTiming, ...]
    threads: int
    timing_shapes: dict[str, tuple[int, ...]]
    min_speedup: float
    opset: tuple[int, int]  # (source, quantized model)
    notes: tuple[str, ...] = ()
    cpu: CpuChoice | None = None
    budget: AccuracyBudget = field(default_factory=AccuracyBudget)
    budget_check: BudgetCheck | None = None  # the reported int8 model against the budget
    fp32_nodes: tuple[NodeError, ...] = ()  # nodes the guard (and --exclude) kept in fp32, and why
    method_trials: tuple[MethodTrial, ...] = ()
    exclusion_trials: tuple[ExclusionTrial, ...] = ()
    max_trials: int = MAX_TRIALS
    validation: Validation | None = field(default=None, repr=False)  # what `validate` proved, for write_validated

    @property
    def budget_met(self) -> bool | None:
        return None if self.budget_check is None else self.budget_check.met

    @property
    def accuracy_delta(self) -> float | None:
        """int8 top-1 minus fp32 top-1 (points as a fraction), when labels were given."""
        if self.accuracy_fp32 is None or self.accuracy_int8 is None:
            return None
        return self.accuracy_int8.top1 - self.accuracy_fp32.top1

    @property
    def format(self) -> str | None:
        return None if self.config is None else self.config.format

    @property
    def activations(self) -> str | None:
        return None if self.config is None else self.config.activations


@dataclass(frozen=True)
class MethodTrial:
    """One calibration method tried by the accuracy guard, with every node of the first trial quantized."""

    method: str
    check: BudgetCheck


# Progress: (stage, done, total), e.g. ("calibrating", 12, 205). Stages: calibrating, quantizing, timing,
# evaluating. `done` counts up to `total` within a stage.
ProgressCallback = Callable[[str, int, int], None]
# Timer: the models to time (config None is the fp32 reference, always first) and the feeds; returns the
# median latency in ms of each, measured in one run.
Timer = Callable[[Sequence[tuple["QuantConfig | None", onnx.ModelProto]], Mapping[str, np.ndarray]], Sequence[float]]


# ------------------------------------------------------------------------------------ already quantized


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_nodes(sub)


def find_quantized_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes that show the model is already quantized (QDQ pairs, QLinear*, integer convolutions ...)."""
    return [n for n in _all_nodes(model.graph) if n.op_type in QUANTIZED_OP_TYPES or n.op_type.startswith("QLinear")]


def _refuse_quantized(model: onnx.ModelProto) -> None:
    found = find_quantized_nodes(model)
    if found:
        kinds = sorted({n.op_type for n in found})
        raise UnsupportedModelError(
            f"the model is already quantized: {len(found)} quantization node(s) ({', '.join(kinds)}; e.g. "
            f"{found[0].name or found[0].op_type!r}). Quantize the fp32 model it came from instead."
        )


# --------------------------------------------------------------------------------------- pre-processing


def _default_opset(model: onnx.ModelProto) -> int:
    return next(imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx"))


def _session(
    model: onnx.ModelProto | str, threads: int | None = None, level: str = "all", *, spinning: bool = True
) -> Any:
    return cpu_session(model, session_options(threads=threads, opt_level=level, spinning=spinning))


def _upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """The model converted to opset `target` and checked; raises on any failure."""
    converted = onnx.version_converter.convert_version(model, target)
    onnx.checker.check_model(converted)
    return converted


def _strip_unused_domains(model: onnx.ModelProto) -> None:
    """onnxruntime's optimizer imports every domain it knows; keep the default and those nodes use."""
    used = {n.domain or "" for n in _all_nodes(model.graph)} | {""}
    kept = [imp for imp in model.opset_import if (imp.domain or "") in used or imp.domain == "ai.onnx"]
    if len(kept) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(kept)


def _basic_optimize(model: onnx.ModelProto, scratch: Path) -> onnx.ModelProto:
    """onnxruntime's basic-level graph optimizations, saved: plain ONNX ops only, symbolic dims kept."""
    options = session_options(opt_level="basic")
    options.optimized_model_filepath = str(scratch / "basic.onnx")
    try:
        _ort().InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise UnsupportedModelError(f"onnxruntime cannot load the model, so it cannot quantize it: {first_line(e)}") from e
    optimized = onnx.load_model(options.optimized_model_filepath)
    _strip_unused_domains(optimized)
    _declare_like(optimized, model)
    optimized, _ = normalize_model(optimized)  # names the nodes the optimizer created without a name
    return optimized


def _declare_like(model: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """Give `model`'s graph inputs and outputs the declarations (types, symbolic dims) they have in `source`:
    they are the model's contract, and optimizers, shape inference (which can make a Resize output's dims
    concrete) and the quantizer must not change them. Applied after the optimizer and to every int8 candidate;
    the prepared model in between only calibrates, at concrete shapes."""
    for target, declared in ((model.graph.input, source.graph.input), (model.graph.output, source.graph.output)):
        by_name = {v.name: v for v in declared}
        for value in target:
            if value.name in by_name:
                value.CopyFrom(by_name[value.name])


def _infer_types(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """Symbolic shape inference, so every tensor has a type for the quantizer while dims stay symbolic.

    Tensors onnx cannot type (custom ops, shapes computed at run time) get their element type and rank
    from `io.infer_tensor_infos` at the calibration shapes, with every dim left unknown.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:  # noqa: BLE001 - onnx raises several types
        logger.debug("onnx shape inference failed on the prepared model: %s", first_line(e))
        inferred = model
    graph = inferred.graph
    typed = {v.name for v in [*graph.input, *graph.output, *graph.value_info] if v.type.tensor_type.elem_type}
    typed |= {t.name for t in graph.initializer}
    missing = [o for n in graph.node for o in n.output if o and o not in typed]
    if missing:
        infos = infer_tensor_infos(model, input_shapes)
        for name in missing:
            if name in infos:
                info = infos[name]
                graph.value_info.append(onnx.helper.make_tensor_value_info(name, info.elem_type, [None] * len(info.shape)))
    return inferred


def prepare_model(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]], *, per_channel: bool
) -> PreparedModel:
    """Pre-process a normalized fp32 model for calibration and quantization (see the module docstring)."""
    _refuse_quantized(model)
    notes: list[str] = []
    source_opset = _default_opset(model)
    want_per_channel = per_channel
    if source_opset < PER_CHANNEL_OPSET and (per_channel or source_opset < MIN_QUANT_OPSET):
        try:
            model = _upgrade_opset(model, PER_CHANNEL_OPSET)
            notes.append(f"opset upgraded from {source_opset} to {PER_CHANNEL_OPSET} for quantization")
        except Exception as e:  # noqa: BLE001 - the converter raises many types; any failure means "cannot upgrade"
            if source_opset < MIN_QUANT_OPSET:
                raise UnsupportedModelError(
                    f"opset {source_opset} has no QuantizeLinear/DequantizeLinear and upgrading the model to opset "
                    f"{PER_CHANNEL_OPSET} failed ({first_line(e)}); re-export it with opset {PER_CHANNEL_OPSET} or newer"
                ) from e
            want_per_channel = False
            message = (
                f"per-channel weights need opset {PER_CHANNEL_OPSET} and upgrading from opset {source_opset} failed "
                f"({first_line(e)}); quantizing weights per tensor instead"
            )
            logger.warning(message)
            notes.append(message)
    with tempfile.TemporaryDirectory(prefix="onnxslim-quant-") as scratch:
        optimized = _basic_optimize(model, Path(scratch))
    prepared = _infer_types(optimized, input_shapes)
    return PreparedModel(prepared, source_opset, _default_opset(prepared), want_per_channel, tuple(notes))


# ------------------------------------------------------------------------------------------ calibration


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    """onnxruntime's quantizer prints (histogram progress) and logs warnings on the root logger (a bogus
    "please pre-process": we did). Keep stdout clean for --json and pass its messages on at debug level."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if "onnxruntime" in record.pathname.replace(os.sep, "/"):
                logger.debug("onnxruntime: %s", record.getMessage())
                return False
            return True

    root = logging.getLogger()
    quiet = _Filter()
    root.addFilter(quiet)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(quiet)


def _calibrated_tensors(model: onnx.ModelProto) -> set[str]:
    """The tensors onnxruntime's calibrator collects for `model`: float inputs and outputs of every node."""
    graph = model.graph
    values = {v.name: v for v in [*graph.value_info, *graph.output, *graph.input]}
    initializers = {t.name for t in graph.initializer}
    names = set()
    for node in graph.node:
        for name in [*node.input, *node.output]:
            value = values.get(name)
            if value is not None and name not in initializers and value.type.tensor_type.elem_type in _FLOAT_TYPES:
                names.add(name)
    return names


def _bytes_per_batch(
    model: onnx.ModelProto, tensors: set[str], input_shapes: Mapping[str, Sequence[int]], method: str
) -> int:
    """What onnxruntime's calibrator keeps per batch until its collection call ends: for minmax a min and a
    max per tensor (it reduces in the graph), for the histogram methods every calibrated tensor whole."""
    if method == "minmax":
        return max(1, 2 * 4 * len(tensors))
    infos = infer_tensor_infos(model, input_shapes)
    total = 0
    for name in tensors:
        info = infos.get(name)
        if info is not None:
            total += int(np.prod(info.shape, dtype=np.int64)) * info.dtype.itemsize
    return max(total, 1)


class _ChunkReader:
    """A CalibrationDataReader over one chunk: up to `limit` batches of one feed shape, then None.

    The histogram calibrators stack the outputs of one collection call, so a chunk never mixes batch
    shapes (the last batch of a symbolic-batch dataset is smaller). Counts what the calibrator holds.
    """

    def __init__(self, batches: _Peekable, limit: int, on_batch: Callable[[Batch], None]) -> None:
        self._batches, self._limit, self._on_batch = batches, limit, on_batch
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self.held = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.held >= self._limit:
            return None
        batch = self._batches.peek()
        if batch is None:
            return None
        shapes = {name: array.shape for name, array in batch.feeds.items()}
        if self._shapes is not None and shapes != self._shapes:
            return None
        self._shapes = shapes
        self._batches.advance()
        self.held += 1
        self._on_batch(batch)
        return batch.feeds


class _Peekable:
    def __init__(self, iterator: Iterator[Batch]) -> None:
        self._iterator = iterator
        self._next: Batch | None = None
        self._done = False

    def peek(self) -> Batch | None:
        if self._next is None and not self._done:
            self._next = next(self._iterator, None)
            self._done = self._next is None
        return self._next

    def advance(self) -> None:
        self._next = None


def _limited(batches: Iterator[Batch], count: int) -> Iterator[Batch]:
    for index, batch in enumerate(batches):
        if index >= count:
            return
        yield batch


def _create_calibrator(model_path: Path, method: str, scratch: Path) -> Any:
    """onnxruntime's calibrator for `method`, with the settings `quantize_static` would give it, and a
    session of ours (quiet logging)."""
    from onnxruntime.quantization import calibrate as ort_calibrate
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    op_types = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))  # what quantize_static calibrates by default
    augmented = str(scratch / "augmented.onnx")
    if method == "minmax":
        calibrator = ort_calibrate.MinMaxCalibrater(model_path, op_types, augmented)
    elif method == "entropy":
        calibrator = ort_calibrate.EntropyCalibrater(model_path, op_types, augmented)
    else:
        calibrator = ort_calibrate.PercentileCalibrater(model_path, op_types, augmented, num_bins=2048, symmetric=True)
    calibrator.augment_graph()
    calibrator.infer_session = _session(augmented, level="none")
    return calibrator


def calibrate(
    prepared: onnx.ModelProto,
    dataset: Dataset,
    method: str = "minmax",
    *,
    batches: int | None = None,
    memory: int = CALIBRATION_MEMORY,
    cache_path: str | os.PathLike[str],
    progress: ProgressCallback | None = None,
) -> CalibrationSummary:
    """Calibrate `prepared` on the first `batches` batches of `dataset` (all when None) in bounded memory
    and write the ranges to `cache_path` (onnxruntime's calibration cache, read by `quantize_with_ranges`).

    Raises DataError when onnxruntime cannot run a batch or a range comes out NaN or infinite.
    """
    total = dataset.num_batches if batches is None else min(batches, dataset.num_batches)
    if total < 1:
        raise DataError(f"{dataset.description}: no batches to calibrate on")
    tensors = _calibrated_tensors(prepared)
    per_batch = _bytes_per_batch(prepared, tensors, dataset.input_shapes, method)
    chunk = max(1, memory // per_batch)
    done = 0
    peak = 0
    samples = min(dataset.num_samples, total * dataset.batch_size)

    def on_batch(batch: Batch) -> None:
        nonlocal done
        done += 1
        for name, array in batch.feeds.items():
            if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                raise DataError(
                    f"{dataset.description}: calibration batch {done} holds NaN or infinite values in input "
                    f"{name!r}; calibration data must be finite"
                )
        if progress is not None:
            progress("calibrating", done, total)

    with tempfile.TemporaryDirectory(prefix="onnxslim-calib-") as scratch, _quiet_onnxruntime():
        model_path = Path(scratch) / "prepared.onnx"
        onnx.save_model(prepared, str(model_path))
        try:
            calibrator = _create_calibrator(model_path, method, Path(scratch))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise UnsupportedModelError(f"onnxruntime cannot prepare the model for calibration: {first_line(e)}") from e
        source = _Peekable(_limited(dataset.batches(), total))
        while source.peek() is not None:
            first = source.peek()
            assert first is not None
            reader = _ChunkReader(source, chunk, on_batch)
            try:
                calibrator.collect_data(reader)
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
                shapes = {name: list(array.shape) for name, array in first.feeds.items()}
                raise DataError(
                    f"{dataset.description}: onnxruntime failed to run calibration batch {done} (inputs {shapes}): "
                    f"{first_line(e)}"
                ) from e
            peak = max(peak, reader.held)
        try:
            ranges = calibrator.compute_data()
        except Exception as e:  # noqa: BLE001 - onnxruntime raises anything from ValueError to AssertionError
            raise UnsupportedModelError(f"onnxruntime's {method} calibrator failed: {first_line(e)}") from e
        _check_ranges(ranges, dataset.description)
        from onnxruntime.quantization.calibrate import save_tensors_data

        save_tensors_data(ranges, cache_path)
    return CalibrationSummary(
        method=method, data=dataset.description, samples=samples, batches=total, batch_size=dataset.batch_size,
        tensors=len(ranges.data), chunk_batches=chunk, bytes_per_batch=per_batch,
        memory_bound_bytes=chunk * per_batch, peak_held_batches=peak, random=dataset.is_random,
    )


def _check_ranges(ranges: Any, description: str) -> None:
    for name, data in ranges.items():
        low, high = data.range_value
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise DataError(
                f"{description}: calibration gave tensor {name!r} a range of [{low}, {high}]: the data holds NaN or "
                "infinite values, or the model overflows on it. Check the calibration data."
            )


# ---------------------------------------------------------------------------------------- quantization


def quantize_with_ranges(
    prepared_path: str | os.PathLike[str],
    cache_path: str | os.PathLike[str],
    config: QuantConfig,
    method: str,
    *,
    exclude_nodes: Sequence[str] = (),
) -> onnx.ModelProto:
    """Quantize the prepared model file with ranges from `calibrate`, as `config` says.

    Raises UnsupportedModelError when onnxruntime's quantizer fails.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory(prefix="onnxslim-q-") as scratch, _quiet_onnxruntime():
        output = Path(scratch) / "int8.onnx"
        try:
            quantize_static(
                str(prepared_path),
                str(output),
                calibration_data_reader=None,
                quant_format=getattr(QuantFormat, _FORMAT_NAMES[config.format]),
                op_types_to_quantize=list(config.op_types) if config.op_types is not None else None,
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                activation_type=getattr(QuantType, _QUANT_TYPE_NAMES[config.activations]),
                weight_type=getattr(QuantType, _QUANT_TYPE_NAMES[config.weights]),
                nodes_to_exclude=list(exclude_nodes),
                calibrate_method=getattr(CalibrationMethod, _METHOD_NAMES[method]),
                calibration_cache_path=str(cache_path),
            )
        except Exception as e:  # noqa: BLE001 - the quantizer raises anything from ValueError to AssertionError
            raise UnsupportedModelError(f"onnxruntime's quantizer failed ({config.label}): {first_line(e)}") from e
        quantized = onnx.load_model(str(output))
    _strip_unused_domains(quantized)
    kept = [p for p in quantized.metadata_props if p.key not in _ORT_METADATA]
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
    by_name = {n.name: n for n in int8.graph.node}
    producers = {o: n for n in int8.graph.node for o in n.output}
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


# ------------------------------------------------------------------------------------------ speed guard


def alternatives(config: QuantConfig, *, per_channel_possible: bool = True) -> list[tuple[str, QuantConfig]]:
    """The one-change alternatives to `config`, in the order the speed guard tries them.

    1. the other activation type (s8 activations take s8 weights);
    2. the other format;
    3. per-tensor weights (when per-channel);
    4. only the compute ops quantized (when every op type was).
    """
    steps: list[tuple[str, QuantConfig]] = []
    flipped = "s8" if config.activations == "u8" else "u8"
    steps.append(("activations", replace(config, activations=flipped, weights="s8" if flipped == "s8" else config.weights)))
    steps.append(("format", replace(config, format="qoperator" if config.format == "qdq" else "qdq")))
    if config.per_channel and per_channel_possible:
        steps.append(("per-tensor", replace(config, per_channel=False)))
    if config.op_types is None:
        steps.append(("compute-ops-only", replace(config, op_types=COMPUTE_OP_TYPES)))
    return steps


def decide(
    candidates: Sequence[CandidateTiming],
    *,
    min_speedup: float = MIN_SPEEDUP,
    force: bool = False,
    tried: int | None = None,
) -> SpeedDecision:
    """Pure: keep the fastest candidate that meets the accuracy budget if it is at least `min_speedup`
    faster than fp32, or if `force`. Candidates whose `budget_met` is False are never kept unless `force`
    and none meets it (then the most faithful one is).

    `tried` is how many variants were tried in all, for the message (default: the candidates given).
    """
    ran = [c for c in candidates if c.speedup is not None]
    if not ran:
        failures = "; ".join(dict.fromkeys(c.error for c in candidates if c.error)) or "no candidate was measured"
        return SpeedDecision(None, None, f"no int8 model could be built: {failures}")
    meeting = [c for c in ran if c.budget_met is not False]
    if not meeting:
        closest = max(ran, key=lambda c: (c.score if c.score is not None else -math.inf, c.speedup or 0.0))
        if force:
            return SpeedDecision(
                closest, closest,
                f"--force: keeping int8 ({closest.config.label}) although no int8 variant meets the accuracy budget",
            )
        return SpeedDecision(
            None, closest,
            f"no int8 variant tried meets the accuracy budget (the closest, {closest.config.label}, has fidelity "
            f"{closest.score if closest.score is not None else float('nan'):.4f}); keeping the fp32 model",
        )
    best = max(meeting, key=lambda c: c.speedup or 0.0)
    speedup = best.speedup or 0.0
    if speedup >= min_speedup:
        return SpeedDecision(best, best, f"int8 ({best.config.label}) is {speedup:.2f}x as fast as fp32")
    if force:
        return SpeedDecision(
            best, best,
            f"--force: keeping int8 ({best.config.label}) although it is {speedup:.2f}x as fast as fp32 "
            f"(needs {min_speedup:.2f}x)",
        )
    return SpeedDecision(
        None, best,
        f"int8 is not faster than fp32 on this machine: the fastest of {tried or len(ran)} int8 variant(s) tried "
        f"({best.config.label}) is {speedup:.2f}x as fast (needs {min_speedup:.2f}x); keeping the fp32 model",
    )


def search_fastest(
    requested: QuantConfig,
    measure: Callable[[Sequence[QuantConfig]], Sequence[CandidateTiming]],
    *,
    per_channel_possible: bool = True,
    min_speedup: float = MIN_SPEEDUP,
    force: bool = False,
) -> tuple[SpeedDecision, tuple[CandidateTiming, ...]]:
    """The speed guard's search. `measure(configs)` builds the configs and times them with fp32 in one run.

    The requested config is measured first and kept if `min_speedup` faster. Otherwise each kind of change
    (see `alternatives`), applied to the best config so far, is measured beside it in one run and replaces
    it when faster; the decision is then made on the best. Returns the decision and every candidate with
    its latest timing, in the order first tried.
    """
    latest: dict[QuantConfig, CandidateTiming] = {}

    def run(configs: Sequence[QuantConfig]) -> list[CandidateTiming]:
        timings = list(measure(configs))
        for timing in timings:
            latest[timing.config] = timing
        return timings

    (first,) = run([requested])
    if first.speedup is not None and first.speedup >= min_speedup and first.budget_met is not False:
        return decide([first], min_speedup=min_speedup), tuple(latest.values())
    best = first
    tried = {requested}
    for kind, _ in alternatives(requested, per_channel_possible=per_channel_possible):
        # the same kind of change, applied to the best configuration so far
        step = dict(alternatives(best.config, per_channel_possible=per_channel_possible)).get(kind)
        if step is None or step in tried:
            continue
        tried.add(step)
        pair = run([best.config, step] if best.speedup is not None else [step])
        timed = {t.config: t for t in pair}
        best = timed.get(best.config, best)
        challenger = timed[step]
        if challenger.budget_met is False:
            continue  # never the base of further changes: it loses accuracy the budget does not allow
        if challenger.speedup is not None and (
            best.speedup is None or best.budget_met is False or challenger.speedup > best.speedup
        ):
            best = challenger
    # The winner of the head-to-head comparisons (each made within one run), not the largest ratio seen
    # across runs: ratios from different runs carry different noise.
    finalists = [best] if best.speedup is not None else list(latest.values())
    decision = decide(finalists, min_speedup=min_speedup, force=force, tried=len(latest))
    return decision, tuple(latest.values())


def measure_latencies(
    models: Sequence[onnx.ModelProto],
    feeds: Mapping[str, np.ndarray],
    *,
    threads: int,
    warmup: int = 3,
    min_rounds: int = 15,
    max_rounds: int = 200,
    budget_s: float = 4.0,
    clock: Callable[[], float] = time.perf_counter,
    progress: ProgressCallback | None = None,
    spinning: bool = False,
) -> list[float]:
    """Median latency in ms of each model: one onnxruntime session each (same threads, all optimizations,
    no thread spinning unless `spinning`), the same feeds, runs interleaved round by round (order
    alternating), `min_rounds` to `max_rounds` rounds within about `budget_s` seconds of timed runs."""
    sessions = []
    for model in models:
        try:
            sessions.append(_session(model, threads, spinning=spinning))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelLoadError(f"onnxruntime cannot load a model to time: {first_line(e)}") from e

    def report(rounds: int, spent: float) -> None:
        if progress is not None:
            expected = math.ceil(budget_s / (spent / rounds)) if spent > 0 else max_rounds
            progress("timing", rounds, max(rounds, min(max_rounds, max(min_rounds, expected))))

    times = time_interleaved(
        sessions, [feeds], warmup=warmup, clock=clock, on_round=report,
        keep_going=lambda rounds, spent: rounds < max_rounds and (rounds < min_rounds or spent < budget_s),
    )
    return [float(np.median(t)) * 1e3 for t in times]


# ------------------------------------------------------------------------------------------- fidelity


class _Evaluator:
    """Runs int8 candidates against fp32 on the fidelity data: fidelity over every element of the output
    (its batch axis found once, `metrics.find_batch_axis`), accuracy with labels. The fp32 outputs are kept
    (up to `cache_bytes`) so each candidate costs one pass of its own."""

    def __init__(
        self,
        fp32: onnx.ModelProto,
        split: _Split,
        output: str,
        *,
        threads: int,
        progress: ProgressCallback | None,
        cache_bytes: int = 256 * 2**20,
    ) -> None:
        self._fp32, self._split, self._output, self._threads, self._progress = fp32, split, output, threads, progress
        self._reference = _session(fp32, threads)
        self._cache: list[np.ndarray | None] = []
        self._cache_left = cache_bytes
        self.layout: OutputLayout | None = None
        self.want_accuracy = split.fidelity_data.has_labels
        self.note: str | None = None
        self.fp32_accuracy: Accuracy | None = None
        self.runs = 0

    def _layout_for(self, batch: Batch, want: np.ndarray) -> OutputLayout:
        symbolic = all(
            v.type.tensor_type.shape.dim and not v.type.tensor_type.shape.dim[0].HasField("dim_value")
            for v in self._fp32.graph.input if v.name in batch.feeds
        )
        rows = len(next(iter(batch.feeds.values())))

        def probe(samples: int) -> Sequence[int]:
            feeds = {name: np.concatenate([array] * samples)[:samples] if rows == 1 else array[:samples]
                     for name, array in batch.feeds.items()}
            return np.shape(self._reference.run([self._output], feeds)[0])

        batch_axis = find_batch_axis(self._fp32, self._output, np.shape(want), rows, probe if symbolic else None)
        return output_layout(self._fp32, self._output, np.shape(want), batch_axis)

    def _rows(self, array: np.ndarray, batch: Batch) -> np.ndarray:
        """The rows of a padded batch that hold real samples, on the output's batch axis."""
        assert self.layout is not None
        axis = self.layout.batch_axis
        if axis is None:
            return array
        return np.take(array, np.arange(batch.size), axis=axis)

    def _reference_outputs(self, number: int, batch: Batch) -> np.ndarray:
        if number - 1 < len(self._cache) and self._cache[number - 1] is not None:
            cached = self._cache[number - 1]
            assert cached is not None
            return cached
        want = self._reference.run([self._output], batch.feeds)[0]
        if self.layout is None:
            self.layout = self._layout_for(batch, want)
        want = self._rows(want, batch)
        if number - 1 == len(self._cache):
            keep = want.nbytes <= self._cache_left
            self._cache.append(want if keep else None)
            self._cache_left -= want.nbytes if keep else 0
        return want

    def __call__(self, int8: onnx.ModelProto) -> tuple[Fidelity, Accuracy | None, Accuracy | None]:
        """Fidelity of `int8` against fp32, and the accuracies of both (None without labels)."""
        candidate = _session(int8, self._threads)
        fidelity_meter: FidelityMeter | None = None
        accuracy_meters: tuple[AccuracyMeter, AccuracyMeter] | None = None
        total = self._split.fidelity_batches
        for number, batch in enumerate(self._split.fidelity(), start=1):
            try:
                want = self._reference_outputs(number, batch)
                got = self._rows(candidate.run([self._output], batch.feeds)[0], batch)
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise DataError(f"onnxruntime failed on evaluation batch {number}: {first_line(e)}") from e
            assert self.layout is not None
            if fidelity_meter is None:
                fidelity_meter = FidelityMeter(self.layout)
                if self.want_accuracy:
                    if has_one_position(np.shape(want), self.layout):
                        accuracy_meters = (AccuracyMeter(self.layout), AccuracyMeter(self.layout))
                    else:
                        self.want_accuracy = False
                        self.note = (
                            f"labels ignored: output {self._output!r} of shape {list(np.shape(want))} is not a "
                            "classifier's (one class score per sample)"
                        )
            fidelity_meter.update(want, got)
            if accuracy_meters is not None and batch.labels is not None:
                accuracy_meters[0].update(want, batch.labels)
                accuracy_meters[1].update(got, batch.labels)
            if self._progress is not None:
                self._progress("evaluating", number, total)
        self.runs += 1
        if fidelity_meter is None:
            raise DataError("no evaluation batch to measure fidelity on")
        if accuracy_meters is None:
            return fidelity_meter.result(), None, None
        return fidelity_meter.result(), accuracy_meters[0].result(), accuracy_meters[1].result()


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


@dataclass(frozen=True)
class _Split:
    """Which batches calibrate and which measure fidelity."""

    calibration_batches: int
    fidelity_data: Dataset
    fidelity_skip: int  # leading batches of `fidelity_data` that are not for fidelity
    fidelity_batches: int
    description: str
    note: str | None = None

    def fidelity(self) -> Iterator[Batch]:
        return _skip(self.fidelity_data.batches(), self.fidelity_skip)


def _split(calib: Dataset, eval_data: Dataset | None, fraction: float) -> _Split:
    """`eval_data` measures fidelity when given; else the last `fraction` of the calibration batches."""
    if eval_data is not None:
        return _Split(
            calib.num_batches, eval_data, 0, eval_data.num_batches,
            f"{eval_data.description} ({eval_data.num_samples} samples)",
        )
    held = int(calib.num_batches * fraction)
    if not held:
        return _Split(
            calib.num_batches, calib, 0, calib.num_batches,
            f"{calib.description} (the calibration data itself: too few batches to hold any out)",
            "fidelity is measured on the calibration data: give --eval or more data for a held-out measure",
        )
    kept = calib.num_batches - held
    held_samples = calib.num_samples - kept * calib.batch_size
    return _Split(
        kept, calib, kept, held,
        f"last {held} of {calib.num_batches} batches of {calib.description} ({held_samples} samples, not used "
        "for calibration)",
    )


def _skip(batches: Iterator[Batch], count: int) -> Iterator[Batch]:
    for index, batch in enumerate(batches):
        if index >= count:
            yield batch


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
        progress: ProgressCallback | None,
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
            _declare_like(result, self._source)
            _session(result, self._threads)  # a candidate onnxruntime cannot load is no candidate
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

    def measure(self, configs: Sequence[QuantConfig]) -> list[CandidateTiming]:
        """Build `configs` and time those that built against fp32, in one run."""
        models = {config: self.build(config) for config in configs}
        good = [config for config in configs if isinstance(models[config], onnx.ModelProto)]
        entries: list[tuple[QuantConfig | None, onnx.ModelProto]] = [(None, self._source)]
        entries += [(config, models[config]) for config in good]  # type: ignore[misc]
        latencies = list(self._timer(entries, self._feeds)) if good else []
        timings = []
        for config in configs:
            model = models[config]
            if isinstance(model, UnsupportedModelError):
                timings.append(CandidateTiming(config, None, None, error=str(model)))
                continue
            timings.append(
                CandidateTiming(
                    config, float(latencies[1 + good.index(config)]), float(latencies[0]), _size(model),
                    self.count(config, model)[0],
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


def _consumer_view(int8: onnx.ModelProto, tensors: Sequence[str]) -> dict[str, str]:
    """For each fp32 tensor, the int8 model's tensor its consumers read: the DequantizeLinear output of its
    QuantizeLinear -> DequantizeLinear pair, or the tensor itself when it stays float."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in int8.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    produced = {o for n in int8.graph.node for o in n.output} | {i.name for i in int8.graph.input}
    view = {}
    for tensor in tensors:
        quantize = next((n for n in consumers.get(tensor, []) if n.op_type == "QuantizeLinear"), None)
        dequantize = None
        if quantize is not None:
            dequantize = next((n for n in consumers.get(quantize.output[0], []) if n.op_type == "DequantizeLinear"), None)
        if dequantize is not None:
            view[tensor] = dequantize.output[0]
        elif tensor in produced:
            view[tensor] = tensor
    return view


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    existing = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in existing:
            exposed.graph.output.append(onnx.ValueInfoProto(name=name))
    return exposed


def measure_tensor_errors(
    prepared: onnx.ModelProto, int8_qdq: onnx.ModelProto, batches: Iterator[Batch], *, threads: int
) -> dict[str, float]:
    """Relative error ||int8 - fp32|| / ||fp32|| of every float tensor of `prepared`, as the int8 (QDQ)
    model's consumers read it, over `batches`. Both models run unfused (basic optimizations), every tensor
    exposed."""
    tensors = sorted(_calibrated_tensors(prepared) - {i.name for i in prepared.graph.input})
    view = _consumer_view(int8_qdq, tensors)
    tensors = [t for t in tensors if t in view]
    reference = _session(_with_outputs(prepared, tensors), threads, level="basic")
    candidate = _session(_with_outputs(int8_qdq, [view[t] for t in tensors]), threads, level="basic")
    sums: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        want = dict(zip(tensors, reference.run(tensors, batch.feeds), strict=True))
        got = dict(zip(tensors, candidate.run([view[t] for t in tensors], batch.feeds), strict=True))
        relative_errors(want, got, sums)
    return finish_errors(sums)


def quantize_model(
    model: LoadedModel | onnx.ModelProto,
    calib: Dataset,
    options: QuantizeOptions | None = None,
    *,
    eval_data: Dataset | None = None,
    progress: ProgressCallback | None = None,
    timer: Timer | None = None,
) -> QuantizeResult:
    """Quantize `model` to int8 with onnxruntime, calibrated on `calib`, guarded for accuracy and speed
    (module docstring).

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
    _refuse_quantized(source)
    notes: list[str] = []
    shapes = dict(calib.input_shapes)
    output = select_output(source, options.output)
    if calib.is_random:
        notes.append("calibration data is random: the ranges, fidelity and accuracy mean nothing (smoke test only)")
    cpu = choose_for_cpu(options.cpu or detect_cpu(), options.config.reduce_range)
    budget = options.budget

    prepared = prepare_model(source, shapes, per_channel=options.config.per_channel)
    notes += prepared.notes
    config = replace(options.config, reduce_range=cpu.reduce_range)
    if config.per_channel and not prepared.per_channel:
        config = replace(config, per_channel=False)
    user_excluded = _resolve_exclusions(options.exclude, [source, prepared.model], prepared.model)
    split = _split(calib, eval_data, options.holdout_fraction)
    if split.note:
        notes.append(split.note)
    if budget.max_drop is not None and not split.fidelity_data.has_labels:
        raise UsageError("--max-drop needs labels in the evaluation data (--eval, or --calib with labels); "
                         "without labels use --min-fidelity")
    threads = options.threads or physical_cores()
    feeds = next(iter(calib.batches())).feeds

    def default_timer(entries: Sequence[tuple[QuantConfig | None, onnx.ModelProto]], feeds: Mapping[str, np.ndarray]) -> list[float]:
        return measure_latencies([m for _, m in entries], feeds, threads=threads, progress=progress)

    evaluator = _Evaluator(source, split, output, threads=threads, progress=progress)
    evaluated: dict[tuple[QuantConfig, str, tuple[str, ...]], tuple[Fidelity, Accuracy | None, Accuracy | None, BudgetCheck]] = {}

    def evaluate(int8: onnx.ModelProto, key: tuple[QuantConfig, str, tuple[str, ...]]) -> BudgetCheck:
        if key not in evaluated:
            fidelity, accuracy_fp32, accuracy_int8 = evaluator(int8)
            evaluated[key] = (fidelity, accuracy_fp32, accuracy_int8, check_budget(budget, fidelity, accuracy_fp32, accuracy_int8))
        return evaluated[key][3]

    with tempfile.TemporaryDirectory(prefix="onnxslim-quantize-") as scratch:
        prepared_path = Path(scratch) / "prepared.onnx"
        onnx.save_model(prepared.model, str(prepared_path))
        calibrations: dict[str, tuple[Path, CalibrationSummary]] = {}

        def calibrated(method: str) -> tuple[Path, CalibrationSummary]:
            if method not in calibrations:
                path = Path(scratch) / f"ranges-{method}.json"
                summary = calibrate(
                    prepared.model, calib, method, batches=split.calibration_batches,
                    memory=options.calibration_memory, cache_path=path, progress=progress,
                )
                calibrations[method] = (path, summary)
            return calibrations[method]

        def build(build_config: QuantConfig, method: str, nodes: Sequence[str]) -> onnx.ModelProto:
            int8 = quantize_with_ranges(prepared_path, calibrated(method)[0], build_config, method, exclude_nodes=nodes)
            _declare_like(int8, source)
            return int8

        def trial(method: str, nodes: Sequence[str]) -> BudgetCheck:
            key = (config, method, tuple(sorted(nodes)))
            if key in evaluated:
                return evaluated[key][3]
            try:
                int8 = build(config, method, nodes)
            except UnsupportedModelError as e:
                return BudgetCheck(False, -1.0, None, str(e))
            return evaluate(int8, key)

        # Concats joining very different ranges: fp32 from the start (quant_guard module docstring).
        ranges = _load_ranges(calibrated(options.method)[0])
        rule_nodes = [] if options.range_ratio is None else [
            e for e in concat_range_offenders(prepared.model, ranges, options.range_ratio) if e.name not in user_excluded
        ]
        base_excluded = sorted({*user_excluded, *(e.name for e in rule_nodes)})
        method = options.method
        trials_left = options.max_trials
        method_trials = [MethodTrial(method, trial(method, base_excluded))]
        exclusion_trials: tuple[ExclusionTrial, ...] = ()
        guard_nodes: list[str] = []
        guard_reasons: dict[str, str] = {}
        own_errors: dict[str, float] = {}
        if not method_trials[0].check.met and trials_left:
            for other in (m for m in ("percentile", "entropy", "minmax") if m != method):
                if not trials_left:
                    break
                trials_left -= 1
                method_trials.append(MethodTrial(other, trial(other, base_excluded)))
            method = max(method_trials, key=lambda t: (t.check.met, t.check.score)).method
            if not any(t.check.met for t in method_trials) and trials_left:
                try:
                    qdq = build(replace(config, format="qdq"), method, base_excluded)
                except UnsupportedModelError as e:
                    notes.append(f"cannot measure which nodes int8 hurts: {e}")
                else:
                    sensitivity_batches = min(4, split.calibration_batches)
                    tensor_errors = measure_tensor_errors(
                        prepared.model, qdq, _limited(calib.batches(), sensitivity_batches), threads=threads
                    )
                    types = _quantized_op_types(config)
                    quantizable = [n.name for n in prepared.model.graph.node if n.op_type in types and n.name not in base_excluded]
                    own_errors = node_errors(prepared.model, tensor_errors, quantizable)
                    norms = layer_norm_blocks(prepared.model)
                    norm_members = {name for block in norms for name in block}
                    ranked = rank_blocks(own_errors, norms, prepared.model)
                    search = search_exclusions(ranked, lambda nodes: trial(method, [*base_excluded, *nodes]), trials_left)
                    exclusion_trials = search.trials
                    count = search.blocks
                    if count is None and search.trials:  # nothing met the budget: the most faithful set tried
                        count = max(search.trials, key=lambda t: t.check.score).blocks
                    for block in ranked[: count or 0]:
                        head = block.nodes[0]
                        for name in block.nodes:
                            if name in guard_reasons:
                                continue
                            if name == head:
                                guard_reasons[name] = "int8 adds the most error here (measured)"
                            elif name in norm_members:
                                guard_reasons[name] = "part of a decomposed LayerNorm kept in fp32 whole"
                            else:
                                guard_reasons[name] = f"reads {head}'s output, which stays float only if its readers do"
                    guard_nodes = list(guard_reasons)
        excluded = sorted({*base_excluded, *guard_nodes})
        cache_path, calibration = calibrated(method)
        candidates = _Candidates(
            source, prepared.model, prepared_path, cache_path, method=method, exclude_nodes=excluded,
            threads=threads, timer=timer or default_timer, feeds=feeds, progress=progress,
        )

        def measure(configs: Sequence[QuantConfig]) -> list[CandidateTiming]:
            timings = []
            for timing in candidates.measure(configs):
                built = candidates.built.get(timing.config)
                if timing.error is None and isinstance(built, onnx.ModelProto):
                    check = evaluate(built, (timing.config, method, tuple(excluded)))
                    timing = replace(timing, budget_met=check.met, score=check.score)
                timings.append(timing)
            return timings

        decision, tried = search_fastest(
            config, measure, per_channel_possible=prepared.per_channel,
            min_speedup=options.min_speedup, force=options.force,
        )
    best = decision.best
    if best is None:
        raise UnsupportedModelError(decision.reason)
    int8 = candidates.built[best.config]
    assert isinstance(int8, onnx.ModelProto)
    validation = validate(int8, source, shapes, feeds=feeds) if decision.chosen is not None else None
    fidelity, accuracy_fp32, accuracy_int8, budget_check = evaluated[(best.config, method, tuple(excluded))]
    if evaluator.note:
        notes.append(evaluator.note)
    quantized_nodes, fp32_count = candidates.count(best.config, int8)
    kinds = {n.name: n.op_type for n in prepared.model.graph.node}
    fp32_nodes = [NodeError(n, kinds.get(n, "?"), None, "--exclude") for n in user_excluded]
    fp32_nodes += rule_nodes
    fp32_nodes += [NodeError(n, kinds.get(n, "?"), own_errors.get(n), guard_reasons[n]) for n in guard_nodes]
    if not budget_check.met:
        logger.warning("the int8 model misses the accuracy budget (%s): %s", budget.label, budget_check.why)
    return QuantizeResult(
        model=int8 if decision.chosen is not None else source,
        quantized=decision.chosen is not None,
        forced=decision.chosen is not None and ((best.speedup or 0.0) < options.min_speedup or best.budget_met is False),
        reason=decision.reason,
        int8_model=int8,
        config=best.config,
        method=method,
        latency_fp32_ms=best.fp32_latency_ms,
        latency_int8_ms=best.latency_ms,
        speedup=best.speedup,
        size_fp32=size_fp32,
        size_int8=best.size_bytes,
        nodes_quantized=quantized_nodes,
        nodes_fp32=fp32_count,
        fidelity=fidelity,
        fidelity_data=split.description,
        accuracy_fp32=accuracy_fp32,
        accuracy_int8=accuracy_int8,
        output=output,
        calibration=calibration,
        candidates=tried,
        threads=threads,
        timing_shapes={name: tuple(array.shape) for name, array in feeds.items()},
        min_speedup=options.min_speedup,
        opset=(prepared.source_opset, _default_opset(int8)),
        notes=tuple(notes),
        cpu=cpu,
        budget=budget,
        budget_check=budget_check,
        fp32_nodes=tuple(fp32_nodes),
        method_trials=tuple(method_trials),
        exclusion_trials=exclusion_trials,
        max_trials=options.max_trials,
        validation=validation,
    )
