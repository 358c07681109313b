"""int8 quantization: the constants, options (`QuantConfig`, `QuantizeOptions`) and result dataclasses
that the steps of the quantizer share."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxslim.cpu import CpuChoice, CpuFeatures
from onnxslim.errors import UsageError
from onnxslim.evaluate import HOLDOUT_FRACTION, AccuracyBudget, BudgetCheck
from onnxslim.io import Validation
from onnxslim.metrics import (
    Accuracy,
    Fidelity,
)
from onnxslim.quant.guard import MAX_TRIALS, RANGE_RATIO, ExclusionTrial, NodeError
from onnxslim.quant.sensitivity import GateMeasure

FORMATS = ("qdq", "qoperator")
METHODS = ("minmax", "entropy", "percentile", "tensor")  # tensor: each tensor's range by its error (calibrate.py)
INT8_TYPES = ("u8", "s8")
MIN_SPEEDUP = 1.05  # int8 must be at least 5 % faster than fp32 to be kept (see quant_speed's docstring)
RETIME_FACTOR = 3  # an uncertain speed verdict is re-timed once, this many times longer (quant_speed)
CALIBRATION_MEMORY = 256 * 2**20
PER_CHANNEL_OPSET = 13  # DequantizeLinear's `axis` (per-channel weights in QDQ) needs opset 13
MIN_QUANT_OPSET = 10  # QuantizeLinear/DequantizeLinear exist from opset 10

# The compute ops: `op_types=COMPUTE_OP_TYPES` quantizes these and nothing else (the `compute` placement,
# placement.py, is the measured version: what onnxruntime fuses of them, with the activations folded in).
COMPUTE_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
PLACEMENTS = ("compute", "kernels", "all")  # placement.py: from the narrowest
PLACEMENT_CHOICES = ("auto", *PLACEMENTS)
PLACEMENT_LABELS = {"compute": " compute-ops", "kernels": " int8-kernels", "all": ""}

# Modes (quantizer.py, the `modes`, `dynamic` and `mode` steps): static int8 (ranges calibrated, QDQ or
# QOperator) or onnxruntime's dynamic int8 (weights int8 ahead of time, activations quantized at run time by
# DynamicQuantizeLinear, MatMulInteger). `auto` measures both side by side on models whose MatMul/Gemm carry
# at least `MATMUL_SHARE` of the MACs (transformers) and keeps static alone elsewhere (CNNs).
MODES = ("static", "dynamic")
MODE_CHOICES = ("auto", *MODES)
MATMUL_SHARE = 0.5
DYNAMIC_OP_TYPES = ("MatMul", "Gemm")  # what dynamic int8 quantizes: residual Adds, LayerNorms stay float
DYNAMIC_METHOD = "run-time"  # the "calibration method" of a dynamic model: its activations are ranged as it runs

QUANT_TYPE_NAMES = {"u8": "QUInt8", "s8": "QInt8"}
METHOD_NAMES = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile", "tensor": "MinMax"}  # tensor: written as min-max
FORMAT_NAMES = {"qdq": "QDQ", "qoperator": "QOperator"}
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
ORT_METADATA = ("onnx.infer", "onnx.quant.pre_process")


# --------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class QuantConfig:
    """One way to quantize: format, activation and weight types, weight granularity, which nodes.

    op_types None means every op type onnxruntime's quantizer handles; otherwise only these. `placement`
    (placement.py) narrows that to the nodes onnxruntime runs as int8 kernels on this machine (`kernels`),
    or to its compute ops among them (`compute`); `all` leaves the choice to onnxruntime's quantizer.
    """

    format: str = "qdq"
    activations: str = "u8"
    weights: str = "s8"
    per_channel: bool = True
    reduce_range: bool | None = None  # None: chosen for the CPU (see cpu.py)
    op_types: tuple[str, ...] | None = None
    placement: str = "all"
    mode: str = "static"  # dynamic: onnxruntime's quantize_dynamic (QOperator, u8 activations ranged at run time)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"quantization mode must be one of {list(MODES)}, not {self.mode!r}")
        if self.mode == "dynamic" and (self.activations != "u8" or self.format != "qoperator" or self.placement != "all"):
            raise UsageError("dynamic int8 runs u8 activations in QOperator form (DynamicQuantizeLinear, MatMulInteger) "
                             "on every node of its op types: use `dynamic_config`")
        if self.placement not in PLACEMENTS:
            raise UsageError(f"placement must be one of {list(PLACEMENTS)}, not {self.placement!r}")
        if self.format not in FORMATS:
            raise UsageError(f"quantization format must be one of {list(FORMATS)}, not {self.format!r}")
        for what, value in (("activations", self.activations), ("weights", self.weights)):
            if value not in INT8_TYPES:
                raise UsageError(f"{what} type must be one of {list(INT8_TYPES)}, not {value!r}")
        if self.activations == "s8" and self.weights == "u8":
            raise UsageError("s8 activations with u8 weights is not supported by onnxruntime; use --weights s8")

    @property
    def label(self) -> str:
        """'qdq u8/s8 per-channel', '+ compute ops only' when op types are restricted; 'dynamic s8 per-channel'."""
        if self.mode == "dynamic":
            granularity = "per-channel" if self.per_channel else "per-tensor"
            return f"dynamic {self.weights} {granularity}" + (" reduce-range" if self.reduce_range else "")
        text = f"{self.format} {self.activations}/{self.weights} {'per-channel' if self.per_channel else 'per-tensor'}"
        if self.reduce_range:
            text += " reduce-range"
        if self.op_types is not None:
            text += " compute-ops-only" if set(self.op_types) == set(COMPUTE_OP_TYPES) else f" ops={','.join(self.op_types)}"
        return text + PLACEMENT_LABELS[self.placement]


def dynamic_config(config: QuantConfig) -> QuantConfig:
    """The dynamic counterpart of `config`: its weight granularity and range, s8 weights (QInt8) on the
    MatMul/Gemm ops (`DYNAMIC_OP_TYPES`), activations u8 quantized at run time."""
    return QuantConfig(
        format="qoperator", activations="u8", weights="s8", per_channel=config.per_channel,
        reduce_range=config.reduce_range, op_types=DYNAMIC_OP_TYPES, placement="all", mode="dynamic",
    )


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything `quantize_model` needs besides the model and the data.

    exclude: node-name globs or op types (an entry equal to an op type in the model excludes every node of
        that type) left in fp32.
    force: keep the fastest int8 model even when no candidate is clearly `min_speedup` faster than fp32.
    threads: intra-op threads for the timing sessions (None: the physical cores available).
    calibration_memory: bytes of intermediate outputs the calibrator may hold at once (see module docstring).
    """

    config: QuantConfig = field(default_factory=QuantConfig)
    method: str = "tensor"  # each tensor's range by the error it causes (calibrate.py); minmax/entropy/percentile: one method
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
    range_ratio: float | None = RANGE_RATIO  # Concats whose inputs' ranges differ more are joined in float per input (None: never)
    placement: str = "auto"  # auto: `compute`, or `kernels` when measured clearly faster (placement.py)
    mode: str = "auto"  # static, dynamic, or auto: both side by side when MatMul/Gemm carry most MACs

    def __post_init__(self) -> None:
        if self.mode not in MODE_CHOICES:
            raise UsageError(f"mode must be one of {list(MODE_CHOICES)}, not {self.mode!r}")
        if self.placement not in PLACEMENT_CHOICES:
            raise UsageError(f"placement must be one of {list(PLACEMENT_CHOICES)}, not {self.placement!r}")
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
class TimingBudget:
    """How long one interleaved timing run lasts: rounds (every model once) until about `seconds` of timed
    runs, at least `min_rounds` and at most `max_rounds` of them."""

    seconds: float = 4.0
    min_rounds: int = 15
    max_rounds: int = 200

    def __post_init__(self) -> None:
        if self.seconds < 0 or self.min_rounds < 1 or self.max_rounds < self.min_rounds:
            raise UsageError(f"a timing budget needs seconds >= 0 and 1 <= min_rounds <= max_rounds, not {self}")

    def longer(self, factor: int = RETIME_FACTOR) -> TimingBudget:
        """This budget `factor` times over: seconds and rounds (a fast model stops at `max_rounds`, not
        `seconds`)."""
        return TimingBudget(self.seconds * factor, self.min_rounds * factor, self.max_rounds * factor)


@dataclass(frozen=True)
class InterleavedTiming:
    """One model as timed in an interleaved run: its median latency and, per consecutive block of the run,
    the ratio of the first model's median to its own (`runtime.block_speedups`; empty for the first model
    or with too few rounds)."""

    median_ms: float
    block_speedups: tuple[float, ...] = ()


@dataclass(frozen=True)
class CandidateTiming:
    """One int8 candidate as measured: median latency next to fp32's from the same interleaved run, and
    fp32 / int8 on each consecutive block of that run (`block_speedups`; lowest and highest are
    `speedup_low`, `speedup_high`). `retimed`: from the longer run of an uncertain verdict (quant_speed).

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
    block_speedups: tuple[float, ...] = ()  # empty: too few rounds (or an injected timer) to cut into blocks
    retimed: bool = False

    @property
    def speedup(self) -> float | None:
        if self.latency_ms is None or self.fp32_latency_ms is None or self.latency_ms <= 0:
            return None
        return self.fp32_latency_ms / self.latency_ms

    @property
    def speedup_low(self) -> float | None:
        return min(self.block_speedups) if self.block_speedups else None

    @property
    def speedup_high(self) -> float | None:
        return max(self.block_speedups) if self.block_speedups else None


@dataclass(frozen=True)
class SpeedDecision:
    """What the speed guard chose: `chosen` is the int8 candidate to keep (None: keep fp32); `best` is the
    fastest int8 candidate that ran (None when none did); `forced`: `chosen` is kept only because of `force`
    (not clearly faster, or missing the accuracy budget)."""

    chosen: CandidateTiming | None
    best: CandidateTiming | None
    reason: str
    forced: bool = False


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
    infinite_ranges: tuple[str, ...] = ()  # tensors whose range is infinite: kept fp32 with their readers
    range_kinds: Mapping[str, int] = field(default_factory=dict)  # method `tensor`: tensors per kind of range chosen


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
    calibration: CalibrationSummary | None  # None: nothing was calibrated (dynamic int8 alone)
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
    timing: CandidateTiming | None = None  # the reported int8 candidate as timed: its block range, re-timed or not
    step_seconds: Mapping[str, float] = field(default_factory=dict)  # wall time of each step of the quantizer
    step_cpu_seconds: Mapping[str, float] = field(default_factory=dict)  # CPU time of this process in each step
    placement: PlacementChoice | None = None  # which nodes may be int8, and why (the `placement` step)
    measure: GateMeasure | None = None  # how the fallback measured the roundings (None: it did not run)
    fp32_macs: int | None = None  # MACs of the nodes kept fp32 by --exclude, the range rules and the fallback
    model_macs: int | None = None  # MACs of the whole model at the calibration shapes
    mode: ModeChoice | None = None  # static or dynamic, why, and both candidates when both were measured

    @property
    def speedup_low(self) -> float | None:
        return None if self.timing is None else self.timing.speedup_low

    @property
    def speedup_high(self) -> float | None:
        return None if self.timing is None else self.timing.speedup_high

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
class PlacementChoice:
    """What the `placement` step chose (placement.py): the placement, why, the nodes it keeps float and
    why, what onnxruntime made of each op type quantized everywhere (`fates`: fate -> op type -> nodes),
    and the placements as timed against fp32 in one interleaved run (empty when none was timed)."""

    chosen: str
    reason: str
    int8_nodes: int
    float_nodes: tuple[NodeError, ...] = ()
    fates: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    timings: tuple[CandidateTiming, ...] = ()


@dataclass(frozen=True)
class ModeCandidate:
    """One mode as its own speed guard left it (`timing`: its fastest int8 variant against fp32; None when
    none could be built), whether that guard kept it (`kept`: clearly faster and within the budget), and
    why (`reason`)."""

    mode: str
    timing: CandidateTiming | None
    kept: bool
    reason: str


@dataclass(frozen=True)
class ModeChoice:
    """What the `mode` step chose: static or dynamic, why, the mode asked for, the share of the MACs in
    MatMul/Gemm that `auto` reads, each mode's candidate, and the kept variants timed side by side in one
    interleaved run (`head_to_head`: empty unless both modes were kept by their own guards)."""

    chosen: str
    reason: str
    asked: str
    matmul_share: float
    candidates: tuple[ModeCandidate, ...] = ()
    head_to_head: tuple[CandidateTiming, ...] = ()


@dataclass(frozen=True)
class MethodTrial:
    """One calibration method tried by the accuracy guard, with every node of the first trial quantized."""

    method: str
    check: BudgetCheck


# Progress: (stage, done, total), e.g. ("calibrating", 12, 205). Stages: calibrating, quantizing, timing,
# evaluating. `done` counts up to `total` within a stage.
# Timer: the models to time (config None is the fp32 reference, always first), the feeds and how long to
# take; returns each model's median latency and block speedups against fp32, measured in one run.
Timer = Callable[
    [Sequence[tuple["QuantConfig | None", onnx.ModelProto]], Mapping[str, np.ndarray], TimingBudget],
    Sequence[InterleavedTiming],
]
