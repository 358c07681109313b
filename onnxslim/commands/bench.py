"""`onnxslim bench`."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from typing import Any

import click

from onnxslim.bench import OPT_LEVELS, BenchOptions, benchmark, physical_cores
from onnxslim.calib import DataOptions
from onnxslim.commands.options import DATA_HELP, data_options, input_shapes_option, json_option, quiet_option
from onnxslim.io import check_output_path, save_text
from onnxslim.report.bench import bench_json, render_bench
from onnxslim.report.format import to_json


@click.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=True, path_type=str))
@click.option("--data", "data", metavar="DATA", default=None, help=DATA_HELP + " [default: random inputs]")
@input_shapes_option
@data_options
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help=f"Intra-op threads per session [default: the physical cores available, {physical_cores()} here].")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Untimed runs per model first.")
@click.option("--repeat", type=click.IntRange(min=1), default=100, show_default=True, help="Timed runs per model.")
@click.option("--provider", default="CPUExecutionProvider", show_default=True, help="onnxruntime execution provider.")
@click.option("--opt-level", type=click.Choice(OPT_LEVELS), default="all", show_default=True,
              help="onnxruntime graph optimization level.")
@click.option("--output", "output_name", metavar="NAME", default=None,
              help="The output fidelity and accuracy read [default: the first model's first output].")
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="Measure peak memory, in a separate process per model.")
@click.option("--profile", is_flag=True,
              help="Also show where each model's time goes: kernel time by op type from onnxruntime's profiler, "
                   "after its fusions (fused and layout ops appear under their own names).")
@click.option("--profile-runs", type=click.IntRange(min=1), default=20, show_default=True,
              help="Runs per model under the profiler.")
@json_option
@quiet_option
@click.option("--markdown", "markdown_path", metavar="FILE", type=click.Path(dir_okay=False, path_type=str),
              default=None, help="Also write the table as Markdown to FILE.")
@click.pass_context
def bench(
    ctx: click.Context, models: tuple[str, ...], data: str | None, input_shapes: tuple[str, ...],
    data_options: DataOptions, threads: int | None, warmup: int, repeat: int, provider: str, opt_level: str,
    output_name: str | None, memory: bool, profile: bool, profile_runs: int, as_json: bool, markdown_path: str | None,
) -> None:
    """Benchmark MODELS side by side; the first is the reference.

    Per model: latency percentiles (models interleaved run by run), speedup against the first (ratio of
    p50s from the same run), throughput, size, params, MACs, fidelity against the first, accuracy when the
    data has labels, and peak memory. Without --data, inputs are random. With --profile, a table of where
    each model's time goes by op type (why an int8 or pruned model is not faster shows there).
    """
    if markdown_path is not None:
        check_output_path(markdown_path, sources=models)
    options = BenchOptions(
        threads=threads, warmup=warmup, repeat=repeat, provider=provider, opt_level=opt_level, output=output_name,
        memory=memory, profile_runs=profile_runs if profile else 0,
    )
    with ExitStack() as stack:
        bars: list[Any] = []

        def advance(steps: int) -> None:
            if not bars:
                bars.append(stack.enter_context(click.progressbar(length=repeat, label="timing", file=sys.stderr)))
            bars[0].update(steps)

        result = benchmark(
            models, data=data, data_options=data_options, options=options,
            progress=None if ctx.obj.get("quiet") else advance,
        )
    click.echo(to_json(bench_json(result)) if as_json else render_bench(result))
    if markdown_path is not None:
        save_text(render_bench(result, markdown=True) + "\n", markdown_path, sources=models)
