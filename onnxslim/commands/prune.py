"""`onnxslim prune`."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

import click

from onnxslim.calib import DataOptions, open_dataset
from onnxslim.commands.options import (
    DATA_HELP,
    data_options,
    fix_shapes_option,
    input_shapes_option,
    json_option,
    progress_bars,
    quiet_option,
)
from onnxslim.io import (
    check_output_path,
    fix_input_shapes,
    load_model,
    parse_input_shapes,
    staged_outputs,
    write_validated,
)
from onnxslim.prune import CRITERIA, RECOVERY_METHODS, PruneOptions, prune_model, save_plan
from onnxslim.prune.state import ALLOCATIONS
from onnxslim.report.format import to_json
from onnxslim.report.prune import plan_record, prune_json, render_prune

logger = logging.getLogger("onnxslim")


@click.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Where to write the pruned model.")
@click.option("--ratio", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Fraction of each prunable channel group's channels to remove (the lowest-scoring ones), the "
              "same in every group. Exclusive with --target-macs and --plan.")
@click.option("--target-macs", type=click.FloatRange(0, 1, min_open=True), default=None, metavar="F",
              help="Keep this fraction of the model's Conv/Gemm/MatMul MACs (e.g. 0.5): channels are ranked "
              "globally, each group's scores divided by the group's mean score so groups of any weight scale "
              "compete fairly; a budget that cannot be met is met as far as possible with a warning.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False, exists=True, path_type=str), default=None,
              metavar="PLAN.json", help="Apply exactly the channels removed in a plan saved by --plan-out (no "
              "scoring); refused if it was made for another model.")
@click.option("--plan-out", type=click.Path(dir_okay=False, path_type=str), default=None, metavar="PLAN.json",
              help="Write the channels removed per group, with the model's sha256, to reproduce this prune.")
@click.option("--criterion", type=click.Choice(sorted(CRITERIA)), default=None,
              help="How channels are scored [default: activation with --calib, else l1]. activation: each "
              "consumer's weight norm for the channel times the channel's RMS on the calibration data (sees "
              "folded-BN biases and scales after the activation, which magnitude cannot); fluctuation: the same "
              "with the channel's variance (FLAP); l1 or l2: norm of each source's output-channel weights; bn: "
              "|gamma| of the following BatchNormalization (PyTorch eval exports fold BN: then use l1); random: a "
              "baseline, seeded by --seed. activation and fluctuation need --calib.")
@click.option("--round-to", type=click.IntRange(min=1), default=8, show_default=True,
              help="Round each group's channels kept (each Concat segment's) up to a multiple of this. CPU kernels "
              "run best on multiples of 8: in benchmarks/prune_budget.py unrounded channel counts made pruned "
              "models up to 1.6x slower than rounded ones at the same MACs (sometimes slower than the original). "
              "1 disables rounding.")
@click.option("--min-keep", type=click.IntRange(min=1), default=1, show_default=True,
              help="Channels every group (and every Concat segment) keeps at least.")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Leave alone the groups created by nodes whose name matches this glob, or of this op type "
              "(repeat for several: --exclude 'head.*' --exclude Gemm).")
@click.option("--protect-first/--no-protect-first", default=True, show_default=True,
              help="Leave alone the group created by the first layer (on by default: the most sensitive).")
@click.option("--protect-last/--no-protect-last", default=True, show_default=True,
              help="Leave alone the groups feeding the last classifier or head layers (on by default).")
@click.option("--lossless", is_flag=True,
              help="Remove dead channels (provably zero at every consumer, e.g. zero filter and bias then Relu) "
              "with no change to the outputs, and constant channels where folding them into the consumers' bias "
              "is exact (Gemm, unpadded Conv); alone, or first, with --ratio/--target-macs taking the rest.")
@click.option("--calib", "calib", metavar="DATA", default=None,
              help=DATA_HELP + " Calibration data (a few hundred samples): scores channels (--criterion activation), "
              "refits the layers that read pruned channels (--recover), and measures the result on every fifth "
              "sample, held out of the refit, unless --eval is given.")
@click.option("--eval", "eval_data", metavar="DATA", default=None,
              help="Data to measure the pruned model against the original on (cosine per output; top-1 with labels).")
@click.option("--recover", type=click.Choice(RECOVERY_METHODS), default=None,
              help="How the layers that read pruned channels are corrected, without retraining [default: lsq with "
              "--calib, else none]. lsq: ridge least-squares refit of their kept weights and bias, layer by layer "
              "in order, to reproduce the original's outputs from the pruned model's inputs; affine: match each "
              "output channel's mean and variance; bias: move the lost mean into the bias; none: the model as "
              "sliced (equal to the original with the channels zeroed). A layer whose refit does worse on held-out "
              "samples than leaving it falls back to bias (or stays as sliced, when that is better still).")
@click.option("--recover-memory", type=click.IntRange(min=16), default=1024, show_default=True, metavar="MiB",
              help="Activations recovery holds in memory while it passes them forward; the rest goes to temporary "
              "files (memory then stays near this plus one layer's problem, whatever the number of samples).")
@click.option("--allocate", type=click.Choice(ALLOCATIONS), default="global", show_default=True,
              help="How --target-macs is spread over the groups. global: one threshold on the normalized scores "
              "of every channel. sensitivity: prune each eligible group alone at 25/50/75% (with the same "
              "criterion and recovery, see `onnxslim sensitivity`), then cut where the measured damage per MAC "
              "saved is least. Needs --calib; slower (a trial per group and ratio). On the MNIST models it did "
              "not beat global (README).")
@click.option("--ridge", type=click.FloatRange(min=0), default=PruneOptions.ridge, show_default=True,
              help="lsq: penalty on each input weight, times that input's energy, pulling toward the original weight.")
@click.option("--positions-per-weight", type=click.IntRange(min=1), default=PruneOptions.positions_per_weight,
              show_default=True, help="lsq: rows (sampled output positions) per input weight of each refit layer.")
@input_shapes_option
@data_options
@fix_shapes_option
@json_option
@quiet_option
@click.pass_context
def prune(
    ctx: click.Context,
    model: str,
    output: str,
    ratio: float | None,
    target_macs: float | None,
    plan_path: str | None,
    plan_out: str | None,
    criterion: str,
    round_to: int,
    min_keep: int,
    exclude: tuple[str, ...],
    protect_first: bool,
    protect_last: bool,
    lossless: bool,
    calib: str | None,
    eval_data: str | None,
    recover: str | None,
    allocate: str,
    recover_memory: int,
    ridge: float,
    positions_per_weight: int,
    input_shapes: tuple[str, ...],
    data_options: DataOptions,
    fix_shapes: bool,
    as_json: bool,
) -> None:
    """Remove channels from MODEL: a uniform --ratio, a --target-macs budget, a saved --plan, or --lossless.

    Channels are physically removed from every layer that creates, follows or consumes them. With --calib,
    channels are chosen by how much the model uses them and the layers that read them are refit to make up
    for them (--recover lsq), and the pruned model is measured against the original on held-out data.
    The result is validated (checker, onnxruntime run, same inputs and outputs) before it is written to
    --output. Groups that cannot be pruned are listed with the node that blocks them.
    """
    if plan_path is not None:
        ignored = [
            f"--{name.replace('_', '-')}"
            for name in ("criterion", "round_to", "min_keep", "exclude", "protect_first", "protect_last", "lossless")
            if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        ]
        if ignored:
            raise click.UsageError(f"--plan applies exactly the channels it lists; {', '.join(ignored)} would have no effect")
    check_output_path(output, sources=[model])
    if plan_out is not None:
        if Path(plan_out).resolve() == Path(output).resolve():
            raise click.UsageError("--plan-out and --output name the same file")
        check_output_path(plan_out, sources=[model])
    if criterion is None:
        criterion = "activation" if calib is not None else "l1"
    options = PruneOptions(
        ratio=ratio,
        target_macs=target_macs,
        criterion=criterion,
        round_to=round_to,
        min_keep=min_keep,
        exclude=exclude,
        protect_first=protect_first,
        protect_last=protect_last,
        seed=ctx.obj["seed"],
        lossless=lossless,
        plan_path=plan_path,
        recover=recover,
        ridge=ridge,
        positions_per_weight=positions_per_weight,
        allocate=allocate,
        recover_memory=recover_memory << 20,
    )
    options.check_data(calib is not None, eval_data is not None)  # before loading anything
    if calib is None and plan_path is None and (ratio is not None or target_macs is not None):
        logger.warning(
            "pruning without --calib: channels are chosen by weight magnitude and nothing is recovered, which "
            "usually costs most of a trained model's accuracy; give --calib DATA (a few hundred samples)"
        )
    loaded = load_model(model)
    calib_data = open_dataset(calib, loaded.model, data_options) if calib is not None else None
    evaluation = open_dataset(eval_data, loaded.model, data_options) if eval_data is not None else None
    with ExitStack() as stack:
        result = prune_model(
            loaded, options, input_shapes=parse_input_shapes(input_shapes), calib=calib_data, eval_data=evaluation,
            progress=None if ctx.obj.get("quiet") else progress_bars(stack),
        )
    pruned = fix_input_shapes(result.model, result.analysis_shapes) if fix_shapes else result.model
    with staged_outputs() as stage:  # the model and its plan are written together or not at all
        feeds = next(iter(calib_data.batches())).feeds if calib_data is not None and not fix_shapes else None
        write_validated(
            pruned, output, source=model, input_shapes=result.analysis_shapes, stage=stage, feeds=feeds,
            validated=result.validation,
        )
        if plan_out is not None:
            save_plan(plan_out, result.plan, result.groups, result.model_sha256, plan_record(result), stage)
    if result.evaluation is not None and result.evaluation.collapsed:  # on stderr, whatever stdout carries
        logger.warning(
            "the pruned model no longer works (cosine or top-1 agreement under 0.9, or 10 points of top-1 lost): "
            "prune less (a higher --target-macs), exclude sensitive layers (onnxslim sensitivity shows which), or "
            "give more calibration data"
        )
    verbose = ctx.obj["verbose"]
    click.echo(to_json(prune_json(result, output, plan_out)) if as_json else render_prune(result, output, verbose=verbose))
