"""The `onnxslim` command line: parse options, call the library, render the result. Nothing else lives here.

Conventions (DESIGN.md): results go to stdout (a table, or one JSON object with --json); progress, warnings
and logs go to stderr. Exit codes: 0 done; 1 unreadable/invalid/unsupported model or data; 2 usage error;
4 onnxslim produced something that failed its own validation (a bug; nothing is written).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from onnxslim import __version__
from onnxslim.errors import OnnxSlimError
from onnxslim.io import parse_input_shapes
from onnxslim.model_info import inspect_model
from onnxslim.report import inspect_json, render_inspect, to_json

logger = logging.getLogger("onnxslim")

INPUT_SHAPES_HELP = (
    "Static shape of an input for analysis, as NAME:D1,D2,... (repeat per input; the name may be left out "
    "for a single-input model). Needed when a model input has symbolic dims other than the batch, which "
    "otherwise defaults to 1. The saved model keeps its symbolic dims."
)


class _OnnxSlimGroup(click.Group):
    """Turns library errors into a message and the documented exit code; tracebacks only with --verbose."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except OnnxSlimError as e:
            _report_failure(ctx, e)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as e:  # noqa: BLE001 - last resort: a bug in onnxslim must still not print a traceback
            _report_failure(ctx, e, bug=True)
            ctx.exit(4)


def _report_failure(ctx: click.Context, error: BaseException, *, bug: bool = False) -> None:
    verbose = bool(ctx.obj and ctx.obj.get("verbose"))
    if verbose:
        logger.exception("failed")
    if bug:
        click.echo(
            f"error: internal error ({type(error).__name__}: {error}). This is a bug in onnxslim; please report "
            "it with the command line (rerun with --verbose for the traceback).",
            err=True,
        )
    else:
        click.echo(f"error: {error}", err=True)


def _configure_logging(verbose: bool, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
    logger.propagate = False


@click.group(cls=_OnnxSlimGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="onnxslim")
@click.option("--verbose", "-v", is_flag=True, help="Log details and show tracebacks on failure.")
@click.option("--quiet", "-q", is_flag=True, help="Only errors on stderr; no progress bars or warnings.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for everything random (random inputs, random criteria).")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, quiet: bool, seed: int) -> None:
    """onnxslim: make an exported ONNX model smaller and faster on CPU, and prove it.

    Channel pruning with retraining-free recovery, static int8 quantization, and side-by-side
    latency, size, MACs and accuracy against the original. The input model is never modified.
    """
    _configure_logging(verbose, quiet)
    ctx.ensure_object(dict)
    ctx.obj.update(verbose=verbose, quiet=quiet, seed=seed)


def input_shapes_option(f: Any) -> Any:
    return click.option("--input-shapes", "input_shapes", multiple=True, metavar="NAME:D1,D2,...", help=INPUT_SHAPES_HELP)(f)


def json_option(f: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of a table.")(f)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@input_shapes_option
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True, help="How many layers to list by MACs.")
@json_option
def inspect(model: str, input_shapes: tuple[str, ...], top: int, as_json: bool) -> None:
    """Show what is in MODEL: inputs/outputs, opsets, ops, where weights live, params and MACs per layer."""
    info = inspect_model(model, parse_input_shapes(input_shapes))
    click.echo(to_json(inspect_json(info)) if as_json else render_inspect(info, top=top))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="onnxslim")


if __name__ == "__main__":
    main()
