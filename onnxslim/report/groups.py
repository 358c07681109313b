"""Channel groups as a table and as JSON (`inspect` and `prune` show them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from onnxslim.analysis.groups import ChannelGroup
from onnxslim.report.format import format_table, to_jsonable

__all__ = ["root_cause", "hidden_size_note", "render_groups", "groups_json"]


_FOLLOWED = ", but its channels could not be followed ("

def root_cause(node: str | None, reason: str, *, verbose: bool = False) -> tuple[str | None, str]:
    """A blocked reason as node and reason of its root cause: a join blocked by an operand whose channels
    were blocked earlier nests that reason in parentheses (up to a dozen levels in real exports); the whole
    chain only with --verbose."""
    depth = 0
    while not verbose and _FOLLOWED in reason and reason.endswith(")"):
        inner = reason[reason.index(_FOLLOWED) + len(_FOLLOWED) : -1]
        where, sep, why = inner.partition(": ")
        node, reason = (where, why) if sep and " " not in where else (None, inner)
        depth += 1
    return node, reason + (f" (through {depth} joins; --verbose for the chain)" if depth else "")

def hidden_size_note(normalized_by: str) -> str:
    """What a blocked group normalized by a LayerNorm is, said plainly."""
    return f"hidden size: the residual stream through {normalized_by} stays (--verbose: what blocks it first)"


def _group_status(group: ChannelGroup, *, verbose: bool = False) -> str:
    if group.blocked_by is None:
        return "prunable"
    if group.normalized_by is not None and not verbose:
        return hidden_size_note(group.normalized_by)
    node, reason = root_cause(group.blocked_by.node, group.blocked_by.reason, verbose=verbose)
    where = f" at {node}" if node else ""
    return f"blocked{where}: {reason}"

def _names(nodes: Sequence[str], limit: int = 1) -> str:
    shown = ", ".join(nodes[:limit])
    return shown + (f" +{len(nodes) - limit}" if len(nodes) > limit else "") if nodes else "-"

def render_groups(groups: Sequence[ChannelGroup], *, verbose: bool = False) -> str:
    """The channel groups as a table: id, channels, sources, sinks, prunable or the reason it is not."""
    prunable = sum(group.prunable for group in groups)
    return "\n".join(
        [
            f"channel groups  {len(groups)} found, {prunable} prunable",
            format_table(
                ["group", "channels", "sources", "sinks", "status"],
                [
                    (
                        group.id,
                        f"{group.channels} in {group.blocks} blocks" if group.blocks > 1 else group.channels,
                        _names([s.node for s in group.sources]),
                        _names([s.node for s in group.sinks]),
                        _group_status(group, verbose=verbose),
                    )
                    for group in groups
                ],
            ),
        ]
    )

def groups_json(groups: Sequence[ChannelGroup]) -> list[dict[str, Any]]:
    """The channel groups as JSON objects (`inspect --json`)."""
    return [
        {
            "id": group.id,
            "channels": group.channels,
            "blocks": group.blocks,  # > 1: grouped convs; each block must lose as many channels
            "sources": [s.node for s in group.sources],
            "sinks": [s.node for s in group.sinks],
            "prunable": group.prunable,
            "blocked_by": to_jsonable(group.blocked_by),
            "normalized_by": group.normalized_by,  # a transformer's hidden size (the residual stream): it stays
            "heads": group.width > 1,  # attention heads: a channel is a head of `width` columns
            "width": group.width,
        }
        for group in groups
    ]
