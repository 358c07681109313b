"""Benchmark models side by side: latency, speedup, throughput, size, params, MACs, fidelity, accuracy, memory.

How it measures (so the numbers can be trusted and compared):

* one onnxruntime session per model with the same threads (`intra_op_num_threads`, default: the number of
  physical cores available to the process), graph optimization level and provider;
* fidelity and accuracy: every model runs over the whole dataset (or the random batches), outside the
  timed loop; fidelity compares each model's chosen output with the first model's on the same inputs;
* latency: `warmup` untimed runs, then `repeat` timed runs per model, interleaved run by run (each repeat
  runs every model once on the same batch, alternating the order) so machine noise hits them alike;
  batches cycle through the first few full batches of the data. Wall time of `session.run` with
  `time.perf_counter`; percentiles with numpy;
* speedup: p50 latency of the first model / p50 latency of this one, from the same run;
* throughput: samples per second at the batch size, from the mean latency;
* peak memory: measured in a fresh process per model (`onnxslim._memory_probe`), since one process
  cannot attribute its memory to one of several sessions: how far creating the session and running it
  a few times at the benchmark's input shapes raised the process's peak resident memory above its
  resident memory before loading (the interpreter and onnxruntime itself are excluded).
* profile (optional): where each model's time goes, from onnxruntime's own profiler in a separate session
  (`profile_runs` runs after a few untimed ones), as kernel time per run by op type *after* onnxruntime's
  graph optimizations (fused ops such as FusedConv or QLinearConv, and the layout ops it inserts, such as
  ReorderInput, appear under their own names). The profiler's bookkeeping inflates short kernels, so its
  totals exceed the latencies above: compare shares, and models with each other.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxslim.analysis.cost import compute_cost
from onnxslim.calib import Batch, DataOptions, model_input_specs, open_dataset
from onnxslim.errors import DataError, ModelLoadError, UsageError, first_line
from onnxslim.io import LoadedModel, infer_tensor_infos, load_model
from onnxslim.metrics import (
    Accuracy,
    AccuracyMeter,
    Fidelity,
    FidelityMeter,
    OutputLayout,
    layout_of,
    select_output,
)
from onnxslim.runtime import OPT_LEVELS, physical_cores, session_options, time_interleaved  # re-exported
from onnxslim.runtime import ort as _ort
from onnxslim.runtime import resolve_provider as _resolve_provider
from onnxslim.runtime import speedup_range as _speedup_range

__all__ = [
    "OPT_LEVELS",
    "BenchOptions",
    "Latency",
    "ModelBench",
    "OpTime",
    "Profile",
    "BenchResult",
    "benchmark",
    "parse_profile",
    "physical_cores",
    "session_options",
    "time_interleaved",
]

logger = logging.getLogger(__name__)

SPEEDUP_STATISTIC = "p50"
_MEMORY_TIMEOUT_S = 600


@dataclass(frozen=True)
class BenchOptions:
    """How to run the benchmark. `threads` None means the number of physical cores available."""

    threads: int | None = None
    warmup: int = 10
    repeat: int = 100
    provider: str = "CPUExecutionProvider"
    opt_level: str = "all"
    output: str | None = None  # the output the metrics read; default the first model's first output
    memory: bool = True
    memory_runs: int = 3
    timing_batches: int = 8  # the timed loop cycles through at most this many batches (held in memory)
    profile_runs: int = 0  # runs under onnxruntime's profiler per model (0: no profile)

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be at least 1, not {self.threads}")
        if self.warmup < 0 or self.repeat < 1:
            raise UsageError(f"warm-up must be >= 0 and repeat >= 1 (got {self.warmup}, {self.repeat})")
        if self.opt_level not in OPT_LEVELS:
            raise UsageError(f"optimization level must be one of {list(OPT_LEVELS)}, not {self.opt_level!r}")
        if self.timing_batches < 1 or self.memory_runs < 1:
            raise UsageError("timing_batches and memory_runs must be at least 1")
        if self.profile_runs < 0:
            raise UsageError(f"profile runs must be >= 0, not {self.profile_runs}")


@dataclass(frozen=True)
class Latency:
    """Wall time of one `session.run` in milliseconds over the timed runs."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    runs: int


@dataclass(frozen=True)
class OpTime:
    """One op type in a profile: its kernels' time per run."""

    op_type: str
    kernels: int  # kernels of this type run per run
    ms: float  # their kernel time per run, under the profiler
    share: float  # of the model's total kernel time


@dataclass(frozen=True)
class Profile:
    """Where a model's time goes, per onnxruntime's profiler (see the module docstring)."""

    runs: int
    kernel_ms: float  # total kernel time per run, under the profiler
    ops: tuple[OpTime, ...]  # the most time first


@dataclass(frozen=True)
class ModelBench:
    """Everything measured for one model. `fidelity` is against the first model (None for the first)."""

    name: str
    path: Path
    size_bytes: int
    params: int
    macs: int  # at the benchmark's input shapes (one batch)
    latency: Latency
    speedup: float  # p50 of the first model / p50 of this one
    throughput: float  # samples per second at the batch size (batch / mean latency)
    fidelity: Fidelity | None
    accuracy: Accuracy | None
    peak_memory_bytes: int | None  # None when it could not be measured
    profile: Profile | None = None  # with BenchOptions.profile_runs
    # the speedup measured on each of a few consecutive blocks of the interleaved runs: lowest and highest
    # (None with too few runs); a range that contains 1 means the difference is within this run's noise
    speedup_range: tuple[float, float] | None = None

    @property
    def speedup_significant(self) -> bool | None:
        if self.speedup_range is None:
            return None
        low, high = self.speedup_range
        return not low <= 1.0 <= high


@dataclass(frozen=True)
class BenchResult:
    """One benchmark run: the settings it used and one `ModelBench` per model, the first being the reference."""

    models: tuple[ModelBench, ...]
    data: str
    random_data: bool  # inputs were random: fidelity is on random inputs, there is no accuracy
    samples: int  # samples the fidelity and accuracy are computed on
    batch_size: int
    input_shapes: dict[str, tuple[int, ...]]
    output: str
    threads: int
    warmup: int
    repeat: int
    provider: str
    opt_level: str
    notes: tuple[str, ...] = ()  # what was measured differently than asked (labels ignored ...)
    speedup_statistic: str = SPEEDUP_STATISTIC


def _display_names(paths: Sequence[Path]) -> list[str]:
    names = [p.name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def _check_same_inputs(loaded: Sequence[LoadedModel]) -> None:
    """Every model must take the same inputs as the first: names, dtypes and ranks."""
    reference = {s.name: s for s in model_input_specs(loaded[0].model)}
    for other in loaded[1:]:
        specs = {s.name: s for s in model_input_specs(other.model)}
        where = f"{other.path} cannot be compared with {loaded[0].path}"
        if set(specs) != set(reference):
            raise UsageError(f"{where}: its inputs are {sorted(specs)}, the first model's {sorted(reference)}")
        for name, spec in specs.items():
            want = reference[name]
            rank_differs = spec.dims is not None and want.dims is not None and len(spec.dims) != len(want.dims)
            if spec.dtype != want.dtype or rank_differs:
                raise UsageError(f"{where}: input {name!r} is {spec.describe()} there, {want.describe()} in the first")


def _check_shapes_fit(loaded: LoadedModel, shapes: dict[str, tuple[int, ...]]) -> None:
    for spec in model_input_specs(loaded.model):
        shape = shapes[spec.name]
        for axis, want in enumerate(spec.dims or ()):
            if isinstance(want, int) and axis < len(shape) and shape[axis] != want:
                raise UsageError(
                    f"{loaded.path}: input {spec.name!r} is {spec.describe()}, but the data is fed at "
                    f"{list(shape)} (shaped by the first model); the models' input shapes must agree"
                )


def _session(path: Path, options: BenchOptions, threads: int, provider: str, *, profile_prefix: str | None = None) -> Any:
    settings = session_options(threads=threads, opt_level=options.opt_level)
    if profile_prefix is not None:
        settings.enable_profiling = True
        settings.profile_file_prefix = profile_prefix
    try:
        return _ort().InferenceSession(str(path), settings, providers=[provider])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ModelLoadError(f"{path}: onnxruntime cannot load the model: {first_line(e)}") from e


def _run(session: Any, feeds: dict[str, np.ndarray], path: Path, what: str) -> list[np.ndarray]:
    try:
        return session.run(None, feeds)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        shapes = {name: list(array.shape) for name, array in feeds.items()}
        raise DataError(f"{path}: onnxruntime failed on {what} (inputs {shapes}): {first_line(e)}") from e


_PROFILE_WARMUP = 2


def parse_profile(events: Sequence[Mapping[str, Any]], *, skip_runs: int = 0) -> Profile:
    """Kernel time per op type from onnxruntime's profile `events` (its JSON trace), leaving out the kernels
    of the first `skip_runs` runs (warm-up: first-run allocations and caches)."""
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(runs) <= skip_runs:
        raise ValueError(f"the profile has {len(runs)} runs, not more than the {skip_runs} to skip")
    start = runs[skip_runs]
    time_us: dict[str, float] = {}
    kernels: dict[str, int] = {}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        if event["ts"] < start:
            continue
        op_type = str(event.get("args", {}).get("op_name", "?"))
        time_us[op_type] = time_us.get(op_type, 0.0) + float(event["dur"])
        kernels[op_type] = kernels.get(op_type, 0) + 1
    counted = len(runs) - skip_runs
    total_us = sum(time_us.values())
    ops = sorted(
        (
            OpTime(op, round(kernels[op] / counted), us / counted / 1e3, us / total_us if total_us else 0.0)
            for op, us in time_us.items()
        ),
        key=lambda o: (-o.ms, o.op_type),
    )
    return Profile(runs=counted, kernel_ms=total_us / counted / 1e3, ops=tuple(ops))


def _profile(path: Path, feeds: Mapping[str, np.ndarray], options: BenchOptions, threads: int, provider: str) -> Profile:
    """Run `path` under onnxruntime's profiler in its own session (same settings as the timed one)."""
    with tempfile.TemporaryDirectory(prefix="onnxslim-profile-") as scratch:
        session = _session(path, options, threads, provider, profile_prefix=str(Path(scratch) / "profile"))
        for _ in range(_PROFILE_WARMUP + options.profile_runs):
            _run(session, dict(feeds), path, "a profiled run")
        trace = Path(session.end_profiling())
        events = json.loads(trace.read_text())
    return parse_profile(events, skip_runs=_PROFILE_WARMUP)


def _latency(times_s: Sequence[float]) -> Latency:
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return Latency(
        p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), mean_ms=float(ms.mean()),
        std_ms=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0, min_ms=float(ms.min()), runs=len(ms),
    )


def _peak_memory(path: Path, batch: Batch, options: BenchOptions, threads: int, provider: str) -> int | None:
    """Peak memory of loading and running `path`, measured in a fresh process; None if that failed."""
    feeds = {name: [list(array.shape), str(array.dtype)] for name, array in batch.feeds.items()}
    command = [
        sys.executable, "-m", "onnxslim._memory_probe", str(path), "--feeds", json.dumps(feeds),
        "--threads", str(threads), "--opt-level", options.opt_level, "--provider", provider,
        "--runs", str(options.memory_runs),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_MEMORY_TIMEOUT_S, check=True)
        report = json.loads(done.stdout)
    except subprocess.CalledProcessError as e:
        logger.warning("%s: could not measure peak memory: %s", path, (e.stderr or "").strip().splitlines()[-1:])
        return None
    except (subprocess.TimeoutExpired, json.JSONDecodeError, OSError) as e:
        logger.warning("%s: could not measure peak memory: %s", path, e)
        return None
    logger.debug("%s: memory probe %s", path, report)
    return max(0, int(report["peak_bytes"]) - int(report["baseline_bytes"]))


def benchmark(
    models: Sequence[str | os.PathLike[str]],
    *,
    data: str | os.PathLike[str] | None = None,
    data_options: DataOptions | None = None,
    options: BenchOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> BenchResult:
    """Benchmark `models` side by side on `data` (random inputs when None); the first is the reference.

    `progress(n)` is called as timed repeats complete (n repeats each time), e.g. to advance a bar.
    Raises UsageError when the models' inputs differ, DataError when the data does not fit them.
    """
    if not models:
        raise UsageError("give at least one model to benchmark")
    options = options or BenchOptions()
    data_options = data_options or DataOptions()
    paths = [Path(m) for m in models]
    loaded = [load_model(p) for p in paths]
    _check_same_inputs(loaded)
    output = select_output(loaded[0].model, options.output)
    for other in loaded[1:]:
        names = [o.name for o in other.model.graph.output]
        if output not in names:
            raise UsageError(f"{other.path} has no output {output!r} (its outputs: {names}); choose one with --output")
    dataset = open_dataset("random" if data is None else data, loaded[0].model, data_options)
    for other in loaded[1:]:
        _check_shapes_fit(other, dataset.input_shapes)

    provider = _resolve_provider(options.provider)
    threads = options.threads or physical_cores()
    sessions = [_session(p, options, threads, provider) for p in paths]
    output_index = [[o.name for o in s.get_outputs()].index(output) for s in sessions]

    # Fidelity and accuracy over the whole dataset, outside the timed loop; keep a few batches for timing.
    fidelity_meters: list[FidelityMeter] = []
    accuracy_meters: list[AccuracyMeter] = []
    layout: OutputLayout | None = None
    notes: list[str] = []
    timing: list[Batch] = []
    reference = sessions[0]
    for number, batch in enumerate(dataset.batches(), start=1):
        outputs = [
            _run(s, batch.feeds, p, f"batch {number} of {dataset.description}")[i]
            for s, p, i in zip(sessions, paths, output_index, strict=True)
        ]
        if layout is None:  # the output's batch axis is not always 0 (a recognizer's [T, batch, C])
            layout = layout_of(loaded[0].model, output, outputs[0], batch.feeds, lambda f: reference.run([output], dict(f))[0])
            fidelity_meters = [FidelityMeter(layout) for _ in paths[1:]]
            accuracy_meters = [AccuracyMeter(layout) for _ in paths] if dataset.has_labels else []
        if layout.batch_axis is not None:
            outputs = [np.take(o, np.arange(batch.size), axis=layout.batch_axis) for o in outputs]
        for fidelity_meter, candidate in zip(fidelity_meters, outputs[1:], strict=True):
            fidelity_meter.update(outputs[0], candidate)
        if batch.labels is not None and accuracy_meters and layout.class_axis is None:
            notes.append(f"labels ignored: output {output!r} of shape {list(np.shape(outputs[0]))} is not a classifier's")
            accuracy_meters = []
        if batch.labels is not None and accuracy_meters:
            for accuracy_meter, scores in zip(accuracy_meters, outputs, strict=True):
                accuracy_meter.update(scores, batch.labels)
        if len(timing) < options.timing_batches and _rows(batch) == dataset.batch_size:
            timing.append(batch)
    if not timing:  # fewer samples than one batch of a symbolic-batch model
        timing.append(next(iter(dataset.batches())))
    batch_size = _rows(timing[0])

    # Warm-up, then timed runs interleaved run by run.
    times = time_interleaved(
        sessions, [b.feeds for b in timing], warmup=options.warmup,
        keep_going=lambda rounds, _spent: rounds < options.repeat,
        on_round=None if progress is None else lambda _rounds, _spent: progress(1),
    )
    del sessions

    shapes = {name: tuple(array.shape) for name, array in timing[0].feeds.items()}
    latencies = [_latency(t) for t in times]
    results = []
    for index, (path, model, name) in enumerate(zip(paths, loaded, _display_names(paths), strict=True)):
        cost = compute_cost(model.model, infer_tensor_infos(model.model, shapes))
        memory = _peak_memory(path, timing[0], options, threads, provider) if options.memory else None
        profile = _profile(path, timing[0].feeds, options, threads, provider) if options.profile_runs else None
        latency = latencies[index]
        results.append(
            ModelBench(
                name=name,
                path=path,
                size_bytes=model.size_bytes,
                params=cost.params,
                macs=cost.macs,
                latency=latency,
                speedup=latencies[0].p50_ms / latency.p50_ms,
                throughput=batch_size / (latency.mean_ms / 1e3),
                fidelity=fidelity_meters[index - 1].result() if index else None,
                accuracy=accuracy_meters[index].result() if accuracy_meters else None,
                peak_memory_bytes=memory,
                profile=profile,
                speedup_range=_speedup_range(times[0], times[index]) if index else None,
            )
        )
    return BenchResult(
        models=tuple(results),
        data=dataset.description,
        random_data=dataset.is_random,
        samples=dataset.num_samples,
        batch_size=batch_size,
        input_shapes=shapes,
        output=output,
        threads=threads,
        warmup=options.warmup,
        repeat=options.repeat,
        provider=provider,
        opt_level=options.opt_level,
        notes=tuple(notes),
    )


def _rows(batch: Batch) -> int:
    return len(next(iter(batch.feeds.values())))

