"""Scores and a budget → `PrunePlan`: which channels of each group are kept.

This version has one budget: remove the lowest-scoring fraction `ratio` of every prunable group's
channels (floor(ratio · C), always keeping at least one), optionally rounding the channels kept up to a
multiple (`round_to`). A group is one segment of a concatenation, so every segment keeps at least one
channel. Budgets by MACs, global ranking and exclusions are later additions; they only change how `kept`
is chosen, not the plan's shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxslim.analysis.groups import ChannelGroup
from onnxslim.errors import UsageError

__all__ = ["PrunePlan", "plan_by_ratio"]


@dataclass(frozen=True)
class PrunePlan:
    """Group id → sorted tuple of the channel indices kept. Groups not listed keep every channel."""

    kept: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def removed(self, group: ChannelGroup) -> tuple[int, ...]:
        """The channels of `group` this plan removes (in index order)."""
        kept = set(self.kept.get(group.id, range(group.channels)))
        return tuple(c for c in range(group.channels) if c not in kept)

    def changes(self, group: ChannelGroup) -> bool:
        return group.id in self.kept and len(self.kept[group.id]) < group.channels


def plan_by_ratio(
    groups: Sequence[ChannelGroup], scores: Mapping[str, np.ndarray], ratio: float, round_to: int = 1
) -> PrunePlan:
    """Remove floor(ratio · C) lowest-scoring channels of every prunable group (ties: lower index goes first).

    `round_to` rounds the channels kept up to a multiple of it (kernels run faster on multiples of 8 or 16);
    a group (a segment, after Concat/Split) always keeps at least one channel.
    """
    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"--ratio must be in [0, 1), not {ratio}")
    if round_to < 1:
        raise UsageError(f"--round-to must be at least 1, not {round_to}")
    kept: dict[str, tuple[int, ...]] = {}
    for group in groups:
        if not group.prunable:
            continue
        remove = min(math.floor(ratio * group.channels + 1e-9), group.channels - 1)
        keep = min(group.channels, -(-(group.channels - remove) // round_to) * round_to)
        remove = group.channels - keep
        if remove <= 0:
            continue
        group_scores = np.asarray(scores[group.id], dtype=np.float64)
        if group_scores.shape != (group.channels,):
            raise ValueError(f"group {group.id}: {group_scores.shape[0]} scores for {group.channels} channels")
        order = np.lexsort((np.arange(group.channels), group_scores))  # by score, then index
        kept[group.id] = tuple(sorted(int(c) for c in order[remove:]))
    return PrunePlan(kept)
