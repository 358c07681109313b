"""The `onnxslim` command line: parse options, call the library, render the result. Nothing else lives here.

Conventions (DESIGN.md): results go to stdout (a table, or one JSON object with --json); progress, warnings
and logs go to stderr. Exit codes: 0 done; 1 unreadable/invalid/unsupported model or data; 2 usage error;
4 onnxslim produced something that failed its own validation (a bug; nothing is written).
"""

from __future__ import annotations

import functools
import logging
import shlex
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click

from onnxslim import __version__
from onnxslim.bench import OPT_LEVELS, BenchOptions, benchmark, physical_cores
from onnxslim.calib import DataOptions, ImageOptions, open_dataset
from onnxslim.errors import OnnxSlimError, UsageError
from onnxslim.evaluate import AccuracyBudget
from onnxslim.io import (
    check_output_path,
    fix_input_shapes,
    load_model,
    parse_input_shapes,
    save_bytes,
    save_text,
    staged_outputs,
    write_validated,
)
from onnxslim.model_info import inspect_model
from onnxslim.optimizer import OptimizeOptions
from onnxslim.optimizer import optimize as run_optimize
from onnxslim.optimizer import sweep as run_sweep
from onnxslim.prune import (
    CRITERIA,
    DEFAULT_RATIOS,
    RECOVERY_METHODS,
    PruneOptions,
    measure_sensitivity,
    prune_model,
    save_plan,
)
from onnxslim.prune.state import ALLOCATIONS
from onnxslim.quant import (
    FORMATS,
    INT8_TYPES,
    METHODS,
    MIN_SPEEDUP,
    QuantConfig,
    QuantizeOptions,
    quantize_model,
)
from onnxslim.report.bench import bench_json, render_bench
from onnxslim.report.format import require_plotting, to_json
from onnxslim.report.inspect import inspect_json, render_inspect
from onnxslim.report.optimize import (
    check_outdir,
    optimize_json,
    plot_sweep,
    render_optimize,
    render_sweep,
    sweep_json,
    write_outputs,
)
from onnxslim.report.prune import plan_record, prune_json, render_prune
from onnxslim.report.quantize import quantize_json, render_quantize
from onnxslim.report.sensitivity import plot_sensitivity, render_sensitivity, sensitivity_json

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
    if not verbose:
        # onnxruntime's C++ log warns on stderr about the user's own model (an output declared [1, -1] that
        # runs as [24, 1, 8210]), in colour, several times a run: errors only, unless --verbose
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    if quiet:  # its quantizer warns through the root logger
        logging.getLogger().setLevel(logging.ERROR)


def _quiet_after_the_command(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    """`onnxslim prune -q ...` means the same as `onnxslim -q prune ...`."""
    if value:
        ctx.ensure_object(dict)
        ctx.obj["quiet"] = True
        _configure_logging(bool(ctx.obj.get("verbose")), True)
    return value


def quiet_option(f: Any) -> Any:
    return click.option(
        "--quiet", "-q", is_flag=True, expose_value=False, callback=_quiet_after_the_command,
        help="Only errors on stderr (same as the group's -q).",
    )(f)


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


def fix_shapes_option(f: Any) -> Any:
    return click.option(
        "--fix-shapes", is_flag=True,
        help="Write the output model with its inputs fixed to the analysis shapes (see --input-shapes). "
        "By default symbolic dims stay symbolic.",
    )(f)


def json_option(f: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of a table.")(f)


@cli.command()
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


def _progress_bars(stack: ExitStack) -> Any:
    """A `progress(stage, done, total)` callback drawing one click progress bar per stage on stderr; when
    stderr is not a terminal (a log, a pipe), one line as each stage starts and as it ends instead, and one
    every 15 s in between."""
    if not sys.stderr.isatty():
        started: dict[str, float] = {}
        shown: dict[str, float] = {}

        def log(stage: str, done: int, total: int) -> None:
            now = time.perf_counter()
            if stage not in started or done < 1:
                started[stage] = shown[stage] = now
                click.echo(f"{stage} …", err=True)
            if done >= total:
                click.echo(f"{stage} done ({total}, {now - started.pop(stage):.1f} s)", err=True)
            elif now - shown[stage] >= 15:  # a long stage says where it is, every 15 s
                shown[stage] = now
                click.echo(f"{stage} {done}/{total} ({now - started[stage]:.0f} s)", err=True)

        return log
    bars: dict[str, Any] = {}

    def advance(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None or done < bar.pos:
            if bar is not None:
                bar.render_finish()
            bar = stack.enter_context(click.progressbar(length=total, label=f"{stage:<11}", file=sys.stderr))
            bars[stage] = bar
        bar.length = max(total, done)
        bar.update(done - bar.pos)

    return advance


DATA_HELP = (
    "Data: a .npz file (one array per input, keyed by input name; integer class ids under 'labels'), a .npy "
    "file (single-input models), a folder of such files, a folder of images (class sub-folders give labels), "
    "or random / random:N (seeded noise, for smoke tests only). Arrays have the input's rank with samples on "
    "the first axis (one rank short: one sample)."
)


def _float_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError as e:
        raise click.BadParameter(f"expected comma-separated numbers, e.g. 0.485,0.456,0.406, not {value!r}") from e


_DATA_OPTIONS = (
    click.option(
        "--batch", type=click.IntRange(min=1), default=None,
        help="Batch size where the model's batch dim is symbolic [default: 1]. A fixed batch dim is used as is "
        "(its last batch is padded; padded rows are ignored).",
    ),
    click.option(
        "--resize", type=click.Choice(["crop", "stretch"]), default="crop", show_default=True,
        help="Images: 'crop' resizes (bilinear) to cover size/crop-fraction, then center-crops to the input's "
        "size (from its static dims or --input-shapes); 'stretch' resizes straight to it.",
    ),
    click.option("--crop-fraction", type=click.FloatRange(0, 1, min_open=True), default=0.875, show_default=True,
                 help="Images: with --resize crop, the share of the resized image kept (224 -> resize to 256)."),
    click.option("--color", type=click.Choice(["rgb", "bgr"]), default="rgb", show_default=True,
                 help="Images: channel order for 3-channel inputs (1-channel inputs get grayscale)."),
    click.option("--scale", type=float, default=None,
                 help="Images: pixel multiplier before mean/std [default: 1/255 for float inputs, 1 for integer]."),
    click.option("--mean", callback=_float_list, metavar="M1,M2,...",
                 help="Images: per-channel mean subtracted after --scale, in the fed channel order [default: ImageNet "
                 "0.485,0.456,0.406 for 3-channel float inputs (reversed for bgr), else 0]."),
    click.option("--std", callback=_float_list, metavar="S1,S2,...",
                 help="Images: per-channel std divided by [default: ImageNet 0.229,0.224,0.225 for 3-channel float "
                 "inputs (reversed for bgr), else 1]. The dtype is always the model input's."),
    click.option("--layout", type=click.Choice(["auto", "NCHW", "NHWC"]), default="auto", show_default=True,
                 help="Images: the input's layout; auto takes the one whose channel axis is 1 or 3."),
)


def data_options(f: Any) -> Any:
    """Add the data options (batch size, image preprocessing) and pass them as one `data_options` argument.

    The data spec itself (--data, --calib, --eval) is each command's own option; --input-shapes, when the
    command has it, and the group's --seed go into the same DataOptions.
    """

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        image = ImageOptions(
            resize=kwargs.pop("resize"), crop_fraction=kwargs.pop("crop_fraction"), color=kwargs.pop("color"),
            scale=kwargs.pop("scale"), mean=kwargs.pop("mean"), std=kwargs.pop("std"), layout=kwargs.pop("layout"),
        )
        ctx = click.get_current_context()
        kwargs["data_options"] = DataOptions(
            input_shapes=parse_input_shapes(kwargs.get("input_shapes", ())),
            batch=kwargs.pop("batch"),
            image=image,
            seed=(ctx.obj or {}).get("seed", 0),
        )
        return f(*args, **kwargs)

    for option in reversed(_DATA_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


@cli.command()
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


@cli.command()
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
            progress=None if ctx.obj.get("quiet") else _progress_bars(stack),
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
    verbose = ctx.obj["verbose"]
    click.echo(to_json(prune_json(result, output, plan_out)) if as_json else render_prune(result, output, verbose=verbose))


def _fraction_list(*, one: bool, example: str) -> Any:
    """A click callback for a comma-separated list of fractions in (0, 1], or (0, 1) when not `one`;
    returned sorted and without repeats."""

    def parse(ctx: click.Context, param: click.Parameter, value: str) -> tuple[float, ...]:
        try:
            fractions = tuple(float(v) for v in value.split(","))
        except ValueError as e:
            raise click.BadParameter(f"expected comma-separated fractions, e.g. {example}, not {value!r}") from e
        if not fractions or any(not (0.0 < f <= 1.0 if one else 0.0 < f < 1.0) for f in fractions):
            bounds = "in (0, 1]" if one else "between 0 and 1 (exclusive)"
            raise click.BadParameter(f"every fraction must be {bounds}, not {value!r}")
        return tuple(sorted(set(fractions)))

    return parse


def _budget_options(f: Any) -> Any:
    f = click.option("--min-fidelity", type=click.FloatRange(-1, 1), default=None, metavar="C",
                     help="Budget: cosine of the output (mean and worst channel) against the original, at least C. "
                     "Default without labels: 0.99.")(f)
    return click.option("--max-drop", type=click.FloatRange(0, 100), default=None, metavar="X",
                        help="Budget: at most X points of top-1 lost against the original (needs labels). Default with "
                        "labels: 0.5. Given with --min-fidelity, both must hold.")(f)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False, path_type=str),
              metavar="OUTDIR", help="Folder for optimized.onnx, pruned.onnx, plan.json, report.md, report.json "
              "(and report.png with matplotlib); created if missing, earlier files of these names are replaced.")
@click.option("--calib", "calib", metavar="DATA", required=True,
              help=DATA_HELP + " A few hundred samples: pruning scores and recovery, int8 calibration.")
@click.option("--eval", "eval_data", metavar="DATA", default=None,
              help="Held-out data the budget is checked on and the models are timed with (else the last 20% of "
              "--calib's batches, which then do not calibrate int8).")
@_budget_options
@click.option("--target-macs", type=click.FloatRange(0, 1, min_open=True), default=None, metavar="F",
              help="Prune to this fraction of the MACs (no search).")
@click.option("--target-speedup", type=click.FloatRange(1, min_open=True), default=None, metavar="S",
              help="Search the pruning level whose final model runs S times as fast as the original, measured here.")
@click.option("--no-prune", is_flag=True, help="Only int8.")
@click.option("--no-quantize", is_flag=True, help="Only pruning (and recovery).")
@click.option("--max-trials", type=click.IntRange(min=1), default=6, show_default=True,
              help="Pruning levels (and int8 attempts) the search may try.")
@click.option("--allocate", type=click.Choice(ALLOCATIONS), default="global", show_default=True,
              help="How each level's MAC budget is spread over the groups (as in prune). sensitivity measures every "
              "eligible group's damage once, before the search, and reuses it at every level.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help=f"Intra-op threads for timing [default: the physical cores available, {physical_cores()} here].")
@input_shapes_option
@data_options
@json_option
@click.pass_context
def optimize(
    ctx: click.Context, model: str, outdir: str, calib: str, eval_data: str | None, max_drop: float | None,
    min_fidelity: float | None, target_macs: float | None, target_speedup: float | None, no_prune: bool,
    no_quantize: bool, max_trials: int, allocate: str, threads: int | None, input_shapes: tuple[str, ...],
    data_options: DataOptions, as_json: bool,
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
        allocate=allocate,
    )
    command = "onnxslim " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    check_outdir(outdir, model, prune=options.prune)  # before any work: a run that cannot write fails at once
    with ExitStack() as stack:
        result = run_optimize(
            model, calib, options, eval_data=eval_data, data_options=data_options,
            input_shapes=parse_input_shapes(input_shapes), progress=None if ctx.obj.get("quiet") else _progress_bars(stack),
            command=command,
        )
    result = write_outputs(result, outdir, source=model)
    if result.chosen == "original":
        logger.warning("%s", result.reason)
    click.echo(to_json(optimize_json(result, outdir)) if as_json else render_optimize(result, outdir))


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option("--calib", "calib", metavar="DATA", required=True, help=DATA_HELP)
@click.option("--eval", "eval_data", metavar="DATA", default=None,
              help="Held-out data to measure and time on (else the last 20% of --calib's batches).")
@click.option("--target-macs", "targets", default="1,0.9,0.75,0.5,0.3", show_default=True, callback=_fraction_list(one=True, example="1,0.75,0.5"),
              help="The MAC fractions to prune to (1: the original, quantized with --quantize).")
@click.option("--quantize", is_flag=True, help="Also int8 at every point (each with the accuracy and speed guards).")
@_budget_options
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads for timing.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=str), default=None, metavar="FILE.png",
              help="Also draw accuracy or fidelity against latency (needs matplotlib).")
@input_shapes_option
@data_options
@json_option
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
            input_shapes=parse_input_shapes(input_shapes), progress=None if ctx.obj.get("quiet") else _progress_bars(stack),
        )
    if plot_path is not None:
        save_bytes(plot_sweep(result), plot_path, sources=[model])
    click.echo(to_json(sweep_json(result)) if as_json else render_sweep(result))


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option("--calib", "calib", metavar="DATA", required=True,
              help=DATA_HELP + " Scores channels, refits each trial's readers, and (every fifth sample, unless "
              "--eval is given) measures the damage.")
@click.option("--eval", "eval_data", metavar="DATA", default=None,
              help="Data to measure the damage on (cosine of every output; top-1 with labels); at most 256 samples are used.")
@click.option("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_RATIOS), show_default=True, callback=_fraction_list(one=False, example="0.1,0.3,0.5"),
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
            progress=None if ctx.obj.get("quiet") else _progress_bars(stack),
        )
    if plot_path is not None:
        plot_sensitivity(curves, plot_path)
    click.echo(to_json(sensitivity_json(curves)) if as_json else render_sensitivity(curves, top=top))


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str),
              help="Where to write the int8 model (or the fp32 model, when int8 is not faster).")
@click.option("--calib", "calib", metavar="DATA", required=True,
              help=DATA_HELP + " The last 20% of its batches are held out to measure fidelity unless --eval is given.")
@click.option("--eval", "eval_data", metavar="DATA", default=None,
              help="Data to measure fidelity (and accuracy, with labels) on; then all of --calib calibrates.")
@click.option("--format", "quant_format", type=click.Choice(FORMATS), default="qdq", show_default=True,
              help="qdq: QuantizeLinear/DequantizeLinear around float ops (portable; onnxruntime fuses them); "
              "qoperator: QLinearConv, QLinearMatMul ... ops.")
@click.option("--method", type=click.Choice(METHODS), default="minmax", show_default=True,
              help="How activation ranges are calibrated.")
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
    ctx: click.Context, model: str, output: str, calib: str, eval_data: str | None, quant_format: str, method: str,
    per_channel: bool, activations: str, weights: str, reduce_range: bool | None, max_drop: float | None,
    min_fidelity: float | None, max_trials: int, exclude: tuple[str, ...],
    input_shapes: tuple[str, ...], data_options: DataOptions, threads: int | None, calib_memory_mb: int,
    force: bool, as_json: bool,
) -> None:
    """Quantize MODEL to int8 (onnxruntime static quantization), calibrated on --calib, and keep it only if faster.

    The int8 model is timed against the fp32 one on this machine (same threads, same batch, interleaved).
    If it is not at least 5% faster, other variants are tried in order (the other activation type, the
    other format, per-tensor weights, only Conv/Gemm/MatMul quantized) and the fastest is kept; if none
    wins, the fp32 model is written to --output and the report says so ("quantized": false), unless
    --force. It must also meet an accuracy budget (--max-drop, --min-fidelity; default: cosine 0.99 of
    every sample and of the worst output channel): when it does not, the other calibration methods are
    tried, then the roundings that hurt most (each measured alone on a few calibration samples) are kept
    in fp32 with the nodes that touch them, fewest first, within --max-trials. Fidelity and accuracy against fp32 are measured on data not used for calibration.
    Weights are 7-bit on CPUs without VNNI (see --reduce-range).
    Models that are already quantized are refused. Symbolic input dims are kept.
    """
    if Path(output).resolve() == Path(model).resolve():
        raise UsageError(f"refusing to overwrite the input model {model}; choose another output path")
    check_output_path(output, sources=[model])
    loaded = load_model(model)
    calib_data = open_dataset(calib, loaded.model, data_options)
    evaluation = open_dataset(eval_data, loaded.model, data_options) if eval_data is not None else None
    options = QuantizeOptions(
        config=QuantConfig(format=quant_format, activations=activations, weights=weights, per_channel=per_channel,
                           reduce_range=reduce_range),
        method=method, exclude=exclude, force=force, threads=threads, calibration_memory=calib_memory_mb * 2**20,
        budget=AccuracyBudget(max_drop=max_drop, min_fidelity=min_fidelity), max_trials=max_trials,
    )
    with ExitStack() as stack:
        result = quantize_model(
            loaded, calib_data, options, eval_data=evaluation,
            progress=None if ctx.obj.get("quiet") else _progress_bars(stack),
        )
    feeds = next(iter(calib_data.batches())).feeds  # validate on the user's data, not random inputs
    write_validated(
        result.model, output, source=model, input_shapes=calib_data.input_shapes, feeds=feeds,
        validated=result.validation,
    )
    if not result.quantized:
        logger.warning("%s; wrote the fp32 model to %s", result.reason, output)
    click.echo(to_json(quantize_json(result, output)) if as_json else render_quantize(result, output))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="onnxslim")


if __name__ == "__main__":
    main()
