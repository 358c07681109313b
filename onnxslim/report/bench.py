"""`onnxslim bench`: latency, size, memory and accuracy side by side."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from onnxslim.bench import BenchResult, ModelBench, OpTime
from onnxslim.report.format import (
    format_bytes,
    format_count,
    format_fraction,
    format_ms,
    format_table,
    to_jsonable,
)

__all__ = ["render_bench", "bench_json"]


def _bench_row(model: ModelBench, *, labels: bool, strings: bool = False) -> list[str]:
    latency, fidelity = model.latency, model.fidelity
    row = [
        model.name,
        format_ms(latency.p50_ms),
        format_ms(latency.p90_ms),
        format_ms(latency.p99_ms),
        f"{format_ms(latency.mean_ms)}±{format_ms(latency.std_ms)}",
        format_ms(latency.min_ms),
        f"{model.speedup:.2f}x" + ("" if model.speedup_range is None else "  ({:.2f}-{:.2f})".format(*model.speedup_range)),
        f"{model.throughput:.1f}",
        format_bytes(model.size_bytes),
        format_count(model.params),
        format_count(model.macs),
        "ref" if fidelity is None else f"{fidelity.cosine:.6f}",
        "ref" if fidelity is None else f"{fidelity.max_abs:.3g}",
        "ref" if fidelity is None else format_fraction(fidelity.top1_agreement),
    ]
    if strings:  # a sequence output: the share of decoded strings unchanged, and how many samples it counts
        row.append("ref" if fidelity is None or fidelity.strings_unchanged is None
                   else f"{fidelity.strings_unchanged:.3f} (n={fidelity.samples})")
    if labels:
        row.append(format_fraction(model.accuracy.top1 if model.accuracy else None))
    row.append("n/a" if model.peak_memory_bytes is None else format_bytes(model.peak_memory_bytes))
    return row

def render_bench(result: BenchResult, *, markdown: bool = False) -> str:
    """The `bench` table with a line of settings above and the definitions below (terminal or Markdown)."""
    labels = any(m.accuracy is not None for m in result.models)
    headers = [
        "model", "p50 ms", "p90 ms", "p99 ms", "mean±std ms", "min ms", "speedup", "samples/s", "size",
        "params", "MACs", "cosine", "max abs", "top-1 agree",
    ]
    strings = any(m.fidelity is not None and m.fidelity.reads_strings for m in result.models)
    if strings:
        headers.append("strings unchanged")
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
    table = format_table(headers, [_bench_row(m, labels=labels, strings=strings) for m in result.models], markdown=markdown)
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
        return "-" if op is None else f"{format_ms(op.ms)} ms {100 * op.share:.0f}% ({op.kernels})"

    rows = [[op_type, *(cell(ops.get(op_type)) for ops in by_model)] for op_type in shown]
    if rest:
        rows.append([f"{len(rest)} other op types", *(f"{format_ms(sum(ops[op].ms for op in rest if op in ops))} ms" for ops in by_model)])
    rows.append(["kernel time", *(f"{format_ms(profile.kernel_ms)} ms" for _, profile in profiles)])
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
