"""`onnxslim quantize`: the int8 decision, its candidates, the guards and their trials."""

from __future__ import annotations

from typing import Any

import onnx

from onnxslim.quant import CandidateTiming, QuantizeResult
from onnxslim.quant.config import RETIME_FACTOR
from onnxslim.report.format import (
    format_bytes,
    format_fraction,
    format_ms,
    format_percent,
    format_points,
    format_ratio,
    format_table,
    to_jsonable,
)
from onnxslim.runtime import SPEEDUP_BLOCKS

__all__ = ["render_quantize", "quantize_json"]


def _candidate_row(candidate: CandidateTiming) -> list[str]:
    if candidate.error is not None:
        return [candidate.config.label, "-", "-", "failed", "-", "-"]
    assert candidate.latency_ms is not None and candidate.fp32_latency_ms is not None
    spread = "" if candidate.speedup_low is None else f" ({candidate.speedup_low:.2f}-{candidate.speedup_high:.2f})"
    return [
        candidate.config.label,
        format_ms(candidate.latency_ms),
        format_ms(candidate.fp32_latency_ms),
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
    lines = [f"quantized    {verdict}: {result.reason}", *_render_mode(result)]
    if calibration is None:
        lines.append("calibration  none: dynamic int8 quantizes the activations at run time")
    else:
        lines.append(
            f"calibration  {calibration.method} on {calibration.data}: {calibration.samples} samples in "
            f"{calibration.batches} batches of {calibration.batch_size}, {calibration.tensors} tensors; held at most "
            f"{calibration.peak_held_batches} batches ({format_bytes(calibration.peak_held_batches * calibration.bytes_per_batch)}"
            f", bound {format_bytes(calibration.memory_bound_bytes)})"
            + ("; ranges per tensor: " + ", ".join(f"{kind} {count}" for kind, count in calibration.range_kinds.items())
               if calibration.range_kinds else "")
        )
    lines += [
        "",
        format_table(
            ["", _float_label(result), f"int8 ({label})", "change"],
            [
                ("latency ms", format_ms(result.latency_fp32_ms or 0), format_ms(result.latency_int8_ms or 0),
                 format_ratio(result.latency_fp32_ms, result.latency_int8_ms, "faster", "slower")),
                ("size", format_bytes(result.size_fp32), format_bytes(result.size_int8 or 0),
                 format_ratio(result.size_fp32, result.size_int8, "smaller", "larger")),
                *(
                    [("top-1 accuracy", format_fraction(result.accuracy_fp32.top1), format_fraction(result.accuracy_int8.top1),
                      format_points(result.accuracy_fp32.top1, result.accuracy_int8.top1))]
                    if result.accuracy_fp32 is not None and result.accuracy_int8 is not None
                    else []
                ),
                ("nodes in int8", "-", f"{result.nodes_quantized} of {(result.nodes_quantized or 0) + (result.nodes_fp32 or 0)}", ""),
            ],
        ),
    ]
    if result.fidelity is not None:
        fidelity = result.fidelity
        top1 = "" if fidelity.top1_agreement is None else f", top-1 agreement {format_fraction(fidelity.top1_agreement)}"
        if fidelity.strings_unchanged is not None:  # a sequence output: the strings first, frames after
            top1 = (f", strings unchanged {fidelity.strings_unchanged:.3f} (n={fidelity.samples}, "
                    f"{fidelity.strings_changed} changed; per frame{top1.removeprefix(',')})")
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
    if result.step_seconds:
        total = sum(result.step_seconds.values())
        steps = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.step_seconds.items() if seconds >= 0.05)
        cpu = sum(result.step_cpu_seconds.values())
        lines += ["", f"time         {total:.1f} s: {steps}" + (f" (CPU time {cpu:.1f} s, every thread)" if cpu else "")]
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

def _render_mode(result: QuantizeResult) -> list[str]:
    """The mode chosen and why; with both measured, each mode's fastest variant: speed and fidelity."""
    mode = result.mode
    if mode is None:
        return []
    chosen = mode.chosen if result.quantized else f"none kept, fp32 (the int8 shown below is {mode.chosen})"
    lines = [f"mode         {chosen} (--mode {mode.asked}; MatMul/Gemm {mode.matmul_share:.0%} of the MACs): "
             f"{mode.reason}"]
    if len(mode.candidates) < 2:
        return lines
    head = {t.config.mode: t for t in mode.head_to_head}
    rows = []
    for candidate in mode.candidates:
        timing = head.get(candidate.mode, candidate.timing)
        if timing is None or timing.speedup is None:
            rows.append([candidate.mode, "-", "-", "-", "no", candidate.reason])
            continue
        spread = "" if timing.speedup_low is None else f" ({timing.speedup_low:.2f}-{timing.speedup_high:.2f})"
        rows.append([
            candidate.mode, timing.config.label, f"{timing.speedup:.2f}x{spread}",
            "-" if timing.score is None else f"{timing.score:.4f}",
            "yes" if candidate.kept else "no",
            "timed side by side" if candidate.mode in head else "its own guard's run",
        ])
    return lines + [format_table(["mode", "fastest variant", "speedup", "fidelity", "kept", "timing"], rows)]


def _mode_json(result: QuantizeResult) -> dict[str, Any] | None:
    mode = result.mode
    if mode is None:
        return None

    def timing(t: CandidateTiming | None) -> dict[str, Any] | None:
        if t is None:
            return None
        return {"config": t.config.label, "latency_ms": t.latency_ms, "fp32_latency_ms": t.fp32_latency_ms,
                "speedup": t.speedup, "speedup_low": t.speedup_low, "speedup_high": t.speedup_high,
                "retimed": t.retimed, "score": t.score, "budget_met": t.budget_met, "size_bytes": t.size_bytes}

    return {
        "chosen": mode.chosen, "reason": mode.reason, "asked": mode.asked, "matmul_share": mode.matmul_share,
        "candidates": [{"mode": c.mode, "kept": c.kept, "reason": c.reason, **(timing(c.timing) or {})}
                       for c in mode.candidates],
        "head_to_head": [{"mode": t.config.mode, **(timing(t) or {})} for t in mode.head_to_head],
    }


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
    basis = "" if check is None or check.samples is None else f" (on {check.samples} samples)"
    if check is not None and check.met and check.score_name == "strings unchanged":
        basis = f" ({check.score_label})"
    lines.append(f"budget       {result.budget.label}: {verdict}{basis}")
    lines += _render_placement(result)
    measure = result.measure
    if measure is not None:
        how = (f"{len(measure.alone)} alone, the rest in groups below {measure.resolution:.2g} (group testing)"
               if measure.hierarchical else "every one alone")
        stopped = "" if measure.complete else "; stopped by its time limit"
        lines.append(
            f"measure      {measure.gates} roundings: {how}; {measure.runs} runs of the gated model on "
            f"{measure.samples} calibration sample(s), {measure.seconds:.1f} s{stopped}"
        )
    trials = max(len(result.method_trials) - 1, 0) + len(result.exclusion_trials)
    if trials:
        tried = ", ".join(f"{t.method} {t.check.score:.4f}" for t in result.method_trials)
        figure = result.method_trials[0].check.score_name if result.method_trials else "fidelity"
        methods = f"; calibration methods ({figure}): {tried}" if tried else " (dynamic int8: MatMul/Gemm kept fp32)"
        lines.append(f"guard        {trials} of at most {result.max_trials} trials{methods}")
        for trial in result.exclusion_trials:
            share = f" ({format_percent(trial.cost / result.model_macs)} of the MACs)" if result.model_macs else ""
            lines.append(
                f"             top {trial.blocks} block(s), {trial.nodes} node(s) fp32{share}: "
                f"{trial.check.score_label}{' (meets)' if trial.check.met else ''}"
            )
    if result.fp32_nodes:
        rows = [(n.name, n.op_type, "-" if n.error is None else f"{n.error:.3g}", n.reason) for n in result.fp32_nodes[:20]]
        share = f", {format_percent(result.fp32_macs / result.model_macs)} of the MACs" if result.model_macs and result.fp32_macs is not None else ""
        lines += ["", f"kept in fp32 ({len(result.fp32_nodes)} node(s){share}; error: 1 - fidelity with int8 at that place alone)",
                  format_table(["node", "op", "error", "why"], rows)]
        if len(result.fp32_nodes) > 20:
            lines.append(f"  ... and {len(result.fp32_nodes) - 20} more (--json lists all)")
    return lines

def _render_placement(result: QuantizeResult) -> list[str]:
    """The placement chosen and why, what onnxruntime runs in int8 here, the placements as timed."""
    placement = result.placement
    if placement is None:
        return []
    lines = [f"placement    {placement.chosen} ({placement.int8_nodes} node(s) may be int8): {placement.reason}"]
    for fate, counts in placement.fates.items():
        ops = ", ".join(f"{op} {count}" for op, count in counts.items())
        lines.append(f"             onnxruntime here, every node quantized: {fate}: {ops}")
    for timing in placement.timings:
        if timing.speedup is not None:
            spread = "" if timing.speedup_low is None else f" ({timing.speedup_low:.2f}-{timing.speedup_high:.2f})"
            retimed = " re-timed" if timing.retimed else ""
            lines.append(f"             timed {timing.config.label}: {timing.speedup:.2f}x{spread}{retimed}")
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
        "step_seconds": dict(result.step_seconds),
        "step_cpu_seconds": dict(result.step_cpu_seconds),
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
        "placement": None if result.placement is None else {
            **to_jsonable(result.placement),
            "timings": [{"config": t.config.label, "speedup": t.speedup, "speedup_low": t.speedup_low,
                         "speedup_high": t.speedup_high, "retimed": t.retimed, "error": t.error}
                        for t in result.placement.timings],
        },
        "measure": None if result.measure is None else {
            "gates": result.measure.gates, "alone": len(result.measure.alone), "runs": result.measure.runs,
            "samples": result.measure.samples, "seconds": result.measure.seconds, "whole": result.measure.whole,
            "resolution": result.measure.resolution, "complete": result.measure.complete,
            "hierarchical": result.measure.hierarchical,
        },
        "fp32_macs": result.fp32_macs,
        "model_macs": result.model_macs,
        "mode": None if result.mode is None else result.mode.chosen,
        "mode_choice": _mode_json(result),
    }
