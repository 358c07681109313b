"""What the commands share: the common options (input shapes, data and image preprocessing, --json, -q,
the accuracy budget, fraction lists), logging set-up, and the progress callback that draws on stderr.

Nothing heavy is imported here: the command line starts without loading onnx or onnxruntime, and each
command loads what it uses when it runs (`onnxslim.cli`).
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from contextlib import ExitStack
from typing import Any

import click

logger = logging.getLogger("onnxslim")

INPUT_SHAPES_HELP = (
    "Static shape of an input for analysis, as NAME:D1,D2,... (repeat per input; the name may be left out "
    "for a single-input model). Needed when a model input has symbolic dims other than the batch, which "
    "otherwise defaults to 1. The saved model keeps its symbolic dims."
)


def configure_logging(verbose: bool, quiet: bool) -> None:
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
        configure_logging(bool(ctx.obj.get("verbose")), True)
    return value


def quiet_option(f: Any) -> Any:
    return click.option(
        "--quiet", "-q", is_flag=True, expose_value=False, callback=_quiet_after_the_command,
        help="Only errors on stderr (same as the group's -q).",
    )(f)


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


def progress_bars(stack: ExitStack) -> Any:
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
        "--resize", type=click.Choice(["crop", "stretch", "pad"]), default="crop", show_default=True,
        help="Images: 'crop' resizes (bilinear) to cover size/crop-fraction, then center-crops to the input's "
        "size (from its static dims or --input-shapes); 'stretch' resizes straight to it; 'pad' (text lines of "
        "any width, for a recognizer) resizes to the input's height keeping the aspect ratio and fills the "
        "rest of the width with 0 after normalization.",
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
        from onnxslim.calib import DataOptions, ImageOptions
        from onnxslim.io import parse_input_shapes

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


def fraction_list(*, one: bool, example: str) -> Any:
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


def budget_options(f: Any) -> Any:
    f = click.option("--min-fidelity", type=click.FloatRange(-1, 1), default=None, metavar="C",
                     help="Budget: cosine of the output (mean and worst channel) against the original, at least C. "
                     "Default without labels: 0.99.")(f)
    return click.option("--max-drop", type=click.FloatRange(0, 100), default=None, metavar="X",
                        help="Budget: at most X points of top-1 lost against the original (needs labels). Default with "
                        "labels: 0.5. Given with --min-fidelity, both must hold.")(f)


