"""`onnxslim optimize` and `onnxslim sweep`."""

from __future__ import annotations

import logging
import shlex
import sys
from contextlib import ExitStack

import click

from onnxslim.bench import physical_cores
from onnxslim.calib import DataOptions
from onnxslim.commands.options import (
    DATA_HELP,
    budget_options,
    data_options,
    fraction_list,
    input_shapes_option,
    json_option,
    progress_bars,
    quiet_option,
)
from onnxslim.io import check_output_path, parse_input_shapes, save_bytes
from onnxslim.optimizer import OptimizeOptions
from onnxslim.optimizer import optimize as run_optimize
from onnxslim.optimizer import sweep as run_sweep
from onnxslim.ortformat import to_ort_format
from onnxslim.prune.state import ALLOCATIONS
from onnxslim.quant.config import MODE_CHOICES
from onnxslim.report.format import require_plotting, to_json
from onnxslim.report.optimize import (
    check_outdir,
    optimize_json,
    plot_sweep,
    render_optimize,
    render_sweep,
    sweep_json,
    write_outputs,
)

logger = logging.getLogger("onnxslim")


@click.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False, path_type=str),
              metavar="OUTDIR", help="Folder for optimized.onnx, pruned.onnx, plan.json, report.md, report.json "
              "(and report.png with matplotlib); created if missing, earlier files of these names are replaced.")
@click.option("--calib", "calib", metavar="DATA", required=True,
              help=DATA_HELP + " A few hundred samples: pruning scores and recovery, int8 calibration.")
@click.option("--eval", "eval_data", metavar="DATA", default=None,
              help="Held-out data the budget is checked on and the models are timed with (else the last 20% of "
              "--calib's batches, which then do not calibrate int8).")
@budget_options
@click.option("--target-macs", type=click.FloatRange(0, 1, min_open=True), default=None, metavar="F",
              help="Prune to this fraction of the MACs (no search).")
@click.option("--target-speedup", type=click.FloatRange(1, min_open=True), default=None, metavar="S",
              help="Search the pruning level whose final model runs S times as fast as the original, measured here.")
@click.option("--no-prune", is_flag=True, help="Only int8.")
@click.option("--no-quantize", is_flag=True, help="Only pruning (and recovery).")
@click.option("--quant-mode", type=click.Choice(MODE_CHOICES), default="auto", show_default=True,
              help="quantize's --mode at every level: auto measures static and dynamic int8 side by side on models "
              "whose MatMul/Gemm carry most MACs (transformers) and keeps the faster within the budget.")
@click.option("--max-trials", type=click.IntRange(min=1), default=6, show_default=True,
              help="Pruning levels (and int8 attempts) the search may try.")
@click.option("--allocate", type=click.Choice(ALLOCATIONS), default="global", show_default=True,
              help="How each level's MAC budget is spread over the groups (as in prune). sensitivity measures every "
              "eligible group's damage once, before the search, and reuses it at every level.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads for every timing, int8's speed guard included: give the deployment's thread "
              f"count (1 for many edge boards) [default: the physical cores available, {physical_cores()} here].")
@click.option("--format", "output_format", type=click.Choice(["onnx", "ort"]), default="onnx", show_default=True,
              help="ort: also write optimized.ort (onnxruntime's format, graph optimizations fixed offline for this "
              "kind of CPU) and required_operators.config (for a reduced onnxruntime build with only its kernels).")
@input_shapes_option
@data_options
@json_option
@quiet_option
@click.pass_context
def optimize(
    ctx: click.Context, model: str, outdir: str, calib: str, eval_data: str | None, max_drop: float | None,
    min_fidelity: float | None, target_macs: float | None, target_speedup: float | None, no_prune: bool,
    no_quantize: bool, quant_mode: str, max_trials: int, allocate: str, threads: int | None, output_format: str,
    input_shapes: tuple[str, ...], data_options: DataOptions, as_json: bool,
) -> None:
    """The fastest model that keeps MODEL's accuracy, and the proof: prune, recover, int8, measure.

    With an accuracy budget (--max-drop, or --min-fidelity; default 0.5 point of top-1 with labels, cosine 0.99
    without) and no target, the most aggressive pruning whose final (pruned + int8) model still meets the
    budget on the evaluation data is searched by bisection, at most --max-trials levels. The original, pruned
    and int8 models are then timed side by side; the fastest one that meets the budget and beats the original
    is written as OUTDIR/optimized.onnx — or the original itself, with the reason, when none does.
    """
    options = OptimizeOptions(
        max_drop=max_drop, min_fidelity=min_fidelity, target_macs=target_macs, target_speedup=target_speedup,
        prune=not no_prune, quantize=not no_quantize, max_trials=max_trials, threads=threads, seed=ctx.obj["seed"],
        allocate=allocate, quant_mode=quant_mode,
    )
    command = "onnxslim " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    check_outdir(outdir, model, prune=options.prune)  # before any work: a run that cannot write fails at once
    with ExitStack() as stack:
        result = run_optimize(
            model, calib, options, eval_data=eval_data, data_options=data_options,
            input_shapes=parse_input_shapes(input_shapes), progress=None if ctx.obj.get("quiet") else progress_bars(stack),
            command=command,
        )
    ort = to_ort_format(result.model, "optimized") if output_format == "ort" and result.model is not None else None
    result = write_outputs(result, outdir, source=model, ort=ort)
    if result.chosen == "original":
        logger.warning("%s", result.reason)
    click.echo(to_json(optimize_json(result, outdir)) if as_json else render_optimize(result, outdir))

@click.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option("--calib", "calib", metavar="DATA", required=True, help=DATA_HELP)
@click.option("--eval", "eval_data", metavar="DATA", default=None,
              help="Held-out data to measure and time on (else the last 20% of --calib's batches).")
@click.option("--target-macs", "targets", default="1,0.9,0.75,0.5,0.3", show_default=True, callback=fraction_list(one=True, example="1,0.75,0.5"),
              help="The MAC fractions to prune to (1: the original, quantized with --quantize).")
@click.option("--quantize", is_flag=True, help="Also int8 at every point (each with the accuracy and speed guards).")
@budget_options
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads for timing.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=str), default=None, metavar="FILE.png",
              help="Also draw accuracy or fidelity against latency (needs matplotlib).")
@input_shapes_option
@data_options
@json_option
@quiet_option
@click.pass_context
def sweep(
    ctx: click.Context, model: str, calib: str, eval_data: str | None, targets: tuple[float, ...], quantize: bool,
    max_drop: float | None, min_fidelity: float | None, threads: int | None, plot_path: str | None,
    input_shapes: tuple[str, ...], data_options: DataOptions, as_json: bool,
) -> None:
    """The trade-off before choosing: MODEL pruned (with recovery) at every --target-macs, measured side by side.

    Per point: accuracy (with labels) or fidelity against the original, latency and speedup from one
    interleaved run, params and size; and whether it meets the budget (--max-drop / --min-fidelity).
    """
    if plot_path is not None:
        require_plotting()
        check_output_path(plot_path, sources=[model])
    options = OptimizeOptions(max_drop=max_drop, min_fidelity=min_fidelity, threads=threads, seed=ctx.obj["seed"])
    with ExitStack() as stack:
        result = run_sweep(
            model, calib, targets, eval_data=eval_data, quantize=quantize, options=options, data_options=data_options,
            input_shapes=parse_input_shapes(input_shapes), progress=None if ctx.obj.get("quiet") else progress_bars(stack),
        )
    if plot_path is not None:
        save_bytes(plot_sweep(result), plot_path, sources=[model])
    click.echo(to_json(sweep_json(result)) if as_json else render_sweep(result))
