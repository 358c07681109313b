"""`onnxslim optimize` and `onnxslim sweep`: the side-by-side table, the trials, the plots; and the folder an
optimize run leaves (`write_outputs`: the models validated, the plan and these reports, together or none)."""

from __future__ import annotations

import io
import os
import platform
from dataclasses import replace
from pathlib import Path
from typing import Any

from onnxslim.bench import ModelBench
from onnxslim.errors import UsageError
from onnxslim.evaluate import DROP_CONFIDENCE
from onnxslim.io import check_output_path, staged_outputs, write_validated
from onnxslim.optimizer.config import OptimizeResult, SweepResult
from onnxslim.ortformat import OrtFormat
from onnxslim.prune import save_plan
from onnxslim.report.format import (
    format_bytes,
    format_count,
    format_percent,
    format_table,
    require_plotting,
    to_json,
    to_jsonable,
)
from onnxslim.report.prune import plan_record

__all__ = ["OUTPUT_FILES", "check_outdir", "write_outputs", "machine", "render_optimize", "optimize_json", "plot_optimize", "render_sweep", "sweep_json", "plot_sweep"]


def _quality(bench: ModelBench, check: Any) -> str:
    """Accuracy when there are labels, else the fidelity score the budget reads."""
    if bench.accuracy is not None:
        return format_percent(bench.accuracy.top1)
    if check is not None:
        return str(check.score_label)
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

def _score(name: str, score: float | None, samples: int | None) -> str:
    """A trial's score: shares of strings to 3 places with the samples they count, cosines to 4."""
    if score is None:
        return name
    if name == "strings unchanged":
        return f"{name} {score:.3f}" + ("" if samples is None else f" (n={samples})")
    return f"{name} {score:.4f}"

def _trial_rows(result: OptimizeResult) -> list[list[str]]:
    rows = []
    for number, trial in enumerate(result.trials, start=1):
        drop = f", top-1 -{trial.pruned_drop:.2f} pt" if trial.pruned_drop is not None else ""
        final = "-"
        if trial.final_met is not None:
            final_drop = f", top-1 -{trial.final_drop:.2f} pt" if trial.final_drop is not None else ""
            int8 = (f"int8 {trial.mode}" if trial.mode else "int8") if trial.quantized else "fp32 kept"
            final = f"{int8}: {_score(trial.score_name, trial.final_score, trial.samples)}{final_drop} ({'meets' if trial.final_met else 'misses'})"
        verdict = "passes" if trial.pruned_met else "fails"
        pruned = f"{_score(trial.score_name, trial.pruned_score, trial.samples)}{drop} ({verdict}{' the whole budget' if trial.whole_budget else ''})"
        if trial.same_as is not None:
            pruned = f"the plan of trial {trial.same_as}: not pruned again"
        rows.append([
            str(number), f"{trial.target_macs:.3f}", f"{trial.macs_kept:.3f}", pruned, final,
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
        f"budget: {result.budget.label} on {result.data}; {'met' if result.budget_met else 'NOT met'}"
        + (f" (a top-1 drop counts as met when its {DROP_CONFIDENCE:.0%} upper bound is within it)"
           if result.budget.max_drop is not None else ""),
        f"search: {result.search}",
        "",
        h("Before and after (one interleaved run)"),
        "",
        format_table(_OPTIMIZE_HEADERS, _optimize_rows(result), markdown=markdown),
        "",
        f"latency of one run on a batch of the evaluation data, {result.threads} thread{'s' if result.threads != 1 else ''} "
        "(--threads: give the deployment's); speedup = p50 of the "
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
        if q.mode is not None:
            lines += ["", f"mode: {q.mode.chosen if q.quantized else 'none kept'} ({q.mode.reason})"]
        if q.fp32_nodes:
            rows = [[n.name, n.op_type, "-" if n.error is None else f"{n.error:.4f}", n.reason] for n in q.fp32_nodes[:20]]
            lines += ["", "nodes kept in fp32:", "", format_table(["node", "op", "error", "why"], rows, markdown=markdown)]
    lines += ["", h("Machine"), "", f"CPU: {machine()}; int8 defaults: {result.cpu.reason}"]
    for note in result.notes:
        lines.append(f"note: {note}")
    if result.command:
        lines += ["", h("Reproduce"), "", f"```sh\n{result.command}\n```" if markdown else result.command]
    if result.stage_seconds:
        stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.stage_seconds.items())
        lines += ["", f"time: {result.seconds:.1f} s in all: {stages}"]
    if outdir and not markdown:
        lines += ["", f"wrote {', '.join(result.files)} in {outdir} ({result.seconds:.0f} s)"]
    return "\n".join(lines)

def _check_json(check: Any) -> dict[str, Any] | None:
    if check is None:
        return None
    return {"met": check.met, "score": check.score, "score_name": check.score_name, "drop": check.drop,
            "drop_bound": check.drop_bound, "score_bound": check.score_bound, "samples": check.samples,
            "why": check.why or None}

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
            "mode": None if result.quantize.mode is None else result.quantize.mode.chosen,
            "mode_reason": None if result.quantize.mode is None else result.quantize.mode.reason,
            "fp32_nodes": [{"name": n.name, "op_type": n.op_type, "error": n.error, "reason": n.reason}
                           for n in result.quantize.fp32_nodes],
        },
        "cpu": {"machine": machine(), "reduce_range": result.cpu.reduce_range, "why": result.cpu.reason},
        "threads": result.threads,
        "seconds": result.seconds,
        "stage_seconds": dict(result.stage_seconds),
        "files": list(result.files),
        "command": result.command,
        "notes": list(result.notes),
    }

def plot_optimize(result: OptimizeResult) -> bytes | None:
    """report.png: accuracy or fidelity against latency of every measured model (None without matplotlib)."""
    import importlib.util

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
    return _png(figure)

def _png(figure: Any) -> bytes:
    """A finished latency/quality figure as PNG bytes (grid, tight layout), closed after."""
    import matplotlib.pyplot as plt

    figure.axes[0].grid(alpha=0.3)
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
        quality = format_percent(p.bench.accuracy.top1) if labelled and p.bench.accuracy is not None else (
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
    return _png(figure)


OUTPUT_FILES = (
    "optimized.onnx", "pruned.onnx", "plan.json", "report.md", "report.json", "report.png",
    "optimized.ort", "required_operators.config",
)
ORT_FILES = ("optimized.ort", "required_operators.config")  # with --format ort


def check_outdir(outdir: str | os.PathLike[str], source: str | os.PathLike[str], *, prune: bool) -> Path:
    """Make the output folder and check every file `optimize` may write there, before any work."""
    folder = Path(outdir)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file; the output of optimize is a folder")
    if not folder.exists():  # made when the outputs are written, so a failed run leaves nothing behind
        check_output_path(folder, sources=[source])  # its parent exists and can be written to
        return folder
    for name in OUTPUT_FILES:
        if prune or name not in ("pruned.onnx", "plan.json"):
            check_output_path(folder / name, sources=[source])
    return folder


def write_outputs(
    result: OptimizeResult, outdir: str | os.PathLike[str], *, source: str | os.PathLike[str],
    ort: OrtFormat | None = None,
) -> OptimizeResult:
    """Validate and write the models (optimized.onnx, pruned.onnx when pruning removed something), the plan and the reports
    into `outdir`, all together or none; with `ort` (`ortformat.to_ort_format` of the optimized model), also
    optimized.ort and required_operators.config. Returns the result with the files written."""
    assert result.model is not None, "write_outputs needs the result of optimize (its chosen model)"
    models = {"optimized.onnx": result.model}
    # a prune that removed nothing (no group could be cut) leaves no pruned model or plan worth a file
    pruned = result.prune if result.prune is not None and result.prune.macs_after < result.prune.macs_before else None
    if pruned is not None:
        models["pruned.onnx"] = pruned.model
    folder = Path(outdir)
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot make the output folder {folder}: {e.strerror or e}") from e
    shapes = dict(result.input_shapes)  # the data's: a model written as it came still validates at them
    files = list(models)
    with staged_outputs() as stage:
        for name, proto in models.items():
            write_validated(proto, folder / name, source=source, input_shapes=shapes, stage=stage)
        if pruned is not None:
            save_plan(folder / "plan.json", pruned.plan, pruned.groups, pruned.model_sha256, plan_record(pruned), stage)
            files.append("plan.json")
        if ort is not None:
            stage.add_bytes(ort.model, folder / "optimized.ort", sources=[source])
            stage.add_text(ort.required_operators, folder / "required_operators.config", sources=[source])
            files += list(ORT_FILES)
        files += ["report.md", "report.json"]
        picture = plot_optimize(result)
        if picture is not None:
            files.append("report.png")
        result = replace(result, files=tuple(files), outdir=str(folder))
        stage.add_text(render_optimize(result, markdown=True) + "\n", folder / "report.md", sources=[source])
        stage.add_text(to_json(optimize_json(result, str(folder))) + "\n", folder / "report.json", sources=[source])
        if picture is not None:
            stage.add_bytes(picture, folder / "report.png", sources=[source])
    for stale in set(OUTPUT_FILES) - set(files):  # an earlier run's outputs this one did not make
        (folder / stale).unlink(missing_ok=True)
    return result




def machine() -> str:
    """The CPU this ran on, for the report."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical cores"
