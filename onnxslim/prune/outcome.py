"""What a prune did and why, beyond the plan itself: lossless channels found and removed (and why the rest
stayed), prunable groups the plan leaves whole, and a budget that falls on few groups.

Reports read this; nothing here changes the plan.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from onnxslim.analysis.groups import ChannelGroup
from onnxslim.prune.plan import PrunePlan

__all__ = ["LosslessKept", "PruneOutcome", "describe_outcome"]

logger = logging.getLogger(__name__)

# A group keeping at most this multiple of the MAC budget's fraction of its channels is cut "hard": a uniform
# cut meeting a MAC budget F keeps about sqrt(F) of every group's channels (MACs fall with the channels in and
# out), and global ranking cuts some groups to about F; one keeping F/2 or less pays for others.
_HARD_CUT = 0.5


@dataclass(frozen=True)
class LosslessKept:
    """A group whose dead or constant channels were not all removed: how many stayed and why."""

    group: str
    found: int
    removed: int
    reason: str


@dataclass(frozen=True)
class PruneOutcome:
    """Counts and reasons a prune report shows next to the plan."""

    lossless_found: int = 0  # dead or foldable constant channels in the prunable groups
    lossless_removed: int = 0  # of those, how many the plan removes
    lossless_kept: tuple[LosslessKept, ...] = ()
    left_whole: Mapping[str, str] = field(default_factory=dict)  # eligible group → why the plan leaves it whole
    notes: tuple[str, ...] = ()  # warnings also logged (a budget concentrated on few groups)


def _rounding_reason(group: ChannelGroup, kept: int, round_to: int, min_keep: int) -> str:
    if round_to > 1 and kept % round_to == 0:
        return f"--round-to {round_to}: keeps {kept} of {group.channels} channels, a multiple of {round_to}"
    if kept <= min_keep:
        return f"--min-keep {min_keep}: keeps {kept} of {group.channels} channels"
    return f"keeps {kept} of {group.channels} channels"


def _concentration(
    groups: Sequence[ChannelGroup], plan: PrunePlan, eligible: Collection[str], target: float
) -> str | None:
    """A warning when a MAC budget is taken from few groups, cut far below the budget (often because the
    heaviest layers are blocked or left alone, so the rest must pay for them)."""
    cut = [group for group in groups if group.id in eligible and plan.changes(group)]
    hard = [
        (group, len(plan.kept[group.id]))
        for group in cut
        if len(plan.kept[group.id]) <= _HARD_CUT * target * group.channels
    ]
    if not hard:
        return None
    listed = ", ".join(f"{group.id} keeps {kept} of {group.channels}" for group, kept in hard[:4])
    more = f" and {len(hard) - 4} more" if len(hard) > 4 else ""
    blocked = sum(not group.prunable for group in groups)
    return (
        f"the MAC budget falls on few groups: {len(hard)} of {len(cut)} pruned groups keep at most "
        f"{100 * _HARD_CUT * target:.0f}% of their channels ({listed}{more}); {blocked} groups are blocked and "
        f"{sum(g.prunable for g in groups) - len(eligible)} left alone, so the rest pays for them. Check accuracy, "
        "or keep more of the MACs"
    )


def describe_outcome(
    groups: Sequence[ChannelGroup],
    plan: PrunePlan,
    *,
    eligible: Collection[str],
    left_alone: Mapping[str, str],
    lossless: Mapping[str, Sequence[int]],
    round_to: int,
    min_keep: int,
    target_macs: float | None = None,
    budget: bool = True,
) -> PruneOutcome:
    """Counts and reasons for a plan: `lossless` is group id → its dead/constant channels (found); `budget`:
    a --ratio or --target-macs applied (not --lossless alone, not a saved plan)."""
    by_id = {group.id: group for group in groups}
    found = removed = 0
    kept_reasons = []
    for gid, channels in lossless.items():
        gone = len(set(plan.removed(by_id[gid])) & set(channels))
        found, removed = found + len(channels), removed + gone
        if gone < len(channels):
            if gid not in eligible:
                reason = left_alone.get(gid, "not eligible for pruning")
            else:
                reason = _rounding_reason(by_id[gid], len(plan.kept.get(gid, range(by_id[gid].channels))), round_to, min_keep)
            kept_reasons.append(LosslessKept(gid, len(channels), gone, reason))
    def whole(group: ChannelGroup) -> str:
        if not budget:
            return "no dead or constant channels to remove" if group.id not in lossless else "its lossless channels stay"
        if round_to // math.gcd(round_to, group.width) > 1:  # attention heads: round_to counts their columns
            return f"--round-to {round_to} keeps all its channels (the cut rounds to zero)"
        return "nothing to remove at this budget"

    left_whole = {group.id: whole(group) for group in groups if group.id in eligible and not plan.changes(group)}
    notes = []
    if target_macs is not None:
        warning = _concentration(groups, plan, eligible, target_macs)
        if warning:
            logger.warning("%s", warning)
            notes.append(warning)
    return PruneOutcome(found, removed, tuple(kept_reasons), left_whole, tuple(notes))
