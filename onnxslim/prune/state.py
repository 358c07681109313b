"""The data types the prune steps share: what to do (`PruneOptions`), what the steps fill in as they run
(`PruneState`), what a prune returns (`PruneResult`, with its held-out `Evaluation`), and the damage curves
that `--allocate sensitivity` measures (`SensitivityCurves`). The steps themselves are in pruner.py."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim.activations import ChannelStats
from onnxslim.analysis.cost import ModelCost
from onnxslim.analysis.groups import ChannelGroup
from onnxslim.calib import Dataset, first_samples
from onnxslim.errors import UsageError
from onnxslim.graph import GraphIndex
from onnxslim.io import TensorInfo, Validation
from onnxslim.progress import Progress
from onnxslim.prune.importance import NEEDS_DATA
from onnxslim.prune.lossless import LosslessChannels
from onnxslim.prune.outcome import PruneOutcome
from onnxslim.prune.plan import PrunePlan
from onnxslim.prune.recover import RECOVERY_METHODS, RecoveryReport

__all__ = [
    "ALLOCATIONS",
    "COLLAPSE_COSINE",
    "BlockedGroup",
    "PruneOptions",
    "OutputFidelity",
    "Evaluation",
    "PruneResult",
    "PruneState",
    "SensitivityPoint",
    "GroupSensitivity",
    "SensitivityCurves",
]

ALLOCATIONS = ("global", "sensitivity")
COLLAPSE_COSINE = 0.9  # below this on any output (or 10 points of accuracy lost), the result is called broken


@dataclass(frozen=True)
class BlockedGroup:
    """A group that cannot be pruned, the node that blocks it and why."""

    group: str
    node: str | None
    reason: str
    normalized_by: str | None = None  # a transformer's hidden size: the LayerNorm over it (it stays)


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
        budgets = [flag for flag, value in (("--ratio", self.ratio), ("--target-macs", self.target_macs),
                                            ("--plan", self.plan_path)) if value is not None]
        if len(budgets) > 1:
            raise UsageError(f"{' and '.join(budgets)} are exclusive: give one")
        if not budgets and not self.lossless:
            raise UsageError("say how much to prune: --ratio, --target-macs, --plan or --lossless")
        if self.allocate not in ALLOCATIONS:
            raise UsageError(f"unknown allocation {self.allocate!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.allocate == "sensitivity" and self.target_macs is None:
            raise UsageError("--allocate sensitivity spends a MAC budget: give --target-macs")
        if self.recover is not None and self.recover not in RECOVERY_METHODS:
            raise UsageError(f"unknown recovery {self.recover!r}; choose one of {', '.join(RECOVERY_METHODS)}")

    def check_data(self, calibrated: bool, evaluated: bool = False) -> None:
        """Refuse (UsageError) what cannot run without calibration data: the one place these rules live, for
        the command line (before any work) and the library (`pruner.new_state`)."""
        if calibrated:
            return
        if self.criterion in NEEDS_DATA and self.plan_path is None:
            raise UsageError(f"--criterion {self.criterion} needs calibration data: give --calib DATA")
        if self.recover not in (None, "none"):
            raise UsageError(f"--recover {self.recover} needs calibration data: give --calib DATA")
        if evaluated:
            raise UsageError("--eval measures the pruned model against the original and needs --calib too")
        if self.allocate == "sensitivity":
            raise UsageError("--allocate sensitivity measures each group's damage on data: give --calib DATA")

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
    a `[T, N, C]` recognizer output, for instance); on a sequence output (a CTC recognizer's) also the share
    of samples whose greedy-decoded string is unchanged (`Fidelity.strings_unchanged`)."""

    output: str
    cosine_before: float
    cosine_after: float
    agreement_before: float | None = None
    agreement_after: float | None = None
    strings_before: float | None = None
    strings_after: float | None = None


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
            BlockedGroup(group.id, group.blocked_by.node, group.blocked_by.reason, group.normalized_by)
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
        for batch in first_samples(self.calib, self.max_samples):
            yield batch.feeds, batch.size


@dataclass(frozen=True)
class SensitivityPoint:
    """One group pruned alone: the ratio asked, channels removed, worst output cosine, top-1 (with labels)."""

    ratio: float
    removed: int
    cosine: float
    accuracy: float | None

    @property
    def damage(self) -> float:
        return max(0.0, 1.0 - self.cosine)


@dataclass(frozen=True)
class GroupSensitivity:
    """A group's curve: its channels, the MACs of the layers that make or read it, and the points."""

    group: str
    channels: int
    macs: float
    points: tuple[SensitivityPoint, ...]

    @property
    def worst_damage(self) -> float:
        return max((p.damage for p in self.points), default=0.0)

    def damage_at(self, ratio: float) -> float:
        """Damage interpolated linearly between (0, 0) and the measured points; past the last, the last."""
        ratios = [0.0, *(p.ratio for p in self.points)]
        damages = [0.0, *(p.damage for p in self.points)]
        return float(np.interp(ratio, ratios, np.maximum.accumulate(damages)))


@dataclass(frozen=True)
class SensitivityCurves:
    """Every measured group, most sensitive first, and what measuring cost."""

    groups: tuple[GroupSensitivity, ...]
    ratios: tuple[float, ...]
    criterion: str
    recover: str
    data: str
    samples: int
    trials: int
    forward_passes: int  # passes of the data through a model: statistics, each trial's recovery and evaluation
    seconds: float
    accuracy_original: float | None = None
