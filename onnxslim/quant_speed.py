"""int8 quantization, the speed guard: the candidates tried one change at a time, the decision whether
int8 is kept, and the interleaved latency measurement (see quantize.py)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np
import onnx

from onnxslim.errors import ModelLoadError, first_line
from onnxslim.quant_config import (
    COMPUTE_OP_TYPES,
    MIN_SPEEDUP,
    CandidateTiming,
    ProgressCallback,
    QuantConfig,
    SpeedDecision,
)
from onnxslim.quant_prepare import _session
from onnxslim.runtime import time_interleaved

# ------------------------------------------------------------------------------------------ speed guard


def alternatives(config: QuantConfig, *, per_channel_possible: bool = True) -> list[tuple[str, QuantConfig]]:
    """The one-change alternatives to `config`, in the order the speed guard tries them.

    1. the other activation type (s8 activations take s8 weights);
    2. the other format;
    3. per-tensor weights (when per-channel);
    4. only the compute ops quantized (when every op type was).
    """
    steps: list[tuple[str, QuantConfig]] = []
    flipped = "s8" if config.activations == "u8" else "u8"
    steps.append(("activations", replace(config, activations=flipped, weights="s8" if flipped == "s8" else config.weights)))
    steps.append(("format", replace(config, format="qoperator" if config.format == "qdq" else "qdq")))
    if config.per_channel and per_channel_possible:
        steps.append(("per-tensor", replace(config, per_channel=False)))
    if config.op_types is None:
        steps.append(("compute-ops-only", replace(config, op_types=COMPUTE_OP_TYPES)))
    return steps


def decide(
    candidates: Sequence[CandidateTiming],
    *,
    min_speedup: float = MIN_SPEEDUP,
    force: bool = False,
    tried: int | None = None,
) -> SpeedDecision:
    """Pure: keep the fastest candidate that meets the accuracy budget if it is at least `min_speedup`
    faster than fp32, or if `force`. Candidates whose `budget_met` is False are never kept unless `force`
    and none meets it (then the most faithful one is).

    `tried` is how many variants were tried in all, for the message (default: the candidates given).
    """
    ran = [c for c in candidates if c.speedup is not None]
    if not ran:
        failures = "; ".join(dict.fromkeys(c.error for c in candidates if c.error)) or "no candidate was measured"
        return SpeedDecision(None, None, f"no int8 model could be built: {failures}")
    meeting = [c for c in ran if c.budget_met is not False]
    if not meeting:
        closest = max(ran, key=lambda c: (c.score if c.score is not None else -math.inf, c.speedup or 0.0))
        if force:
            return SpeedDecision(
                closest, closest,
                f"--force: keeping int8 ({closest.config.label}) although no int8 variant meets the accuracy budget",
            )
        return SpeedDecision(
            None, closest,
            f"no int8 variant tried meets the accuracy budget (the closest, {closest.config.label}, has fidelity "
            f"{closest.score if closest.score is not None else float('nan'):.4f}); keeping the fp32 model",
        )
    best = max(meeting, key=lambda c: c.speedup or 0.0)
    speedup = best.speedup or 0.0
    if speedup >= min_speedup:
        return SpeedDecision(best, best, f"int8 ({best.config.label}) is {speedup:.2f}x as fast as fp32")
    if force:
        return SpeedDecision(
            best, best,
            f"--force: keeping int8 ({best.config.label}) although it is {speedup:.2f}x as fast as fp32 "
            f"(needs {min_speedup:.2f}x)",
        )
    return SpeedDecision(
        None, best,
        f"int8 is not faster than fp32 on this machine: the fastest of {tried or len(ran)} int8 variant(s) tried "
        f"({best.config.label}) is {speedup:.2f}x as fast (needs {min_speedup:.2f}x); keeping the fp32 model",
    )


def search_fastest(
    requested: QuantConfig,
    measure: Callable[[Sequence[QuantConfig]], Sequence[CandidateTiming]],
    *,
    per_channel_possible: bool = True,
    min_speedup: float = MIN_SPEEDUP,
    force: bool = False,
) -> tuple[SpeedDecision, tuple[CandidateTiming, ...]]:
    """The speed guard's search. `measure(configs)` builds the configs and times them with fp32 in one run.

    The requested config is measured first and kept if `min_speedup` faster. Otherwise each kind of change
    (see `alternatives`), applied to the best config so far, is measured beside it in one run and replaces
    it when faster; the decision is then made on the best. Returns the decision and every candidate with
    its latest timing, in the order first tried.
    """
    latest: dict[QuantConfig, CandidateTiming] = {}

    def run(configs: Sequence[QuantConfig]) -> list[CandidateTiming]:
        timings = list(measure(configs))
        for timing in timings:
            latest[timing.config] = timing
        return timings

    (first,) = run([requested])
    if first.speedup is not None and first.speedup >= min_speedup and first.budget_met is not False:
        return decide([first], min_speedup=min_speedup), tuple(latest.values())
    best = first
    tried = {requested}
    for kind, _ in alternatives(requested, per_channel_possible=per_channel_possible):
        # the same kind of change, applied to the best configuration so far
        step = dict(alternatives(best.config, per_channel_possible=per_channel_possible)).get(kind)
        if step is None or step in tried:
            continue
        tried.add(step)
        pair = run([best.config, step] if best.speedup is not None else [step])
        timed = {t.config: t for t in pair}
        best = timed.get(best.config, best)
        challenger = timed[step]
        if challenger.budget_met is False:
            continue  # never the base of further changes: it loses accuracy the budget does not allow
        if challenger.speedup is not None and (
            best.speedup is None or best.budget_met is False or challenger.speedup > best.speedup
        ):
            best = challenger
    # The winner of the head-to-head comparisons (each made within one run), not the largest ratio seen
    # across runs: ratios from different runs carry different noise.
    finalists = [best] if best.speedup is not None else list(latest.values())
    decision = decide(finalists, min_speedup=min_speedup, force=force, tried=len(latest))
    return decision, tuple(latest.values())


def measure_latencies(
    models: Sequence[onnx.ModelProto],
    feeds: Mapping[str, np.ndarray],
    *,
    threads: int,
    warmup: int = 3,
    min_rounds: int = 15,
    max_rounds: int = 200,
    budget_s: float = 4.0,
    clock: Callable[[], float] = time.perf_counter,
    progress: ProgressCallback | None = None,
    spinning: bool = False,
) -> list[float]:
    """Median latency in ms of each model: one onnxruntime session each (same threads, all optimizations,
    no thread spinning unless `spinning`), the same feeds, runs interleaved round by round (order
    alternating), `min_rounds` to `max_rounds` rounds within about `budget_s` seconds of timed runs."""
    sessions = []
    for model in models:
        try:
            sessions.append(_session(model, threads, spinning=spinning))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelLoadError(f"onnxruntime cannot load a model to time: {first_line(e)}") from e

    def report(rounds: int, spent: float) -> None:
        if progress is not None:
            expected = math.ceil(budget_s / (spent / rounds)) if spent > 0 else max_rounds
            progress("timing", rounds, max(rounds, min(max_rounds, max(min_rounds, expected))))

    times = time_interleaved(
        sessions, [feeds], warmup=warmup, clock=clock, on_round=report,
        keep_going=lambda rounds, spent: rounds < max_rounds and (rounds < min_rounds or spent < budget_s),
    )
    return [float(np.median(t)) * 1e3 for t in times]
