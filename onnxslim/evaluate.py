"""Judging a candidate model against the original on held-out data: the accuracy budget and its check.

Every command that keeps or refuses a model by its accuracy (`prune`'s held-out comparison, `quantize`'s
guard, `optimize`'s trials) reads the same budget here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from onnxslim.errors import UsageError
from onnxslim.metrics import Accuracy, Fidelity

__all__ = ["DEFAULT_MIN_FIDELITY", "AccuracyBudget", "BudgetCheck", "check_budget"]

# Cosine 0.99 of the worst channel: on the reference models int8 that keeps accuracy within 0.3 pt stays
# above 0.999 on average and above 0.99 on every channel (benchmarks/int8_accuracy.py); a collapsed channel
# gives about 0, a LayerNorm broken by int8 0.9 and below. It is a floor that plain int8 passes on healthy
# models and that broken outputs cannot.
DEFAULT_MIN_FIDELITY = 0.99


@dataclass(frozen=True)
class AccuracyBudget:
    """How close int8 must stay to fp32. `max_drop` in points of top-1 (0.3 = 0.3 pt, needs labels);
    `min_fidelity` on `Fidelity.score`. With neither, `min_fidelity` is `DEFAULT_MIN_FIDELITY`."""

    max_drop: float | None = None
    min_fidelity: float | None = None

    def __post_init__(self) -> None:
        if self.max_drop is not None and not 0 <= self.max_drop <= 100:
            raise UsageError(f"--max-drop is in points of top-1 accuracy, 0 to 100, not {self.max_drop}")
        if self.min_fidelity is not None and not -1 <= self.min_fidelity <= 1:
            raise UsageError(f"--min-fidelity is a cosine, -1 to 1, not {self.min_fidelity}")

    @property
    def resolved(self) -> AccuracyBudget:
        if self.max_drop is None and self.min_fidelity is None:
            return AccuracyBudget(min_fidelity=DEFAULT_MIN_FIDELITY)
        return self

    @property
    def label(self) -> str:
        budget = self.resolved
        parts = []
        if budget.max_drop is not None:
            parts.append(f"top-1 drop <= {budget.max_drop:g} pt")
        if budget.min_fidelity is not None:
            parts.append(f"cosine (mean and worst channel) >= {budget.min_fidelity:g}")
        return " and ".join(parts) + (" (default)" if self.max_drop is None and self.min_fidelity is None else "")


@dataclass(frozen=True)
class BudgetCheck:
    """One candidate against the budget."""

    met: bool
    score: float  # fidelity score (higher is better)
    drop: float | None  # fp32 top-1 minus int8 top-1, in points, when labels were given
    why: str  # what missed, or "" when met


def check_budget(
    budget: AccuracyBudget, fidelity: Fidelity, accuracy_fp32: Accuracy | None, accuracy_int8: Accuracy | None
) -> BudgetCheck:
    """Pure: whether `fidelity` and the accuracies meet `budget`."""
    budget = budget.resolved
    misses = []
    drop = None
    if accuracy_fp32 is not None and accuracy_int8 is not None:
        drop = 100 * (accuracy_fp32.top1 - accuracy_int8.top1)
    if budget.max_drop is not None:
        if drop is None:
            raise UsageError("--max-drop needs labels in the evaluation data (or use --min-fidelity)")
        if drop > budget.max_drop + 1e-9:
            misses.append(f"top-1 drops {drop:.2f} pt (budget {budget.max_drop:g})")
    score = fidelity.score if math.isfinite(fidelity.score) else -1.0
    if budget.min_fidelity is not None and score < budget.min_fidelity:
        where = "mean cosine"
        if fidelity.decides_classes and (fidelity.top1_agreement or 0.0) < fidelity.cosine:
            where = f"top-1 agreement (axis {fidelity.class_axis})"
        elif not fidelity.decides_classes and fidelity.worst_channel_cosine is not None and fidelity.worst_channel_cosine < fidelity.cosine:
            where = f"cosine of channel {fidelity.worst_channel} (axis {fidelity.channel_axis})"
        misses.append(f"{where} {score:.4f} (budget {budget.min_fidelity:g})")
    return BudgetCheck(not misses, score, drop, "; ".join(misses))


# --------------------------------------------------------------------------------- which nodes hurt
