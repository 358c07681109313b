"""`optimize` and `sweep`: their options, the result types, and the budget in force."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx

from onnxslim.bench import ModelBench
from onnxslim.cpu import CpuChoice
from onnxslim.errors import UsageError
from onnxslim.evaluate import AccuracyBudget, BudgetCheck
from onnxslim.prune import PruneResult
from onnxslim.prune.state import ALLOCATIONS
from onnxslim.quant import MIN_SPEEDUP, MODE_CHOICES, QuantizeResult

__all__ = [
    "DEFAULT_TRIALS",
    "LOWEST_KEEP",
    "OptimizeOptions",
    "Trial",
    "Candidate",
    "OptimizeResult",
    "SweepPoint",
    "SweepResult",
    "default_budget",
    "half_budget",
]

DEFAULT_TRIALS = 6
LOWEST_KEEP = 0.1  # the search never keeps fewer MACs than this


@dataclass(frozen=True)
class OptimizeOptions:
    """What `optimize` may do and what it must keep. See the module docstring for the search."""

    max_drop: float | None = None
    min_fidelity: float | None = None
    target_macs: float | None = None
    target_speedup: float | None = None
    prune: bool = True
    quantize: bool = True
    max_trials: int = DEFAULT_TRIALS
    threads: int | None = None
    criterion: str = "activation"
    recover: str = "lsq"
    allocate: str = "global"
    round_to: int = 8
    min_speedup: float = MIN_SPEEDUP
    repeat: int = 50  # timed runs per model in the final interleaved measurement
    seed: int = 0
    quant_mode: str = "auto"  # quantize's --mode at every level: auto measures static and dynamic on transformers

    def __post_init__(self) -> None:
        if self.quant_mode not in MODE_CHOICES:
            raise UsageError(f"--quant-mode must be one of {', '.join(MODE_CHOICES)}, not {self.quant_mode!r}")
        if self.target_macs is not None and self.target_speedup is not None:
            raise UsageError("--target-macs and --target-speedup are exclusive: give one")
        if not self.prune and not self.quantize:
            raise UsageError("--no-prune and --no-quantize leave nothing to do")
        if not self.prune and (self.target_macs is not None or self.target_speedup is not None):
            raise UsageError("--target-macs and --target-speedup choose how much to prune; they need pruning on")
        if self.target_macs is not None and not 0 < self.target_macs <= 1:
            raise UsageError(f"--target-macs must be in (0, 1], not {self.target_macs}")
        if self.target_speedup is not None and self.target_speedup <= 1:
            raise UsageError(f"--target-speedup must be above 1, not {self.target_speedup}")
        if self.max_trials < 1:
            raise UsageError(f"--max-trials must be at least 1, not {self.max_trials}")
        if self.allocate not in ALLOCATIONS:
            raise UsageError(f"--allocate must be one of {', '.join(ALLOCATIONS)}, not {self.allocate!r}")
        AccuracyBudget(self.max_drop, self.min_fidelity)  # validates the budget


def default_budget(options: OptimizeOptions, labelled: bool) -> AccuracyBudget:
    """The budget in force: the one given, else 0.5 point of top-1 with labels, else cosine 0.99."""
    if options.max_drop is not None or options.min_fidelity is not None:
        if options.max_drop is not None and not labelled:
            raise UsageError("--max-drop needs labels in the evaluation data (or use --min-fidelity)")
        return AccuracyBudget(options.max_drop, options.min_fidelity)
    return AccuracyBudget(max_drop=0.5) if labelled else AccuracyBudget(min_fidelity=0.99)


def half_budget(budget: AccuracyBudget) -> AccuracyBudget:
    """What pruning alone may spend: half the drop, half the fidelity loss (int8 gets the rest)."""
    return AccuracyBudget(
        None if budget.max_drop is None else budget.max_drop / 2,
        None if budget.min_fidelity is None else 1 - (1 - budget.min_fidelity) / 2,
    )


@dataclass(frozen=True)
class Trial:
    """One pruning level tried: MACs asked and kept, the pruned fp32 model against the original, and — when
    it was quantized — the final model's check and measured speedup."""

    target_macs: float
    macs_kept: float
    pruned_score: float
    pruned_drop: float | None
    pruned_met: bool
    quantized: bool | None = None
    final_score: float | None = None
    final_drop: float | None = None
    final_met: bool | None = None
    speedup: float | None = None
    seconds: float = 0.0
    score_name: str = "cosine"  # what the scores are (BudgetCheck.score_name)
    same_as: int | None = None  # the earlier trial (1-based) whose plan this level gave again: not pruned twice
    samples: int | None = None  # the evaluation samples the scores rest on (BudgetCheck.samples)
    whole_budget: bool = False  # pruned_* judged with the whole budget (int8 was not kept), not half of it
    mode: str | None = None  # the int8 mode quantize chose at this level (static or dynamic), when it ran


@dataclass(frozen=True)
class Candidate:
    """A model of the final measurement: what it is, how it did, and whether it meets the budget."""

    name: str  # original, pruned, int8
    bench: ModelBench
    check: BudgetCheck | None  # None for the original


@dataclass(frozen=True)
class OptimizeResult:
    """What `optimize` chose and the proof: the side-by-side measurement, the trials, what each step did."""

    chosen: str  # the candidate written as optimized.onnx
    reason: str
    budget: AccuracyBudget
    budget_met: bool
    candidates: tuple[Candidate, ...]
    trials: tuple[Trial, ...]
    prune: PruneResult | None
    quantize: QuantizeResult | None
    cpu: CpuChoice
    data: str
    threads: int
    seconds: float
    files: tuple[str, ...] = ()
    outdir: str | None = None
    command: str = ""
    max_trials: int = DEFAULT_TRIALS
    search: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    model: onnx.ModelProto | None = field(default=None, repr=False)  # the chosen model (optimized.onnx)
    # wall time of each stage: load, analysis (shared by every level), prune levels, judging levels, int8,
    # judging int8, final measurement (the interleaved timing and the choice); they add up to about `seconds`
    stage_seconds: Mapping[str, float] = field(default_factory=dict)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # of the data it was measured on

    @property
    def final(self) -> Candidate:
        return next(c for c in self.candidates if c.name == self.chosen)

    @property
    def speedup(self) -> float:
        return self.final.bench.speedup


@dataclass(frozen=True)
class SweepPoint:
    """One MAC budget of a sweep: what was kept and how the model did in the shared measurement."""

    target_macs: float
    macs_kept: float
    quantized: bool
    bench: ModelBench
    check: BudgetCheck | None


@dataclass(frozen=True)
class SweepResult:
    points: tuple[SweepPoint, ...]
    original: ModelBench
    budget: AccuracyBudget
    data: str
    threads: int
    seconds: float
