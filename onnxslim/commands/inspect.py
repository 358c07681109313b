"""`onnxslim inspect`."""

from __future__ import annotations

import click

from onnxslim.commands.options import input_shapes_option, json_option, quiet_option
from onnxslim.io import parse_input_shapes
from onnxslim.model_info import inspect_model
from onnxslim.report.format import to_json
from onnxslim.report.inspect import inspect_json, render_inspect


@click.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@input_shapes_option
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True, help="How many layers to list by MACs.")
@json_option
@quiet_option
def inspect(model: str, input_shapes: tuple[str, ...], top: int, as_json: bool) -> None:
    """Show what is in MODEL: inputs/outputs, opsets, ops, where weights live, params and MACs per layer."""
    info = inspect_model(model, parse_input_shapes(input_shapes))
    verbose = click.get_current_context().obj["verbose"]
    click.echo(to_json(inspect_json(info)) if as_json else render_inspect(info, top=top, verbose=verbose))
