"""onnxruntime as onnxslim runs and times models: the one place for session settings and timing loops.

`bench`, `quantize`, `activations` and the prune pipeline all create their sessions with `session_options`
and time with `time_interleaved`, so a measurement means the same thing wherever it is taken; and they judge
a ratio of latencies with `block_speedups` / `speedup_range` and `clearly_faster`, so "faster" means the same
thing wherever it is decided.

**Faster, not within noise.** One interleaved run gives one ratio of medians (reference / candidate); on a
busy 2-core machine that ratio moves by several percent from run to run. The run is therefore also cut into
`SPEEDUP_BLOCKS` consecutive blocks, and the ratio of medians is taken on each: their lowest and highest are
the run's *speedup range*. A candidate is *clearly faster* when its ratio of medians reaches the bar asked for
(`min_speedup`) and it was faster in every block (lowest block ratio above 1) — a range containing 1 means
the difference is within this run's noise.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxslim.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "OPT_LEVELS",
    "SPEEDUP_BLOCKS",
    "block_speedups",
    "clearly_faster",
    "cpu_session",
    "open_session",
    "quiet_onnxruntime",
    "ort",
    "physical_cores",
    "resolve_provider",
    "session_options",
    "speedup_range",
    "time_interleaved",
]

OPT_LEVELS = ("basic", "extended", "all")
SPEEDUP_BLOCKS = 5  # an interleaved run is cut into this many consecutive blocks to see its ratio's spread


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def ort() -> Any:
    """The onnxruntime module, imported on first use (importing onnxslim stays cheap)."""
    import onnxruntime as ort

    return ort


def resolve_provider(name: str) -> str:
    """The execution provider called `name` (e.g. `CPU`, `cuda`), or a UsageError listing those available."""
    available = ort().get_available_providers()
    for candidate in (name, f"{name}ExecutionProvider", f"{name.upper()}ExecutionProvider"):
        if candidate in available:
            return candidate
    raise UsageError(f"provider {name!r} is not available in this onnxruntime; available: {available}")


_ORT_LEVELS = {"none": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def session_options(*, threads: int | None = None, opt_level: str = "all", spinning: bool = False) -> Any:
    """onnxruntime SessionOptions as onnxslim runs and times models.

    Sequential execution with `threads` intra-op threads (onnxruntime's default when None), and thread
    spinning off unless asked: in an interleaved timing loop, the idle workers of one session otherwise
    spin on the cores the next session needs (two identical models timed interleaved came out up to 30%
    apart with spinning, within 1.5% without, on a 2-core machine).
    """
    runtime = ort()
    options = runtime.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = runtime.ExecutionMode.ORT_SEQUENTIAL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = getattr(runtime.GraphOptimizationLevel, _ORT_LEVELS[opt_level])
    return options


def cpu_session(model: onnx.ModelProto | bytes | str, options: Any | None = None) -> Any:
    """A CPU InferenceSession of a model (in memory, serialized, or a path) with `options` (else the defaults
    of `session_options`)."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort().InferenceSession(source, options if options is not None else session_options(), providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def quiet_onnxruntime() -> Iterator[None]:
    """onnxruntime's Python tools print (the quantizer's histogram progress, the ORT-format converter) and log
    on the root logger (the quantizer's bogus "please pre-process": we did) or loggers of their own. Keep
    stdout clean for --json and pass their messages on at debug level."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if "onnxruntime" in record.pathname.replace(os.sep, "/"):
                logger.debug("onnxruntime: %s", record.getMessage())
                return False
            return True

    root = logging.getLogger()
    quiet = _Filter()
    root.addFilter(quiet)
    own = [logging.getLogger(name) for name in ("ort_format_model", "ort_format_model.utils", "convert_onnx_models_to_ort")]
    levels = [each.level for each in own]
    for each in own:
        each.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(quiet)
        for each, level in zip(own, levels, strict=True):
            each.setLevel(level)


def open_session(
    model: onnx.ModelProto | bytes | str, threads: int | None = None, opt_level: str = "all", *, spinning: bool = True
) -> Any:
    """A CPU session of `model` for work that runs one session at a time (calibration, evaluation, the
    quantizer's measures): `session_options` with spinning on unless asked, since no other session is timed."""
    return cpu_session(model, session_options(threads=threads, opt_level=opt_level, spinning=spinning))


def time_interleaved(
    sessions: Sequence[Any],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    warmup: int,
    keep_going: Callable[[int, float], bool],
    clock: Callable[[], float] = time.perf_counter,
    on_round: Callable[[int, float], None] | None = None,
) -> list[list[float]]:
    """Wall time (s) of every timed run of each session, measured so machine noise hits them alike.

    `warmup` untimed runs each first; then rounds in which every session runs once on the same feeds
    (cycling through `feeds` round by round), in alternating order so none always runs first, for as long
    as `keep_going(rounds_done, seconds_spent)`. `on_round(rounds_done, seconds_spent)` after each round.
    """
    for run in range(warmup):
        for session in sessions:
            session.run(None, dict(feeds[run % len(feeds)]))
    times: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    rounds, spent = 0, 0.0
    while keep_going(rounds, spent):
        round_feeds = dict(feeds[rounds % len(feeds)])
        for index in order if rounds % 2 == 0 else order[::-1]:
            start = clock()
            sessions[index].run(None, round_feeds)
            elapsed = clock() - start
            times[index].append(elapsed)
            spent += elapsed
        rounds += 1
        if on_round is not None:
            on_round(rounds, spent)
    return times


def block_speedups(
    reference: Sequence[float], candidate: Sequence[float], blocks: int = SPEEDUP_BLOCKS
) -> tuple[float, ...]:
    """Ratio of median latencies, reference / candidate, on each of `blocks` consecutive blocks of the same
    interleaved runs (the i-th run of each in the same block); empty with fewer than 2 runs per block."""
    runs = min(len(reference), len(candidate))
    if runs < 2 * blocks:
        return ()
    return tuple(
        float(np.median(ref) / np.median(cand))
        for ref, cand in zip(
            np.array_split(np.asarray(reference[:runs]), blocks),
            np.array_split(np.asarray(candidate[:runs]), blocks),
            strict=True,
        )
    )


def speedup_range(
    reference: Sequence[float], candidate: Sequence[float], blocks: int = SPEEDUP_BLOCKS
) -> tuple[float, float] | None:
    """Lowest and highest of `block_speedups` (None with too few runs to judge)."""
    ratios = block_speedups(reference, candidate, blocks)
    return (min(ratios), max(ratios)) if ratios else None


def clearly_faster(speedup: float, low: float | None, min_speedup: float) -> bool:
    """The one rule for "faster, not within noise" (module docstring): the ratio of medians `speedup` is at
    least `min_speedup` and the lowest block ratio `low` is above 1 (None: no blocks to judge; the median
    alone decides)."""
    return speedup >= min_speedup and (low is None or low > 1.0)
