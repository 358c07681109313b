"""`onnxslim sensitivity`."""

from __future__ import annotations

from contextlib import ExitStack

import click

from onnxslim.calib import DataOptions, open_dataset
from onnxslim.commands.options import (
    DATA_HELP,
    data_options,
    fraction_list,
    input_shapes_option,
    json_option,
    progress_bars,
    quiet_option,
)
from onnxslim.io import check_output_path, load_model, parse_input_shapes
from onnxslim.prune import CRITERIA, DEFAULT_RATIOS, RECOVERY_METHODS, PruneOptions, measure_sensitivity
from onnxslim.report.format import require_plotting, to_json
from onnxslim.report.sensitivity import plot_sensitivity, render_sensitivity, sensitivity_json


@click.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option("--calib", "calib", metavar="DATA", required=True,
              help=DATA_HELP + " Scores channels, refits each trial's readers, and (every fifth sample, unless "
              "--eval is given) measures the damage.")
@click.option("--eval", "eval_data", metavar="DATA", default=None,
              help="Data to measure the damage on (cosine of every output; top-1 with labels); at most 256 samples are used.")
@click.option("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_RATIOS), show_default=True, callback=fraction_list(one=False, example="0.1,0.3,0.5"),
              help="Fractions of each group's channels to remove, each tried alone.")
@click.option("--criterion", type=click.Choice(sorted(CRITERIA)), default="activation", show_default=True,
              help="Which channels go (as in prune).")
@click.option("--recover", type=click.Choice(RECOVERY_METHODS), default="lsq", show_default=True,
              help="How each trial's readers are refit (as in prune); measure the way you will prune.")
@click.option("--max-samples", type=click.IntRange(min=1), default=None, metavar="N",
              help="Use at most N calibration samples (trials refit on at most 128 of them).")
@click.option("--top", type=click.IntRange(min=1), default=None, help="Show only the N most sensitive groups.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=str), default=None, metavar="FILE.png",
              help="Also draw the curves of the 12 most sensitive groups (needs the plot extra: matplotlib).")
@input_shapes_option
@data_options
@json_option
@quiet_option
@click.pass_context
def sensitivity(
    ctx: click.Context, model: str, calib: str, eval_data: str | None, ratios: tuple[float, ...], criterion: str,
    recover: str, max_samples: int | None, top: int | None, plot_path: str | None, input_shapes: tuple[str, ...],
    data_options: DataOptions, as_json: bool,
) -> None:
    """Which channel groups of MODEL are fragile: each prunable group pruned alone at each of --ratios.

    Every trial prunes one group with the chosen criterion, refits the layers that read it (--recover), and
    measures the damage on held-out data: the worst output's cosine against the original, and top-1 when the
    data has labels. One analysis and one statistics pass serve all trials. Groups are listed from most to
    least sensitive, with the MACs of the layers that make or read them.
    """
    if plot_path is not None:
        require_plotting()
        check_output_path(plot_path, sources=[model])
    loaded = load_model(model)
    calib_data = open_dataset(calib, loaded.model, data_options)
    evaluation = open_dataset(eval_data, loaded.model, data_options) if eval_data is not None else None
    options = PruneOptions(ratio=0.0, criterion=criterion, recover=recover, seed=ctx.obj["seed"])
    with ExitStack() as stack:
        curves = measure_sensitivity(
            loaded, options, calib=calib_data, eval_data=evaluation, ratios=ratios,
            input_shapes=parse_input_shapes(input_shapes), max_samples=max_samples,
            progress=None if ctx.obj.get("quiet") else progress_bars(stack),
        )
    if plot_path is not None:
        plot_sensitivity(curves, plot_path)
    click.echo(to_json(sensitivity_json(curves)) if as_json else render_sensitivity(curves, top=top))
