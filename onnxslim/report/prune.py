"""`onnxslim prune`: what was removed, recovered and measured, and the plan record."""

from __future__ import annotations

from collections import Counter
from typing import Any

from onnxslim.prune.state import PruneResult
from onnxslim.report.format import (
    format_bytes,
    format_change,
    format_count,
    format_percent,
    format_table,
    to_jsonable,
)
from onnxslim.report.groups import hidden_size_note, root_cause
from onnxslim.report.sensitivity import sensitivity_json

__all__ = ["render_prune", "plan_record", "prune_json"]


_LEFT_ALONE_ROWS = 10  # more groups left alone than this: their count per reason, the rows under --verbose


def _left_alone_lines(left_alone: dict[str, str], *, verbose: bool) -> list[str]:
    """The groups the budget left whole and why: every row when few or with --verbose, else a count per
    reason (a 2,000-node graph can leave hundreds of groups whole for one reason)."""
    if not left_alone:
        return []
    if verbose or len(left_alone) <= _LEFT_ALONE_ROWS:
        return ["", format_table(["left alone", "why"], sorted(left_alone.items()))]
    reasons = Counter(left_alone.values()).most_common()
    return [
        "",
        f"left alone {len(left_alone)} groups (--verbose or --json lists them):",
        *(f"  {count:>5}  {reason}" for reason, count in reasons),
    ]


def render_prune(result: PruneResult, output: str | None = None, *, verbose: bool = False) -> str:
    """The `prune` summary for a terminal: params, MACs and size before/after; groups found/prunable/pruned."""
    rows = [
        ("params", format_count(result.params_before), format_count(result.params_after),
         format_change(result.params_before, result.params_after)),
        ("MACs", format_count(result.macs_before), format_count(result.macs_after),
         format_change(result.macs_before, result.macs_after)),
        ("size", format_bytes(result.size_before), format_bytes(result.size_after),
         format_change(result.size_before, result.size_after)),
    ]
    criterion = "from the plan" if result.options.plan_path is not None else result.criterion
    lines = [
        f"criterion  {criterion}   {_budget(result)}   analysis shapes "
        + ", ".join(f"{n}:{','.join(map(str, s))}" for n, s in result.analysis_shapes.items()),
        f"groups     {len(result.groups)} found, {result.prunable_groups} prunable, {result.pruned_groups} pruned, "
        f"{result.channels_removed} channels removed",
        "",
        format_table(["", "before", "after", "change"], rows),
    ]
    lines += _left_alone_lines({**result.left_alone, **result.outcome.left_whole}, verbose=verbose)
    if result.outcome.lossless_kept:
        lines += [
            "",
            format_table(
                ["dead/constant channels kept", "found", "removed", "why"],
                [(k.group, k.found, k.removed, k.reason) for k in result.outcome.lossless_kept],
            ),
        ]
    if result.blocked:
        blocked_rows = []
        for b in result.blocked:
            node, reason = root_cause(b.node, b.reason, verbose=verbose)
            if b.normalized_by is not None and not verbose:
                node, reason = b.normalized_by, hidden_size_note(b.normalized_by)
            blocked_rows.append((b.group, node or "-", reason))
        lines += ["", "blocked groups", format_table(["group", "node", "reason"], blocked_rows)]
    if result.sensitivity is not None:
        curves = result.sensitivity
        lines += [
            "",
            f"allocation sensitivity: {len(curves.groups)} groups measured alone at ratios "
            + ", ".join(f"{r:g}" for r in curves.ratios) + f" ({curves.trials} trials, {curves.seconds:.1f} s); "
            "the budget went where the measured damage per MAC was least",
        ]
    lines += _recovery_lines(result)
    if output:
        lines += ["", f"wrote {output}"]
    return "\n".join(lines)

def _recovery_lines(result: PruneResult) -> list[str]:
    """Recovery per layer (the worst first, at most 12) and the whole model before and after it."""
    lines: list[str] = []
    recovery, evaluation = result.recovery, result.evaluation
    if recovery is not None and recovery.nodes:
        nodes = sorted(recovery.nodes, key=lambda n: (n.method == n.requested, -n.error_before))  # fallbacks first
        lines += [
            "",
            f"recovery   {recovery.method}: {len(recovery.nodes)} layers refit in {recovery.seconds:.1f} s on "
            f"{recovery.samples} samples ({recovery.held_out} held out to check each layer), "
            f"{recovery.fallbacks} fell back",
            format_table(
                ["layer", "op", "method", "error before", "error after"],
                [(n.node, n.op_type, n.method + ("*" if n.method != n.requested else ""),
                  f"{n.error_before:.4f}", f"{n.error_after:.4f}") for n in nodes[:12]],
            ),
            "(error: squared error of the layer's output against the original's, relative to its variance, on "
            "held-out samples" + ("; * fell back: worse on held-out samples" if recovery.fallbacks else "")
            + (f"; {len(nodes) - 12} more layers in --json" if len(nodes) > 12 else "") + ")",
        ]
    if evaluation is not None:
        rows = []
        for o in evaluation.outputs:
            rows.append((f"cosine {o.output}", f"{o.cosine_before:.4f}", f"{o.cosine_after:.4f}"))
            if o.agreement_after is not None:
                rows.append((f"top-1 agreement {o.output}", format_percent(o.agreement_before), format_percent(o.agreement_after)))
            if o.strings_after is not None and o.strings_before is not None:
                rows.append((f"strings unchanged {o.output}", f"{o.strings_before:.3f}", f"{o.strings_after:.3f}"))
        if evaluation.accuracy_after is not None:
            rows.insert(0, ("top-1 (original " + format_percent(evaluation.accuracy_original) + ")",
                            format_percent(evaluation.accuracy_before), format_percent(evaluation.accuracy_after)))
        lines += [
            "",
            f"against the original on {evaluation.samples} samples of {evaluation.data}",
            format_table(["", "pruned as sliced", f"after {result.recover}"], rows),
        ]
        legend = "cosine: the lower of the mean cosine and the worst output channel's"
        if any(o.agreement_after is not None for o in evaluation.outputs):
            legend += "; top-1 agreement: share of positions, e.g. every time step, whose top class is the original's"
        if any(o.strings_after is not None for o in evaluation.outputs):
            legend += "; strings unchanged: share of samples whose greedy CTC decoding is the original's"
        lines.append(f"({legend})")
    return lines

def _recovery_json(result: PruneResult) -> dict[str, Any] | None:
    recovery = result.recovery
    if recovery is None:
        return None
    return {
        "method": recovery.method,
        "seconds": recovery.seconds,
        "samples": recovery.samples,
        "held_out": recovery.held_out,
        "fallbacks": recovery.fallbacks,
        "spilled_bytes": recovery.spilled_bytes,
        "layers": [
            {"node": n.node, "op_type": n.op_type, "method": n.method, "requested": n.requested,
             "error_before": n.error_before, "error_after": n.error_after, "note": n.note or None}
            for n in recovery.nodes
        ],
    }

def _evaluation_json(result: PruneResult) -> dict[str, Any] | None:
    evaluation = result.evaluation
    if evaluation is None:
        return None
    return {
        "data": evaluation.data,
        "samples": evaluation.samples,
        "collapsed": evaluation.collapsed,
        "outputs": [{"output": o.output, "cosine_before": o.cosine_before, "cosine_after": o.cosine_after,
                     "agreement_before": o.agreement_before, "agreement_after": o.agreement_after,
                     "strings_before": o.strings_before, "strings_after": o.strings_after}
                    for o in evaluation.outputs],
        "accuracy_original": evaluation.accuracy_original,
        "accuracy_before": evaluation.accuracy_before,
        "accuracy_after": evaluation.accuracy_after,
    }

def _budget(result: PruneResult) -> str:
    options = result.options
    if options.plan_path is not None:
        text = f"plan {options.plan_path}"
    elif options.target_macs is not None:
        text = f"target MACs {options.target_macs:g}" + ("" if result.budget_met else " (not met)")
    elif options.ratio is not None:
        text = f"ratio {options.ratio:g}"
    else:
        text = "lossless only"
    if options.lossless:
        text += f"   lossless: {result.lossless_found} dead/constant channels found, {result.lossless_removed} removed"
    return text + f"   round-to {options.round_to}"

def plan_record(result: PruneResult) -> dict[str, Any]:
    """How a plan was made, recorded in the plan file (informational; applying a plan does not read it)."""
    options = result.options
    return {
        "criterion": options.criterion,
        "recover": result.recover,
        "allocate": options.allocate,
        "ratio": options.ratio,
        "target_macs": options.target_macs,
        "round_to": options.round_to,
        "min_keep": options.min_keep,
        "exclude": list(options.exclude),
        "protect_first": options.protect_first,
        "protect_last": options.protect_last,
        "lossless": options.lossless,
        "seed": options.seed,
    }

def prune_json(result: PruneResult, output: str | None = None, plan_out: str | None = None) -> dict[str, Any]:
    """The `prune --json` object."""
    return {
        "output": output,
        "criterion": result.criterion,
        "ratio": result.ratio,
        "target_macs": result.options.target_macs,
        "budget_met": result.budget_met,
        "round_to": result.options.round_to,
        "min_keep": result.options.min_keep,
        "lossless_found": result.lossless_found,
        "lossless_removed": result.lossless_removed,
        "lossless_kept": to_jsonable(result.outcome.lossless_kept),
        "plan": result.options.plan_path,
        "plan_out": plan_out,
        "model_sha256": result.model_sha256,
        "left_alone": [
            {"group": gid, "reason": why}
            for gid, why in sorted({**result.left_alone, **result.outcome.left_whole}.items())
        ],
        "notes": list(result.outcome.notes),
        "analysis_shapes": to_jsonable(result.analysis_shapes),
        "params_before": result.params_before,
        "params_after": result.params_after,
        "macs_before": result.macs_before,
        "macs_after": result.macs_after,
        "size_before": result.size_before,
        "size_after": result.size_after,
        "groups": len(result.groups),
        "prunable_groups": result.prunable_groups,
        "pruned_groups": result.pruned_groups,
        "channels_removed": result.channels_removed,
        "pruned": [
            {"group": group.id, "channels": group.channels, "kept": len(result.plan.kept[group.id])}
            for group in result.groups
            if result.plan.changes(group)
        ],
        "blocked": to_jsonable(result.blocked),
        "recover": result.recover,
        "allocate": result.options.allocate,
        "sensitivity": sensitivity_json(result.sensitivity) if result.sensitivity is not None else None,
        "recovery": _recovery_json(result),
        "evaluation": _evaluation_json(result),
    }
