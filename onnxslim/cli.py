"""The `onnxslim` command line: parse options, call the library, render the result. Nothing else lives here.

Conventions (docs/ARCHITECTURE.md): results go to stdout (a table, or one JSON object with --json);
progress, warnings and logs go to stderr. Exit codes: 0 done; 1 unreadable/invalid/unsupported model or
data; 2 usage error; 4 onnxslim produced something that failed its own validation (a bug; nothing is
written).

This module is the group only. Each command lives in `onnxslim/commands/<name>.py` and is imported when it
runs (or its --help is asked for): `COMMANDS` names the module and the one-line summary `onnxslim --help`
lists, so that `onnxslim --help` loads neither onnx nor onnxruntime and `onnxslim inspect` loads no
quantizer. What the commands share is in `commands/options.py`.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import click

from onnxslim import __version__
from onnxslim.commands.options import configure_logging
from onnxslim.errors import OnnxSlimError

logger = logging.getLogger("onnxslim")

# command -> (module that defines it, the line `onnxslim --help` shows for it)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("onnxslim.commands.inspect", "What is in a model: ops, weights, params, MACs, channel groups."),
    "prune": ("onnxslim.commands.prune", "Remove channels, refit the layers that read them, validate."),
    "quantize": ("onnxslim.commands.quantize", "int8 with onnxruntime, kept only if it is faster and accurate."),
    "optimize": ("onnxslim.commands.optimize", "The fastest model that keeps the accuracy: prune, int8, proof."),
    "sweep": ("onnxslim.commands.optimize", "Pruned (and int8) at several MAC fractions, measured together."),
    "sensitivity": ("onnxslim.commands.sensitivity", "How much each channel group's pruning costs, group by group."),
    "bench": ("onnxslim.commands.bench", "Latency, size, MACs, memory and accuracy of models side by side."),
}


class _OnnxSlimGroup(click.Group):
    """Loads a command's module when it is used; turns library errors into a message and the documented exit
    code, with tracebacks only under --verbose."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, _ = COMMANDS[cmd_name]
        command = getattr(importlib.import_module(module), cmd_name)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, summary) in sorted(COMMANDS.items())])

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
    configure_logging(verbose, quiet)
    ctx.ensure_object(dict)
    ctx.obj.update(verbose=verbose, quiet=quiet, seed=seed)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="onnxslim")


if __name__ == "__main__":
    main()
