"""Scores and a budget → `PrunePlan`: which channels of each group are kept.

Two budgets:

- `plan_by_ratio`: remove the lowest-scoring fraction `ratio` of every eligible group's channels
  (floor(ratio · C)), uniformly.
- `plan_by_macs`: keep a fraction `target` of the model's Conv/Gemm/MatMul MACs, ranking channels
  *globally*. Each group's scores are divided by the group's mean score, so every group's channels average
  1.0 whatever the scale of its weights or its criterion values; a channel is then compared with every
  other channel by how far below its own group's average it is. The mean (rather than the max) is robust to
  one outlier channel and matches how `importance.py` already weighs several sources of a group. MACs are
  not part of the ranking (that would strip the expensive layers first and hurt accuracy most); they
  decide *where to stop*: a single global threshold on the normalized score is bisected until the MACs of
  the pruned model, computed exactly from per-node MACs (each Conv/Gemm/MatMul scales by the kept fraction
  of its output channels times that of its input channels), are the closest to `target` from the
  candidates around it. Rounding, min-keep and forced channels are applied inside the search, so a group
  rounded up simply lets the threshold rise and take more elsewhere.

Every group (a segment, after Concat/Split) keeps at least `min_keep` channels and, with `round_to`, a
multiple of it (rounded up, capped at the group's size). `round_to` counts columns: an attention head is
D columns, so a head group keeps a multiple of round_to / gcd(round_to, D) heads (any count for D = 32 and
round_to 8: every head count is a multiple of 8 columns). Channels listed in `forced` (dead channels from
`lossless.py`) go first in either budget. `eligible_groups` applies `--exclude` and
`--protect-first/--protect-last`. Plans are saved to and loaded from JSON with the model's hash.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxslim.analysis.cost import MAC_OPS
from onnxslim.analysis.groups import BlockerKind, ChannelGroup, Follower, Source
from onnxslim.errors import ModelLoadError, UsageError
from onnxslim.io import OutputStage, model_files, save_text

__all__ = [
    "PLAN_FORMAT",
    "MacBudget",
    "MacModel",
    "PrunePlan",
    "eligible_groups",
    "load_plan",
    "model_sha256",
    "plan_by_macs",
    "plan_by_ratio",
    "save_plan",
]

logger = logging.getLogger(__name__)

PLAN_FORMAT = 1
BUDGET_TOLERANCE = 0.01  # a MAC target is met when the kept fraction is at most target + this


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


def _check_rounding(round_to: int, min_keep: int) -> None:
    if round_to < 1:
        raise UsageError(f"--round-to must be at least 1, not {round_to}")
    if min_keep < 1:
        raise UsageError(f"--min-keep must be at least 1, not {min_keep}")


def _kept_count(channels: int, remove: int, round_to: int, min_keep: int, blocks: int = 1) -> int:
    """Channels kept when `remove` are asked for: at least `min_keep`, rounded up to `round_to`, at most all;
    with `blocks` (grouped convs), the same number in each block, so a multiple of `blocks`."""
    keep = max(channels - remove, min(min_keep, channels))
    step = round_to // math.gcd(round_to, blocks)  # per block, so that blocks · kept is a multiple of round_to
    per_block = -(-keep // blocks)
    return min(channels, -(-per_block // step) * step * blocks)


def _round_to(round_to: int, group: ChannelGroup) -> int:
    """`round_to` in the group's channels: attention heads of D columns each need round_to / gcd(round_to, D)."""
    return round_to // math.gcd(round_to, group.width)


def _order(group: ChannelGroup, scores: Mapping[str, np.ndarray], forced: Collection[int]) -> np.ndarray:
    """Channel indices of `group` from first to go to last: forced ones, then by score, then by index."""
    group_scores = np.asarray(scores[group.id], dtype=np.float64).copy()
    if group_scores.shape != (group.channels,):
        raise ValueError(f"group {group.id}: {group_scores.shape[0]} scores for {group.channels} channels")
    group_scores[list(forced)] = -np.inf
    return np.lexsort((np.arange(group.channels), group_scores))


def _plan_from_counts(
    groups: Sequence[ChannelGroup], orders: Mapping[str, np.ndarray], removed: Mapping[str, int]
) -> PrunePlan:
    kept: dict[str, tuple[int, ...]] = {}
    for group in groups:
        count = removed.get(group.id, 0)
        if count <= 0:
            continue
        # each block (one unless grouped convs read or make the channels) loses count / blocks channels: its
        # own first ones in the group's order
        order, blocks = orders[group.id], group.blocks
        size = group.channels // blocks
        kept[group.id] = tuple(
            sorted(int(c) for block in range(blocks) for c in order[order // size == block][count // blocks :])
        )
    return PrunePlan(kept)


def _kept_per_block(group: ChannelGroup, kept: Collection[int]) -> list[int]:
    """How many channels each block of a group with grouped convs keeps (they must all be equal)."""
    size = group.channels // group.blocks
    return [sum(1 for c in kept if c // size == block) for block in range(group.blocks)]


def plan_by_ratio(
    groups: Sequence[ChannelGroup],
    scores: Mapping[str, np.ndarray],
    ratio: float,
    round_to: int = 1,
    *,
    min_keep: int = 1,
    eligible: Collection[str] | None = None,
    forced: Mapping[str, Collection[int]] | None = None,
) -> PrunePlan:
    """Remove floor(ratio · C) lowest-scoring channels of every eligible group (ties: lower index goes first).

    Forced channels go first and always go (a group with more than floor(ratio · C) of them loses them all,
    down to `min_keep`). `eligible` None: every prunable group.
    """
    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"--ratio must be in [0, 1), not {ratio}")
    _check_rounding(round_to, min_keep)
    forced = forced or {}
    orders: dict[str, np.ndarray] = {}
    removed: dict[str, int] = {}
    for group in groups:
        if not group.prunable or (eligible is not None and group.id not in eligible):
            continue
        dead = len(forced.get(group.id, ()))
        wanted = max(math.floor(ratio * group.channels + 1e-9), dead)
        count = group.channels - _kept_count(group.channels, wanted, _round_to(round_to, group), min_keep, group.blocks)
        if count > 0:
            orders[group.id] = _order(group, scores, forced.get(group.id, ()))
            removed[group.id] = count
    return _plan_from_counts(groups, orders, removed)


# ----------------------------------------------------------------------------------------- MAC budget


class MacModel:
    """MACs of the model as a function of how many channels each group loses (exact for Conv/Gemm/MatMul).

    A node's MACs scale by (kept output channels / its output channels) · (kept input channels / its input
    channels); a depthwise Conv (a follower) scales once, by its kept channels.
    """

    def __init__(self, groups: Sequence[ChannelGroup], layer_macs: Mapping[str, int]) -> None:
        self.group_ids = [group.id for group in groups]
        nodes = sorted(name for name, macs in layer_macs.items() if macs > 0)
        index = {name: i for i, name in enumerate(nodes)}
        self.macs = np.array([layer_macs[name] for name in nodes], dtype=np.float64)
        self.total = float(sum(layer_macs.values()))
        # sparse (node, group, fraction of the node's output / input channels one channel of the group is):
        # a node is touched by a few groups, so this grows with the graph, not with nodes × groups
        outputs: list[tuple[int, int, float]] = []
        inputs: list[tuple[int, int, float]] = []
        for g, group in enumerate(groups):
            # followers that count MACs of their own (a depthwise Conv) scale with the channels they keep
            outs: list[Source | Follower] = [*group.sources, *(f for f in group.followers if f.op_type in MAC_OPS)]
            for member in outs:
                if member.node in index:
                    outputs.append((index[member.node], g, 1.0 / float(member.extent or group.channels)))
            for sink in group.sinks:
                if sink.node in index:
                    inputs.append((index[sink.node], g, 1.0 / float(sink.extent or group.channels)))
        self._outputs = self._entries(outputs)
        self._inputs = self._entries(inputs)

    @staticmethod
    def _entries(entries: list[tuple[int, int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        array = np.array(entries, dtype=np.float64).reshape(-1, 3)
        return array[:, 0].astype(np.intp), array[:, 1].astype(np.intp), array[:, 2]

    def _removed_fraction(self, entries: tuple[np.ndarray, np.ndarray, np.ndarray], counts: np.ndarray) -> np.ndarray:
        nodes, groups, fractions = entries
        return np.bincount(nodes, weights=fractions * counts[groups], minlength=len(self.macs))

    def macs_after(self, removed: Mapping[str, int]) -> float:
        """Total MACs when group id → that many channels are removed."""
        counts = np.array([removed.get(gid, 0) for gid in self.group_ids], dtype=np.float64)
        out_kept = np.clip(1.0 - self._removed_fraction(self._outputs, counts), 0.0, 1.0)
        in_kept = np.clip(1.0 - self._removed_fraction(self._inputs, counts), 0.0, 1.0)
        return self.total - float(self.macs.sum()) + float((self.macs * out_kept * in_kept).sum())


@dataclass(frozen=True)
class MacBudget:
    """A MAC-budget plan and how close it came: `kept_fraction` is the estimate of MACs after / before."""

    plan: PrunePlan
    target: float
    kept_fraction: float
    met: bool


def plan_by_macs(
    groups: Sequence[ChannelGroup],
    scores: Mapping[str, np.ndarray],
    layer_macs: Mapping[str, int],
    target: float,
    round_to: int = 1,
    *,
    min_keep: int = 1,
    eligible: Collection[str] | None = None,
    forced: Mapping[str, Collection[int]] | None = None,
) -> MacBudget:
    """Keep about `target` of the MACs by removing the globally lowest mean-normalized channels.

    Not met (`met` False, a warning logged) when even the highest threshold — every eligible group down to
    `min_keep` — keeps more than `target` + 1 %, because too much is blocked, excluded or protected.
    """
    if not 0.0 < target <= 1.0:
        raise UsageError(f"--target-macs must be in (0, 1], not {target}")
    _check_rounding(round_to, min_keep)
    forced = forced or {}
    model = MacModel(groups, layer_macs)
    chosen = [
        g for g in groups if g.prunable and (eligible is None or g.id in eligible) and g.id in scores
    ]
    orders: dict[str, np.ndarray] = {}
    keys: dict[str, np.ndarray] = {}  # normalized scores in removal order
    for group in chosen:
        order = _order(group, scores, forced.get(group.id, ()))
        raw = np.asarray(scores[group.id], dtype=np.float64)
        mean = float(np.abs(raw).mean())
        normalized = raw / mean if mean > 0 else raw.copy()
        normalized[list(forced.get(group.id, ()))] = -np.inf
        orders[group.id], keys[group.id] = order, normalized[order]

    def counts(threshold: float) -> dict[str, int]:
        removed = {}
        for group in chosen:
            wanted = int(np.searchsorted(keys[group.id], threshold, side="left"))  # keys below the threshold
            wanted = max(wanted, len(forced.get(group.id, ())))
            removed[group.id] = group.channels - _kept_count(group.channels, wanted, _round_to(round_to, group), min_keep, group.blocks)
        return removed

    total = model.total or 1.0
    goal = target * total
    candidates = np.unique(np.concatenate([k[np.isfinite(k)] for k in keys.values()] + [np.array([-np.inf])]))
    candidates = np.append(candidates, np.inf)  # the last removes everything down to min_keep
    low, high = 0, len(candidates) - 1  # macs(low) is the most, macs(high) the fewest
    if model.macs_after(counts(candidates[high])) > goal:
        best = high
    elif model.macs_after(counts(candidates[low])) <= goal:
        best = low
    else:
        while high - low > 1:  # invariant: macs(high) <= goal
            middle = (low + high) // 2
            if model.macs_after(counts(candidates[middle])) <= goal:
                high = middle
            else:
                low = middle
        above = model.macs_after(counts(candidates[low]))
        below = model.macs_after(counts(candidates[high]))
        best = low if above - goal < goal - below and above <= goal + BUDGET_TOLERANCE * total else high
    removed = counts(candidates[best])
    fraction = model.macs_after(removed) / total
    met = fraction <= target + BUDGET_TOLERANCE
    if not met:
        logger.warning(
            "--target-macs %g cannot be met: at most %.1f %% of the MACs can be removed (the rest is blocked, "
            "excluded, protected or held by --min-keep); keeping %.1f %%",
            target, 100 * (1 - fraction), 100 * fraction,
        )
    return MacBudget(_plan_from_counts(groups, orders, removed), target, fraction, met)


# ----------------------------------------------------------------------------- which groups may change


def _reaches_output(group: ChannelGroup, outputs: Collection[str]) -> bool:
    if any(member.tensor in outputs for member in group.members):
        return True
    return group.blocked_by is not None and group.blocked_by.kind is BlockerKind.GRAPH_OUTPUT


def eligible_groups(
    groups: Sequence[ChannelGroup],
    outputs: Collection[str],
    *,
    exclude: Sequence[str] = (),
    protect_first: bool = True,
    protect_last: bool = True,
) -> tuple[frozenset[str], dict[str, str]]:
    """Prunable groups a budget may touch, and group id → why each other prunable group is left alone.

    `exclude`: node-name globs or op types matched against each group's *sources* (the ops that create the
    channels). protect-first: the group(s) created by the first source in topological order (the first
    conv reading the input). protect-last: the groups consumed by a head, a layer whose own output channels
    reach a graph output (the classifier Gemm, the detection-head convs).
    """
    reasons: dict[str, str] = {}
    first = groups[0].sources[0].node if groups else None
    heads = {s.node for g in groups if _reaches_output(g, outputs) for s in g.sources}
    for group in groups:
        if not group.prunable:
            continue
        for source in group.sources:
            hit = next((p for p in exclude if source.op_type == p or fnmatch.fnmatchcase(source.node, p)), None)
            if hit is not None:
                reasons[group.id] = f"excluded by --exclude {hit!r} (source {source.node})"
                break
        else:
            if protect_first and any(s.node == first for s in group.sources):
                reasons[group.id] = "protected: created by the first layer (--protect-first)"
            elif protect_last and any(s.node in heads for s in group.sinks):
                reasons[group.id] = "protected: feeds the last layer (--protect-last)"
    eligible = frozenset(g.id for g in groups if g.prunable and g.id not in reasons)
    return eligible, reasons


# ------------------------------------------------------------------------------------------ plan files


def model_sha256(data: bytes | str | os.PathLike[str]) -> str:
    """The sha256 of a model on disk, its external data files included (or of the given bytes)."""
    digest = hashlib.sha256()
    if isinstance(data, bytes):
        digest.update(data)
        return digest.hexdigest()
    for path in model_files(data):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def save_plan(
    path: str | os.PathLike[str],
    plan: PrunePlan,
    groups: Sequence[ChannelGroup],
    sha256: str,
    record: Mapping[str, Any],
    stage: OutputStage | None = None,
) -> None:
    """Write `plan` as JSON: format, model hash, how it was made (`record`), and per group the channels removed
    (staged in `stage` when given, to be written with the model)."""
    document = {
        "format": PLAN_FORMAT,
        "model_sha256": sha256,
        **dict(record),
        "groups": {
            group.id: {"channels": group.channels, "removed": list(plan.removed(group))}
            for group in groups
            if plan.changes(group)
        },
    }
    (stage.add_text if stage is not None else save_text)(json.dumps(document, indent=2) + "\n", path)


def load_plan(path: str | os.PathLike[str], groups: Sequence[ChannelGroup], sha256: str) -> PrunePlan:
    """Read a plan written by `save_plan`, refusing one made for another model or whose groups do not match."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read plan {path}: {e}") from e
    if not isinstance(document, dict) or document.get("format") != PLAN_FORMAT or "groups" not in document:
        raise ModelLoadError(f"{path} is not an onnxslim plan (format {PLAN_FORMAT})")
    if document.get("model_sha256") != sha256:
        raise ModelLoadError(
            f"plan {path} was made for another model (sha256 {str(document.get('model_sha256'))[:12]}…, "
            f"this model is {sha256[:12]}…)"
        )
    by_id = {group.id: group for group in groups}
    kept: dict[str, tuple[int, ...]] = {}
    for gid, entry in document["groups"].items():
        group = by_id.get(gid)
        if group is None or not group.prunable or entry.get("channels") != group.channels:
            raise ModelLoadError(f"plan {path}: group {gid!r} does not match a prunable group of this model")
        removed = {int(c) for c in entry.get("removed", [])}
        if not removed <= set(range(group.channels)) or len(removed) >= group.channels:
            raise ModelLoadError(f"plan {path}: group {gid!r} removes invalid channels")
        kept[gid] = tuple(c for c in range(group.channels) if c not in removed)
        per_block = _kept_per_block(group, kept[gid])
        if len(set(per_block)) > 1:
            raise ModelLoadError(
                f"plan {path}: group {gid!r} is read or made by grouped convs, so each of its {group.blocks} blocks "
                f"must keep as many channels; this plan keeps {per_block}"
            )
    return PrunePlan(kept)
