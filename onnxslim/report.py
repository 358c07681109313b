"""Render result dataclasses as terminal tables, JSON and Markdown. Renders only; computes nothing."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxslim.analysis.groups import ChannelGroup
from onnxslim.bench import BenchResult, ModelBench, OpTime
from onnxslim.model_info import ModelInfo
from onnxslim.pipeline import OptimizeResult, SweepResult, machine
from onnxslim.prune.pruner import PruneResult
from onnxslim.prune.sensitivity import SensitivityCurves
from onnxslim.quant import CandidateTiming, QuantizeResult
from onnxslim.quant.config import RETIME_FACTOR
from onnxslim.runtime import SPEEDUP_BLOCKS

__all__ = ["to_jsonable", "to_json", "format_count", "format_bytes", "format_table", "render_inspect", "inspect_json", "render_bench", "bench_json", "render_groups", "groups_json", "render_prune", "prune_json", "plan_record", "render_quantize", "quantize_json"]


def to_jsonable(value: Any) -> Any:
    """Dataclasses, tuples, numpy scalars, paths and enums as plain JSON values (NaN/inf become null)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    return value


def to_json(value: Any) -> str:
    return json.dumps(to_jsonable(value), indent=2)


def format_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, markdown: bool = False) -> str:
    """A plain aligned table (numbers right-aligned), or a Markdown table."""
    cells = [[str(c) for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(_looks_numeric(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True))

    return "\n".join(line(r).rstrip() for r in [list(headers), ["-" * w for w in widths], *cells])


def _looks_numeric(text: str) -> bool:
    return bool(text) and (text[0].isdigit() or text[0] in "-+.") and text not in ("-",)


def _shape_text(shape: Sequence[int | str] | None) -> str:
    return "?" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def render_inspect(info: ModelInfo, *, top: int = 10, verbose: bool = False) -> str:
    """The `inspect` report for a terminal."""
    storage = info.weight_storage
    lines = [
        f"model      {info.path}  ({format_bytes(info.size_bytes)})",
        f"producer   {info.producer}   IR {info.ir_version}   opsets "
        + ", ".join(f"{d} {v}" for d, v in info.opsets.items()),
        "",
        format_table(
            ["", "name", "dtype", "shape"],
            [("input", t.name, t.dtype, _shape_text(t.shape)) for t in info.inputs]
            + [("output", t.name, t.dtype, _shape_text(t.shape)) for t in info.outputs],
        ),
        "",
        "analysis shapes  " + ", ".join(f"{n}:{','.join(map(str, s))}" for n, s in info.analysis_shapes.items()),
        f"params     {format_count(info.params)}",
        f"MACs       {format_count(info.macs)}   (Conv/ConvTranspose/Gemm/MatMul at the analysis shapes)"
        + (f"; unknown for {len(info.cost.unknown)} layers whose shapes could not be inferred: "
           + ", ".join(info.cost.unknown[:5]) + (" ..." if len(info.cost.unknown) > 5 else "") if info.cost.unknown else ""),
        "weights    "
        + ", ".join(
            f"{label} {count} tensors / {format_count(elements)} values"
            for label, (count, elements) in (
                ("initializers", storage.initializers),
                ("Constant nodes", storage.constant_nodes),
                ("computed by constant subgraphs", storage.computed),
            )
            if count
        )
        + (f"   ({info.folded_nodes} constant nodes folded at load)" if info.folded_nodes else ""),
        "",
        "ops        " + ", ".join(f"{op} {n}" for op, n in info.ops.items()),
    ]
    heavy = info.cost.top_layers(top)
    if heavy:
        total = max(info.macs, 1)
        lines += [
            "",
            f"top {len(heavy)} layers by MACs",
            format_table(
                ["layer", "op", "MACs", "share", "params"],
                [
                    (layer.name, layer.op_type, format_count(layer.macs), f"{100 * layer.macs / total:.1f}%",
                     format_count(layer.params))
                    for layer in heavy
                ],
            ),
        ]
    if info.quantized_ops:
        lines += [
            "",
            "quantized  already: " + ", ".join(f"{op} x{n}" for op, n in info.quantized_ops.items())
            + "; prune and quantize refuse it (start from the fp32 model)",
        ]
    if info.groups:
        lines += ["", render_groups(info.groups, verbose=verbose)]
    elif not info.quantized_ops:
        lines += ["", "channel groups  none found (no Conv, Gemm or MatMul with constant weights)"]
    return "\n".join(lines)


def inspect_json(info: ModelInfo) -> dict[str, Any]:
    """The `inspect --json` object."""
    return {
        "path": info.path,
        "size_bytes": info.size_bytes,
        "producer": info.producer,
        "ir_version": info.ir_version,
        "opsets": info.opsets,
        "inputs": to_jsonable(info.inputs),
        "outputs": to_jsonable(info.outputs),
        "analysis_shapes": to_jsonable(info.analysis_shapes),
        "ops": info.ops,
        "params": info.params,
        "macs": info.macs,
        "elementwise": info.cost.elementwise,
        "macs_unknown_layers": list(info.cost.unknown),
        "weight_storage": {
            kind: {"tensors": count, "values": values}
            for kind, (count, values) in (
                ("initializers", info.weight_storage.initializers),
                ("constant_nodes", info.weight_storage.constant_nodes),
                ("computed", info.weight_storage.computed),
            )
        },
        "folded_nodes": info.folded_nodes,
        "layers": [
            {"name": layer.name, "op_type": layer.op_type, "macs": layer.macs, "params": layer.params}
            for layer in info.cost.layers
            if layer.macs or layer.params
        ],
        "groups": groups_json(info.groups),
        "quantized_ops": info.quantized_ops,
    }


# ------------------------------------------------------------------------------------------------ bench


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.1f}"


def _fraction(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.2f}%"


def _bench_row(model: ModelBench, *, labels: bool) -> list[str]:
    latency, fidelity = model.latency, model.fidelity
    row = [
        model.name,
        _ms(latency.p50_ms),
        _ms(latency.p90_ms),
        _ms(latency.p99_ms),
        f"{_ms(latency.mean_ms)}±{_ms(latency.std_ms)}",
        _ms(latency.min_ms),
        f"{model.speedup:.2f}x" + ("" if model.speedup_range is None else "  ({:.2f}-{:.2f})".format(*model.speedup_range)),
        f"{model.throughput:.1f}",
        format_bytes(model.size_bytes),
        format_count(model.params),
        format_count(model.macs),
        "ref" if fidelity is None else f"{fidelity.cosine:.6f}",
        "ref" if fidelity is None else f"{fidelity.max_abs:.3g}",
        "ref" if fidelity is None else _fraction(fidelity.top1_agreement),
    ]
    if labels:
        row.append(_fraction(model.accuracy.top1 if model.accuracy else None))
    row.append("n/a" if model.peak_memory_bytes is None else format_bytes(model.peak_memory_bytes))
    return row


def render_bench(result: BenchResult, *, markdown: bool = False) -> str:
    """The `bench` table with a line of settings above and the definitions below (terminal or Markdown)."""
    labels = any(m.accuracy is not None for m in result.models)
    headers = [
        "model", "p50 ms", "p90 ms", "p99 ms", "mean±std ms", "min ms", "speedup", "samples/s", "size",
        "params", "MACs", "cosine", "max abs", "top-1 agree",
    ]
    if labels:
        headers.append("top-1 acc")
    headers.append("peak mem")
    shapes = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in result.input_shapes.items())
    reference = result.models[0].name
    if result.random_data:
        data = f"data: {result.data} -- RANDOM inputs: fidelity is on random inputs, no accuracy"
    else:
        data = f"data: {result.data} ({result.samples} samples{', labels' if labels else ''})"
    settings = (
        f"batch {result.batch_size} ({shapes}), {result.threads} threads, {result.provider}, opt level "
        f"{result.opt_level}, {result.warmup} warm-up + {result.repeat} timed runs per model, interleaved"
    )
    notes = (
        f"speedup: {result.speedup_statistic} of {reference} / {result.speedup_statistic} of each. samples/s: "
        f"batch / mean latency. fidelity: output {result.output!r} against {reference}. MACs: at the shapes "
        "above. peak mem: rise of a fresh process's peak RSS from loading and running the model."
    )
    notes += (
        " speedup range: lowest-highest over 5 consecutive blocks of the interleaved runs; a range that contains "
        "1.00x is within this run's noise."
    )
    warnings = [
        f"{m.name}: {m.speedup:.2f}x is not a significant difference from {reference} "
        f"(within this run's noise: {m.speedup_range[0]:.2f}-{m.speedup_range[1]:.2f}x)"
        for m in result.models[1:]
        if m.speedup_range is not None and m.speedup_significant is False
    ]
    notes = "\n".join([notes, *(f"note: {text}" for text in [*result.notes, *warnings])])
    table = format_table(headers, [_bench_row(m, labels=labels) for m in result.models], markdown=markdown)
    profile = _render_profiles(result.models, markdown=markdown)
    if markdown:
        return "\n".join([f"{settings}; {data}", "", table, "", notes, *profile])
    return "\n".join([settings, data, "", table, "", notes, *profile])


_PROFILE_ROWS = 15


def _render_profiles(models: Sequence[ModelBench], *, markdown: bool) -> list[str]:
    """The 'where the time goes' table: op types down, models across (empty when nothing was profiled)."""
    profiles = [(m.name, m.profile) for m in models if m.profile is not None]
    if not profiles:
        return []
    by_model = [{op.op_type: op for op in profile.ops} for _, profile in profiles]
    op_types = sorted({op for ops in by_model for op in ops}, key=lambda op: -max(o[op].share for o in by_model if op in o))
    shown, rest = op_types[:_PROFILE_ROWS], op_types[_PROFILE_ROWS:]

    def cell(op: OpTime | None) -> str:
        return "-" if op is None else f"{_ms(op.ms)} ms {100 * op.share:.0f}% ({op.kernels})"

    rows = [[op_type, *(cell(ops.get(op_type)) for ops in by_model)] for op_type in shown]
    if rest:
        rows.append([f"{len(rest)} other op types", *(f"{_ms(sum(ops[op].ms for op in rest if op in ops))} ms" for ops in by_model)])
    rows.append(["kernel time", *(f"{_ms(profile.kernel_ms)} ms" for _, profile in profiles)])
    title = (
        f"where the time goes: onnxruntime's profiler, {profiles[0][1].runs} runs per model in its own session; "
        "kernel time per run by op type after onnxruntime's graph optimizations, share of the model's kernel time, "
        "(kernels per run). The profiler inflates short kernels: compare shares and models, not these with the "
        "latencies."
    )
    return ["", title, "", format_table(["op type", *(name for name, _ in profiles)], rows, markdown=markdown)]


def bench_json(result: BenchResult) -> dict[str, Any]:
    """The `bench --json` object: the result's fields (latencies in ms, sizes in bytes, inf/NaN as null)."""
    return to_jsonable(result)


# ------------------------------------------------------------------------------- channel groups, prune


_FOLLOWED = ", but its channels could not be followed ("


def _root_cause(node: str | None, reason: str, *, verbose: bool = False) -> tuple[str | None, str]:
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


def _group_status(group: ChannelGroup, *, verbose: bool = False) -> str:
    if group.blocked_by is None:
        return "prunable"
    node, reason = _root_cause(group.blocked_by.node, group.blocked_by.reason, verbose=verbose)
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
        }
        for group in groups
    ]


def _change(before: float, after: float) -> str:
    return f"{100 * (after - before) / before:+.1f}%" if before else "-"


def render_prune(result: PruneResult, output: str | None = None, *, verbose: bool = False) -> str:
    """The `prune` summary for a terminal: params, MACs and size before/after; groups found/prunable/pruned."""
    rows = [
        ("params", format_count(result.params_before), format_count(result.params_after),
         _change(result.params_before, result.params_after)),
        ("MACs", format_count(result.macs_before), format_count(result.macs_after),
         _change(result.macs_before, result.macs_after)),
        ("size", format_bytes(result.size_before), format_bytes(result.size_after),
         _change(result.size_before, result.size_after)),
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
    left_alone = {**result.left_alone, **result.outcome.left_whole}
    if left_alone:
        lines += ["", format_table(["left alone", "why"], sorted(left_alone.items()))]
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
            node, reason = _root_cause(b.node, b.reason, verbose=verbose)
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


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


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
                rows.append((f"top-1 agreement {o.output}", _percent(o.agreement_before), _percent(o.agreement_after)))
        if evaluation.accuracy_after is not None:
            rows.insert(0, ("top-1 (original " + _percent(evaluation.accuracy_original) + ")",
                            _percent(evaluation.accuracy_before), _percent(evaluation.accuracy_after)))
        lines += [
            "",
            f"against the original on {evaluation.samples} samples of {evaluation.data}",
            format_table(["", "pruned as sliced", f"after {result.recover}"], rows),
        ]
        legend = "cosine: the lower of the mean cosine and the worst output channel's"
        if any(o.agreement_after is not None for o in evaluation.outputs):
            legend += "; top-1 agreement: share of positions, e.g. every time step, whose top class is the original's"
        lines.append(f"({legend})")
        if evaluation.collapsed:
            lines += ["WARNING: the pruned model no longer works (cosine or top-1 agreement under 0.9, or 10 points "
                      "of top-1 lost): prune less (a higher --target-macs), exclude sensitive layers "
                      "(onnxslim sensitivity shows which), or give more calibration data"]
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
                     "agreement_before": o.agreement_before, "agreement_after": o.agreement_after}
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


# ---------------------------------------------------------------------------------------- sensitivity


def render_sensitivity(curves: SensitivityCurves, *, top: int | None = None) -> str:
    """Groups from most to least sensitive: damage (1 - worst output cosine) and top-1 at each ratio."""
    labelled = curves.accuracy_original is not None
    headers = ["group", "channels", "MACs at stake"] + [f"cos @{r:g}" for r in curves.ratios]
    if labelled:
        headers += [f"top-1 @{r:g}" for r in curves.ratios]
    shown = curves.groups if top is None else curves.groups[:top]
    rows = []
    for group in shown:
        row = [group.group, group.channels, format_count(group.macs)]
        row += [f"{p.cosine:.4f}" for p in group.points]
        if labelled:
            row += [_percent(p.accuracy) for p in group.points]
        rows.append(row)
    lines = [
        f"criterion  {curves.criterion}   recover {curves.recover}   measured on {curves.samples} samples of {curves.data}"
        + (f"   original top-1 {_percent(curves.accuracy_original)}" if labelled else ""),
        f"cost       {curves.trials} trials, about {curves.forward_passes} passes of the data through a model, "
        f"{curves.seconds:.1f} s",
        "",
        format_table(headers, rows),
        "",
        "(each group pruned alone at each ratio, its readers refit as --recover says; cos: the worst output's "
        "mean cosine against the original; most sensitive first)",
    ]
    if top is not None and len(curves.groups) > top:
        lines.append(f"{len(curves.groups) - top} less sensitive groups not shown (--top, or --json)")
    return "\n".join(lines)


def sensitivity_json(curves: SensitivityCurves) -> dict[str, Any]:
    """The `sensitivity --json` object: groups most sensitive first, a point per ratio."""
    return {
        "criterion": curves.criterion,
        "recover": curves.recover,
        "data": curves.data,
        "samples": curves.samples,
        "trials": curves.trials,
        "forward_passes": curves.forward_passes,
        "seconds": curves.seconds,
        "ratios": list(curves.ratios),
        "accuracy_original": curves.accuracy_original,
        "groups": [
            {
                "group": group.group,
                "channels": group.channels,
                "macs": group.macs,
                "points": [
                    {"ratio": p.ratio, "removed": p.removed, "cosine": p.cosine, "accuracy": p.accuracy}
                    for p in group.points
                ],
            }
            for group in curves.groups
        ],
    }


def require_plotting() -> None:
    """Raise a UsageError before any work when --plot is asked for and matplotlib is not installed."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        from onnxslim.errors import UsageError

        raise UsageError("--plot needs matplotlib: pip install 'onnxslim[plot]' (or pip install matplotlib)")


def plot_sensitivity(curves: SensitivityCurves, path: str | Path, *, top: int = 12) -> Path:
    """Damage curves of the most sensitive groups as a PNG (needs matplotlib: the `plot` extra)."""
    require_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.set_prop_cycle(color=[plt.get_cmap("tab20")(i) for i in range(20)])  # 12 curves, 12 colours
    for group in curves.groups[:top]:
        ratios = [0.0, *(p.ratio for p in group.points)]
        cosines = [1.0, *(p.cosine for p in group.points)]
        axis.plot(ratios, cosines, marker="o", label=f"{group.group} ({format_count(group.macs)} MACs)")
    axis.set_xlabel("fraction of the group's channels removed (alone)")
    axis.set_ylabel("worst output cosine vs original")
    axis.set_title(f"sensitivity: {curves.criterion} + {curves.recover} recovery, {curves.samples} samples")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=6, loc="lower left")
    figure.tight_layout()
    target = Path(path)
    partial = target.with_name(f".{target.name}.partial.png")  # written whole, then renamed: atomic
    try:
        figure.savefig(partial, dpi=120)
        partial.replace(target)
    finally:
        plt.close(figure)
        partial.unlink(missing_ok=True)
    return target


# ------------------------------------------------------------------------------------------- quantize


def _ratio(before: float | None, after: float | None, better: str, worse: str) -> str:
    if not before or not after:
        return "-"
    ratio = before / after
    return f"{ratio:.2f}x {better}" if ratio >= 1 else f"{1 / ratio:.2f}x {worse}"


def _points(before: float | None, after: float | None) -> str:
    return "-" if before is None or after is None else f"{100 * (after - before):+.2f} pt"


def _candidate_row(candidate: CandidateTiming) -> list[str]:
    if candidate.error is not None:
        return [candidate.config.label, "-", "-", "failed", "-", "-"]
    assert candidate.latency_ms is not None and candidate.fp32_latency_ms is not None
    spread = "" if candidate.speedup_low is None else f" ({candidate.speedup_low:.2f}-{candidate.speedup_high:.2f})"
    return [
        candidate.config.label,
        _ms(candidate.latency_ms),
        _ms(candidate.fp32_latency_ms),
        f"{candidate.speedup:.2f}x{spread}" + (" re-timed" if candidate.retimed else ""),
        format_bytes(candidate.size_bytes or 0),
        str(candidate.nodes_quantized),
    ]


_FLOAT_LABELS = {
    onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16",
    onnx.TensorProto.DOUBLE: "fp64",
}


def _float_label(result: QuantizeResult) -> str:
    """The float model's column label, from its first floating-point output's type ('fp32', 'fp16' ...)."""
    types = [o.type.tensor_type.elem_type for o in result.model.graph.output]
    return next((_FLOAT_LABELS[t] for t in types if t in _FLOAT_LABELS), "float")


def render_quantize(result: QuantizeResult, output: str | None = None) -> str:
    """The `quantize` report for a terminal: the decision, fp32 against int8, fidelity, candidates tried."""
    calibration = result.calibration
    verdict = "yes" if result.quantized else "NO, the fp32 model is kept"
    label = result.config.label if result.config else "-"
    lines = [
        f"quantized    {verdict}: {result.reason}",
        f"calibration  {calibration.method} on {calibration.data}: {calibration.samples} samples in "
        f"{calibration.batches} batches of {calibration.batch_size}, {calibration.tensors} tensors; held at most "
        f"{calibration.peak_held_batches} batches ({format_bytes(calibration.peak_held_batches * calibration.bytes_per_batch)}"
        f", bound {format_bytes(calibration.memory_bound_bytes)})",
        "",
        format_table(
            ["", _float_label(result), f"int8 ({label})", "change"],
            [
                ("latency ms", _ms(result.latency_fp32_ms or 0), _ms(result.latency_int8_ms or 0),
                 _ratio(result.latency_fp32_ms, result.latency_int8_ms, "faster", "slower")),
                ("size", format_bytes(result.size_fp32), format_bytes(result.size_int8 or 0),
                 _ratio(result.size_fp32, result.size_int8, "smaller", "larger")),
                *(
                    [("top-1 accuracy", _fraction(result.accuracy_fp32.top1), _fraction(result.accuracy_int8.top1),
                      _points(result.accuracy_fp32.top1, result.accuracy_int8.top1))]
                    if result.accuracy_fp32 is not None and result.accuracy_int8 is not None
                    else []
                ),
                ("nodes in int8", "-", f"{result.nodes_quantized} of {(result.nodes_quantized or 0) + (result.nodes_fp32 or 0)}", ""),
            ],
        ),
    ]
    if result.fidelity is not None:
        fidelity = result.fidelity
        top1 = "" if fidelity.top1_agreement is None else f", top-1 agreement {_fraction(fidelity.top1_agreement)}"
        channel = ""
        if fidelity.worst_channel_cosine is not None:
            channel = (
                f"; worst channel (axis {fidelity.channel_axis}, #{fidelity.worst_channel} of {fidelity.channels}) "
                f"cosine {fidelity.worst_channel_cosine:.6f}, worst relative error {fidelity.worst_channel_rel_error:.3g}"
            )
        lines += [
            "",
            f"fidelity     output {result.output!r}: cosine {fidelity.cosine:.6f}, max abs {fidelity.max_abs:.3g}, "
            f"mean abs {fidelity.mean_abs:.3g}{top1}{channel}",
            f"             on {result.fidelity_data}",
        ]
    lines += _render_guard(result)
    shapes = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in result.timing_shapes.items())
    lines += [
        "",
        f"candidates tried (median latency, interleaved with fp32 in the same run; {shapes}, {result.threads} threads; "
        f"int8 is kept when at least {result.min_speedup:.2f}x as fast and faster in every block)",
        f"speedup range: lowest-highest over {SPEEDUP_BLOCKS} consecutive blocks of that run; a verdict the range "
        f"leaves uncertain is re-timed once, {RETIME_FACTOR}x longer (re-timed)",
        format_table(["config", "int8 ms", "fp32 ms", "speedup", "size", "int8 nodes"],
                     [_candidate_row(c) for c in result.candidates]),
    ]
    failed = [c for c in result.candidates if c.error]
    lines += [f"  {c.config.label}: {c.error}" for c in failed]
    if result.notes:
        lines += ["", *(f"note: {note}" for note in result.notes)]
    if output:
        lines += ["", f"wrote {output} ({'int8' if result.quantized else 'fp32'})"]
    if not result.quantized and result.config is not None:
        lines += [
            "to see where the int8 model loses time: write it with --force, then "
            "`onnxslim bench MODEL INT8_MODEL --profile`",
        ]
    return "\n".join(lines)


def _render_guard(result: QuantizeResult) -> list[str]:
    """CPU choice, budget, calibration methods and exclusion trials, nodes kept fp32."""
    lines = [""]
    if result.cpu is not None:
        flags = ", ".join(result.cpu.cpu.flags) or "none seen"
        lines.append(
            f"cpu          {'reduce-range (7-bit weights)' if result.cpu.reduce_range else 'full 8-bit weights'}: "
            f"{result.cpu.reason} [flags: {flags}; from {result.cpu.cpu.source}]"
        )
    check = result.budget_check
    verdict = "-" if check is None else "met" if check.met else f"MISSED: {check.why}"
    lines.append(f"budget       {result.budget.label}: {verdict}")
    trials = len(result.method_trials) - 1 + len(result.exclusion_trials)
    if trials:
        tried = ", ".join(f"{t.method} {t.check.score:.4f}" for t in result.method_trials)
        lines.append(f"guard        {trials} of at most {result.max_trials} trials; calibration methods (fidelity): {tried}")
        for trial in result.exclusion_trials:
            lines.append(
                f"             top {trial.blocks} block(s), {trial.nodes} node(s) fp32: fidelity {trial.check.score:.4f}"
                f"{' (meets)' if trial.check.met else ''}"
            )
    if result.fp32_nodes:
        rows = [(n.name, n.op_type, "-" if n.error is None else f"{n.error:.3g}", n.reason) for n in result.fp32_nodes[:20]]
        lines += ["", f"kept in fp32 ({len(result.fp32_nodes)} node(s); error: 1 - fidelity with int8 at that place alone)",
                  format_table(["node", "op", "error", "why"], rows)]
        if len(result.fp32_nodes) > 20:
            lines.append(f"  ... and {len(result.fp32_nodes) - 20} more (--json lists all)")
    return lines


def quantize_json(result: QuantizeResult, output: str | None = None) -> dict[str, Any]:
    """The `quantize --json` object."""
    config = result.config
    accuracy = None
    if result.accuracy_fp32 is not None and result.accuracy_int8 is not None:
        accuracy = {
            "fp32": result.accuracy_fp32.top1,
            "int8": result.accuracy_int8.top1,
            "delta": result.accuracy_delta,
            "top5_fp32": result.accuracy_fp32.top5,
            "top5_int8": result.accuracy_int8.top5,
            "samples": result.accuracy_int8.samples,
        }
    fidelity = None
    if result.fidelity is not None:
        fidelity = {**to_jsonable(result.fidelity), "output": result.output, "data": result.fidelity_data}
    return {
        "output": output,
        "quantized": result.quantized,
        "forced": result.forced,
        "reason": result.reason,
        "format": result.format,
        "activations": result.activations,
        "weights": config.weights if config else None,
        "per_channel": config.per_channel if config else None,
        "reduce_range": config.reduce_range if config else None,
        "op_types": list(config.op_types) if config and config.op_types is not None else None,
        "method": result.method,
        "latency_fp32_ms": result.latency_fp32_ms,
        "latency_int8_ms": result.latency_int8_ms,
        "speedup": result.speedup,
        "speedup_low": result.speedup_low,
        "speedup_high": result.speedup_high,
        "speedup_retimed": None if result.timing is None else result.timing.retimed,
        "min_speedup": result.min_speedup,
        "size_fp32": result.size_fp32,
        "size_int8": result.size_int8,
        "nodes_quantized": result.nodes_quantized,
        "nodes_fp32": result.nodes_fp32,
        "fidelity": to_jsonable(fidelity),
        "accuracy": accuracy,
        "calibration": to_jsonable(result.calibration),
        "candidates": [
            {"config": c.config.label, **to_jsonable(c.config), "latency_ms": c.latency_ms,
             "fp32_latency_ms": c.fp32_latency_ms, "speedup": c.speedup, "size_bytes": c.size_bytes,
             "nodes_quantized": c.nodes_quantized, "error": c.error, "budget_met": c.budget_met, "score": c.score,
             "speedup_low": c.speedup_low, "speedup_high": c.speedup_high, "block_speedups": list(c.block_speedups),
             "retimed": c.retimed}
            for c in result.candidates
        ],
        "threads": result.threads,
        "timing_shapes": to_jsonable(result.timing_shapes),
        "opset": {"source": result.opset[0], "output": result.opset[1]},
        "notes": list(result.notes),
        "cpu": None if result.cpu is None else {
            "flags": list(result.cpu.cpu.flags), "source": result.cpu.cpu.source, "vnni": result.cpu.cpu.vnni,
            "reduce_range": result.cpu.reduce_range, "overridden": result.cpu.overridden, "reason": result.cpu.reason,
        },
        "budget": {**to_jsonable(result.budget.resolved), "label": result.budget.label},
        "budget_met": result.budget_met,
        "budget_check": to_jsonable(result.budget_check),
        "fp32_nodes": to_jsonable(result.fp32_nodes),
        "max_trials": result.max_trials,
        "method_trials": to_jsonable(result.method_trials),
        "exclusion_trials": to_jsonable(result.exclusion_trials),
    }


# ---------------------------------------------------------------------------------------- optimize


def _quality(bench: ModelBench, check: Any) -> str:
    """Accuracy when there are labels, else the fidelity score the budget reads."""
    if bench.accuracy is not None:
        return _percent(bench.accuracy.top1)
    if check is not None:
        return f"cos {check.score:.4f}"
    return "reference"


def _optimize_rows(result: OptimizeResult) -> list[list[str]]:
    rows = []
    for candidate in result.candidates:
        b = candidate.bench
        name = candidate.name + (" → optimized.onnx" if candidate.name == result.chosen else "")
        met = "-" if candidate.check is None else ("yes" if candidate.check.met else "no: " + candidate.check.why)
        spread = f" ({b.speedup_range[0]:.2f}–{b.speedup_range[1]:.2f})" if b.speedup_range and candidate.name != "original" else ""
        rows.append([
            name, f"{b.latency.p50_ms:.3f}", f"{b.latency.p90_ms:.3f}", f"{b.speedup:.2f}x{spread}", format_bytes(b.size_bytes),
            format_count(b.params), format_count(b.macs), _quality(b, candidate.check),
            format_bytes(b.peak_memory_bytes) if b.peak_memory_bytes is not None else "-", met,
        ])
    return rows


_OPTIMIZE_HEADERS = ["model", "p50 ms", "p90 ms", "speedup", "size", "params", "MACs", "accuracy / fidelity",
                     "peak mem", "meets budget"]


def _trial_rows(result: OptimizeResult) -> list[list[str]]:
    rows = []
    for number, trial in enumerate(result.trials, start=1):
        drop = f", -{trial.pruned_drop:.2f} pt" if trial.pruned_drop is not None else ""
        final = "-"
        if trial.final_met is not None:
            final_drop = f", -{trial.final_drop:.2f} pt" if trial.final_drop is not None else ""
            int8 = "int8" if trial.quantized else "fp32 kept"
            final = f"{int8}: cos {trial.final_score:.4f}{final_drop} ({'meets' if trial.final_met else 'misses'})"
        rows.append([
            str(number), f"{trial.target_macs:.3f}", f"{trial.macs_kept:.3f}",
            f"cos {trial.pruned_score:.4f}{drop} ({'passes' if trial.pruned_met else 'fails'})", final,
            "-" if trial.speedup is None else f"{trial.speedup:.2f}x", f"{trial.seconds:.1f} s",
        ])
    return rows


_TRIAL_HEADERS = ["trial", "MACs asked", "MACs kept", "pruned fp32 vs original", "final vs original", "speedup", "time"]


def render_optimize(result: OptimizeResult, outdir: str | None = None, *, markdown: bool = False) -> str:
    """The `optimize` report: terminal text, or the Markdown of report.md (readable on GitHub as it is)."""
    h = (lambda text: f"## {text}") if markdown else (lambda text: text)
    lines = [
        "# onnxslim optimize" if markdown else "onnxslim optimize",
        "",
        f"**{result.reason}.**" if markdown else result.reason + ".",
        "",
        f"budget: {result.budget.label} on {result.data}; {'met' if result.budget_met else 'NOT met'}",
        f"search: {result.search}",
        "",
        h("Before and after (one interleaved run)"),
        "",
        format_table(_OPTIMIZE_HEADERS, _optimize_rows(result), markdown=markdown),
        "",
        f"latency of one run on a batch of the evaluation data, {result.threads} threads; speedup = p50 of the "
        "original / p50 of the model (in brackets: its lowest and highest over five blocks of the run — a model "
        "counts as faster only when it is faster in every block).",
    ]
    if result.trials:
        lines += ["", h(f"Trials ({len(result.trials)} of at most {result.max_trials})"), "",
                  format_table(_TRIAL_HEADERS, _trial_rows(result), markdown=markdown)]
    if result.prune is not None:
        pruned = [g for g in result.prune.groups if result.prune.plan.changes(g)]
        pruned.sort(key=lambda g: len(result.prune.plan.kept[g.id]) / g.channels)  # type: ignore[union-attr]
        rows = [[g.id, str(g.channels), str(len(result.prune.plan.kept[g.id]))] for g in pruned[:12]]
        lines += ["", h("Pruned"), "",
                  f"{result.prune.pruned_groups} of {result.prune.prunable_groups} prunable groups cut, "
                  f"{result.prune.channels_removed} channels; MACs {format_count(result.prune.macs_before)} → "
                  f"{format_count(result.prune.macs_after)}; criterion {result.prune.criterion}, recovery "
                  f"{result.prune.recover}. Most cut first:", "",
                  format_table(["group", "channels", "kept"], rows, markdown=markdown)]
    if result.quantize is not None:
        q = result.quantize
        lines += ["", h("int8"), "", f"{'kept' if q.quantized else 'not kept'} (the quantizer's own timing, against "
                  f"the fp32 model it was given): {q.reason}"]
        if q.fp32_nodes:
            rows = [[n.name, n.op_type, "-" if n.error is None else f"{n.error:.4f}", n.reason] for n in q.fp32_nodes[:20]]
            lines += ["", "nodes kept in fp32:", "", format_table(["node", "op", "error", "why"], rows, markdown=markdown)]
    lines += ["", h("Machine"), "", f"CPU: {machine()}; int8 defaults: {result.cpu.reason}"]
    for note in result.notes:
        lines.append(f"note: {note}")
    if result.command:
        lines += ["", h("Reproduce"), "", f"```sh\n{result.command}\n```" if markdown else result.command]
    if outdir and not markdown:
        lines += ["", f"wrote {', '.join(result.files)} in {outdir} ({result.seconds:.0f} s)"]
    return "\n".join(lines)


def _check_json(check: Any) -> dict[str, Any] | None:
    if check is None:
        return None
    return {"met": check.met, "score": check.score, "drop": check.drop, "why": check.why or None}


def optimize_json(result: OptimizeResult, outdir: str | None = None) -> dict[str, Any]:
    """The `optimize --json` object (and report.json)."""
    return {
        "outdir": outdir,
        "chosen": result.chosen,
        "reason": result.reason,
        "speedup": result.speedup,
        "budget": {"max_drop": result.budget.max_drop, "min_fidelity": result.budget.min_fidelity,
                   "label": result.budget.label},
        "budget_met": result.budget_met,
        "data": result.data,
        "search": result.search,
        "max_trials": result.max_trials,
        "models": [
            {
                "name": c.name,
                "speedup_range": list(c.bench.speedup_range) if c.bench.speedup_range else None,
                "p50_ms": c.bench.latency.p50_ms,
                "p90_ms": c.bench.latency.p90_ms,
                "speedup": c.bench.speedup,
                "size": c.bench.size_bytes,
                "params": c.bench.params,
                "macs": c.bench.macs,
                "accuracy": None if c.bench.accuracy is None else c.bench.accuracy.top1,
                "fidelity": None if c.check is None else c.check.score,
                "peak_memory": c.bench.peak_memory_bytes,
                "budget": _check_json(c.check),
            }
            for c in result.candidates
        ],
        "trials": [to_jsonable(t) for t in result.trials],
        "pruned": None if result.prune is None else {
            "macs_before": result.prune.macs_before, "macs_after": result.prune.macs_after,
            "groups": [{"group": g.id, "channels": g.channels, "kept": len(result.prune.plan.kept[g.id])}
                       for g in result.prune.groups if result.prune.plan.changes(g)],
        },
        "int8": None if result.quantize is None else {
            "kept": result.quantize.quantized, "reason": result.quantize.reason,
            "fp32_nodes": [{"name": n.name, "op_type": n.op_type, "error": n.error, "reason": n.reason}
                           for n in result.quantize.fp32_nodes],
        },
        "cpu": {"machine": machine(), "reduce_range": result.cpu.reduce_range, "why": result.cpu.reason},
        "threads": result.threads,
        "seconds": result.seconds,
        "files": list(result.files),
        "command": result.command,
        "notes": list(result.notes),
    }


def plot_optimize(result: OptimizeResult) -> bytes | None:
    """report.png: accuracy or fidelity against latency of every measured model (None without matplotlib)."""
    import importlib.util
    import io

    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    labelled = any(c.bench.accuracy is not None for c in result.candidates)
    for c in result.candidates:
        if labelled and c.bench.accuracy is not None:
            y = 100 * c.bench.accuracy.top1
        else:
            y = 1.0 if c.check is None else c.check.score
        axis.scatter([c.bench.latency.p50_ms], [y], s=60 if c.name == result.chosen else 30)
        axis.annotate(c.name + (" (optimized)" if c.name == result.chosen else ""), (c.bench.latency.p50_ms, y),
                      fontsize=8, xytext=(4, 4), textcoords="offset points")
    axis.set_xlabel("p50 latency, ms")
    axis.set_ylabel("top-1 %" if labelled else "fidelity (cosine) vs original")
    axis.set_title(f"onnxslim optimize: {result.budget.label}", fontsize=9)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def render_sweep(result: SweepResult, *, markdown: bool = False) -> str:
    """The `sweep` table: per MAC budget, quality, latency, speedup, params, size."""
    labelled = result.original.accuracy is not None
    headers = ["MACs asked", "MACs kept", "int8", "accuracy" if labelled else "fidelity", "p50 ms", "speedup",
               "params", "size", "meets budget"]
    rows = [["original", "1.000", "-", _quality(result.original, None) if labelled else "1.0000",
             f"{result.original.latency.p50_ms:.3f}", "1.00x", format_count(result.original.params),
             format_bytes(result.original.size_bytes), "-"]]
    for p in result.points:
        quality = _percent(p.bench.accuracy.top1) if labelled and p.bench.accuracy is not None else (
            "-" if p.check is None else f"{p.check.score:.4f}")
        rows.append([f"{p.target_macs:g}", f"{p.macs_kept:.3f}", "yes" if p.quantized else "no", quality,
                     f"{p.bench.latency.p50_ms:.3f}", f"{p.bench.speedup:.2f}x", format_count(p.bench.params),
                     format_bytes(p.bench.size_bytes), "-" if p.check is None else ("yes" if p.check.met else "no")])
    return "\n".join([
        f"budget {result.budget.label} on {result.data}; {result.threads} threads; one interleaved run "
        f"({result.seconds:.0f} s in all)",
        "",
        format_table(headers, rows, markdown=markdown),
    ])


def sweep_json(result: SweepResult) -> dict[str, Any]:
    """The `sweep --json` object."""
    def row(bench: ModelBench) -> dict[str, Any]:
        return {"p50_ms": bench.latency.p50_ms, "speedup": bench.speedup, "params": bench.params,
                "size": bench.size_bytes, "macs": bench.macs,
                "accuracy": None if bench.accuracy is None else bench.accuracy.top1}

    return {
        "budget": {"max_drop": result.budget.max_drop, "min_fidelity": result.budget.min_fidelity},
        "data": result.data,
        "threads": result.threads,
        "seconds": result.seconds,
        "original": row(result.original),
        "points": [
            {"target_macs": p.target_macs, "macs_kept": p.macs_kept, "quantized": p.quantized,
             "fidelity": None if p.check is None else p.check.score,
             "budget_met": None if p.check is None else p.check.met, **row(p.bench)}
            for p in result.points
        ],
    }


def plot_sweep(result: SweepResult) -> bytes:
    """Accuracy or fidelity against latency of every sweep point (needs matplotlib: `require_plotting`)."""
    import io

    require_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labelled = result.original.accuracy is not None
    figure, axis = plt.subplots(figsize=(6, 4))
    xs = [result.original.latency.p50_ms] + [p.bench.latency.p50_ms for p in result.points]
    ys = [100 * result.original.accuracy.top1 if labelled and result.original.accuracy else 1.0]
    for p in result.points:
        if labelled and p.bench.accuracy is not None:
            ys.append(100 * p.bench.accuracy.top1)
        else:
            ys.append(p.check.score if p.check is not None else float("nan"))
    labels = ["original"] + [f"{p.target_macs:g}" + (" int8" if p.quantized else "") for p in result.points]
    axis.plot(xs[1:], ys[1:], marker="o")
    axis.scatter(xs[:1], ys[:1], marker="*", s=120)
    for x, y, label in zip(xs, ys, labels, strict=True):
        axis.annotate(label, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    axis.set_xlabel("p50 latency, ms")
    axis.set_ylabel("top-1 %" if labelled else "fidelity (cosine) vs original")
    axis.set_title("onnxslim sweep: MACs kept", fontsize=9)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()
