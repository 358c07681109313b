"""`onnxslim quantize`."""

from __future__ import annotations

import logging
from contextlib import ExitStack

import click

from onnxslim.bench import physical_cores
from onnxslim.calib import DataOptions, open_dataset
from onnxslim.commands.options import (
    DATA_HELP,
    data_options,
    input_shapes_option,
    json_option,
    progress_bars,
    quiet_option,
)
from onnxslim.errors import UsageError
from onnxslim.evaluate import AccuracyBudget
from onnxslim.io import check_output_path, load_model, write_validated
from onnxslim.quant import (
    FORMATS,
    INT8_TYPES,
    METHODS,
    MIN_SPEEDUP,
    MODE_CHOICES,
    PLACEMENT_CHOICES,
    QuantConfig,
    QuantizeOptions,
    quantize_model,
)
from onnxslim.report.format import to_json
from onnxslim.report.quantize import quantize_json, render_quantize

logger = logging.getLogger("onnxslim")


@click.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str),
              help="Where to write the int8 model (or the fp32 model, when int8 is not faster).")
@click.option("--calib", "calib", metavar="DATA", default=None,
              help=DATA_HELP + " The last 20% of its batches are held out to measure fidelity unless --eval is given. "
              "Required unless --mode dynamic: dynamic int8 calibrates nothing, and all of --calib (or --eval) judges it.")
@click.option("--eval", "eval_data", metavar="DATA", default=None,
              help="Data to measure fidelity (and accuracy, with labels) on; then all of --calib calibrates.")
@click.option("--mode", type=click.Choice(MODE_CHOICES), default="auto", show_default=True,
              help="static: activation ranges calibrated on --calib; dynamic: onnxruntime's dynamic int8 (MatMul/Gemm "
              "weights int8 per channel, activations quantized at run time; residual Adds and LayerNorms stay float); "
              "auto: both measured side by side and the faster within the budget kept when MatMul/Gemm carry at "
              "least half the MACs (transformers), static otherwise (CNNs).")
@click.option("--format", "quant_format", type=click.Choice(FORMATS), default="qdq", show_default=True,
              help="qdq: QuantizeLinear/DequantizeLinear around float ops (portable; onnxruntime fuses them); "
              "qoperator: QLinearConv, QLinearMatMul ... ops.")
@click.option("--method", type=click.Choice(METHODS), default="tensor", show_default=True,
              help="How activation ranges are calibrated: tensor chooses each tensor's range (min-max, percentile or "
              "the clip of least squared error, judged after the activation that reads it) by the error it "
              "causes; minmax, entropy, percentile use one method for every tensor.")
@click.option("--per-channel/--per-tensor", default=True, show_default=True,
              help="Weight scales per output channel (needs opset 13: older models are upgraded, or fall back to "
              "per-tensor with a warning) or one per tensor.")
@click.option("--activations", type=click.Choice(INT8_TYPES), default="u8", show_default=True,
              help="Activation type. u8 is the fast path of onnxruntime on x86; s8 is onnxruntime's default.")
@click.option("--weights", type=click.Choice(INT8_TYPES), default="s8", show_default=True, help="Weight type.")
@click.option("--reduce-range/--no-reduce-range", default=None,
              help="7-bit weights: no u8 x s8 product can saturate on x86 CPUs without VNNI, and the results are "
              "the same on every CPU [default: on when this CPU has no VNNI/AMX or is unknown, off with VNNI].")
@click.option("--max-drop", type=click.FloatRange(0, 100), default=None, metavar="PT",
              help="Accuracy budget: top-1 may drop at most PT points against fp32 (needs labels).")
@click.option("--min-fidelity", type=click.FloatRange(-1, 1), default=None, metavar="COS",
              help="Accuracy budget: cosine against fp32 on held-out data, of every sample and of the worst output "
              "channel (top-1 agreement instead when the channels are classes), at least COS (no labels needed) "
              "[default when neither is given: 0.99].")
@click.option("--max-trials", type=click.IntRange(min=0), default=12, show_default=True,
              help="Trial quantizations the accuracy guard may run when the budget is missed (other calibration "
              "methods, then the most harmful nodes kept in fp32); 0 only checks the budget.")
@click.option("--placement", type=click.Choice(PLACEMENT_CHOICES), default="auto", show_default=True,
              help="Which nodes may be int8: compute (Conv, Gemm, MatMul that onnxruntime runs as int8 kernels "
              "on this machine, with the Relu/Clip folded into them), kernels (every node onnxruntime runs in "
              "int8 here), all (every node onnxruntime's quantizer handles); auto: compute, or kernels when "
              "measured clearly faster and within the budget.")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Keep nodes in fp32: a node-name glob ('head.*') or an op type (Softmax). Repeat for several.")
@input_shapes_option
@data_options
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help=f"Intra-op threads for timing [default: the physical cores available, {physical_cores()} here].")
@click.option("--calib-memory", "calib_memory_mb", type=click.IntRange(min=1), default=256, show_default=True,
              help="MiB of intermediate outputs calibration may hold at once. Memory stays within this (or one "
              "batch's intermediate outputs, if larger) whatever the number of samples, for every --method.")
@click.option("--force", is_flag=True,
              help=f"Write an int8 model even when none is at least {MIN_SPEEDUP:.2f}x as fast as fp32 or none meets "
              "the budget: the fastest of the variants that meet the budget, else the one closest to fp32 of those "
              "clearly faster than fp32 (of all measured, when none is).")
@json_option
@quiet_option
@click.pass_context
def quantize(
    ctx: click.Context, model: str, output: str, calib: str | None, eval_data: str | None, mode: str,
    quant_format: str, method: str,
    per_channel: bool, activations: str, weights: str, reduce_range: bool | None, max_drop: float | None,
    min_fidelity: float | None, max_trials: int, placement: str, exclude: tuple[str, ...],
    input_shapes: tuple[str, ...], data_options: DataOptions, threads: int | None, calib_memory_mb: int,
    force: bool, as_json: bool,
) -> None:
    """Quantize MODEL to int8 (onnxruntime static or dynamic quantization, --mode) and keep it only if faster.

    --mode auto (the default) measures static and dynamic int8 side by side on models whose MatMul/Gemm
    carry most of the MACs (transformers) and keeps the faster of those within the budget (the more faithful
    when they are as fast); elsewhere it is static, calibrated on --calib. Dynamic int8 needs no calibration:
    with --mode dynamic, all of --calib (or --eval) judges the accuracy budget.

    Only the nodes int8 pays for are quantized (--placement): the compute ops onnxruntime runs as int8
    kernels on this machine, every int8 kernel only when measured clearly faster. The int8 model is timed
    against the fp32 one on this machine (same threads, same batch, interleaved).
    If it is not at least 5% faster, other variants are tried in order (the other activation type, the
    other format, per-tensor weights, only compute ops quantized) and the fastest is kept; if none
    wins, the fp32 model is written to --output and the report says so ("quantized": false), unless
    --force. It must also meet an accuracy budget (--max-drop, --min-fidelity; default: cosine 0.99 of
    every sample and of the worst output channel): when it does not, the other calibration methods are
    tried, then the roundings that hurt most per MAC (measured on a few calibration samples, whole blocks
    first) are kept in fp32 with the nodes that touch them, within --max-trials. Fidelity and accuracy against fp32 are measured on data not used for calibration.
    Weights are 7-bit on CPUs without VNNI (see --reduce-range).
    Models that are already quantized are refused. Symbolic input dims are kept.
    """
    if calib is None and mode != "dynamic":
        raise UsageError(f"--mode {mode} needs --calib (static int8 calibrates its activation ranges on it)")
    if calib is None and eval_data is None:
        raise UsageError("--mode dynamic calibrates nothing, but the accuracy budget needs data to judge the int8 "
                         "model on: give --eval (or --calib)")
    check_output_path(output, sources=[model])
    loaded = load_model(model)
    evaluation = open_dataset(eval_data, loaded.model, data_options) if eval_data is not None else None
    calib_data = open_dataset(calib, loaded.model, data_options) if calib is not None else evaluation
    assert calib_data is not None
    options = QuantizeOptions(
        config=QuantConfig(format=quant_format, activations=activations, weights=weights, per_channel=per_channel,
                           reduce_range=reduce_range),
        method=method, exclude=exclude, force=force, threads=threads, calibration_memory=calib_memory_mb * 2**20,
        budget=AccuracyBudget(max_drop=max_drop, min_fidelity=min_fidelity), max_trials=max_trials,
        placement=placement, mode=mode,
    )
    with ExitStack() as stack:
        result = quantize_model(
            loaded, calib_data, options, eval_data=evaluation,
            progress=None if ctx.obj.get("quiet") else progress_bars(stack),
        )
    feeds = next(iter(calib_data.batches())).feeds  # validate on the user's data, not random inputs
    write_validated(
        result.model, output, source=model, input_shapes=calib_data.input_shapes, feeds=feeds,
        validated=result.validation,
    )
    if not result.quantized:
        logger.warning("%s; wrote the fp32 model to %s", result.reason, output)
    click.echo(to_json(quantize_json(result, output)) if as_json else render_quantize(result, output))
