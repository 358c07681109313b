"""`onnxslim inspect`."""

from __future__ import annotations

from contextlib import ExitStack

import click

from onnxslim.calib import DataOptions
from onnxslim.commands.options import (
    DATA_HELP,
    data_options,
    input_shapes_option,
    json_option,
    progress_bars,
    quiet_option,
)
from onnxslim.io import parse_input_shapes
from onnxslim.model_info import inspect_model
from onnxslim.report.format import to_json
from onnxslim.report.inspect import inspect_json, render_inspect


@click.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@input_shapes_option
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True,
              help="How many layers to list by MACs (and, with --data, tensors by range).")
@click.option("--data", "data", metavar="DATA", default=None,
              help=DATA_HELP + " With it, every float tensor's range, mean, spread, share of zeros and NaN/inf "
              "count on this data, and the tensors int8 will find hardest (widest range for their spread).")
@data_options
@json_option
@quiet_option
@click.pass_context
def inspect(
    ctx: click.Context, model: str, input_shapes: tuple[str, ...], top: int, data: str | None,
    data_options: DataOptions, as_json: bool,
) -> None:
    """Show what is in MODEL: inputs/outputs, opsets, ops, where weights live, params and MACs per layer."""
    with ExitStack() as stack:
        info = inspect_model(
            model, parse_input_shapes(input_shapes), data=data, data_options=data_options,
            progress=None if ctx.obj.get("quiet") or data is None else progress_bars(stack),
        )
    verbose = ctx.obj["verbose"]
    click.echo(to_json(inspect_json(info)) if as_json else render_inspect(info, top=top, verbose=verbose))
