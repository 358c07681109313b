"""int8 quantization, the speed guard: the candidates tried one change at a time, the decision whether
int8 is kept, and the interleaved latency measurement (see quantize.py).

**Deciding outside the noise.** Every timing run interleaves fp32 with the candidates (`measure_latencies`)
and gives, per candidate, the ratio of medians fp32 / int8 (`speedup`) and that ratio on each of 5
consecutive blocks of the run (`block_speedups`; lowest and highest: the *range*). On a busy 2-core machine
the ratio of one pair moves by several percent from run to run, so a verdict on the median alone flips
between 1.04x and 1.06x. The rules:

* **Keep int8** only when it is *clearly faster* (`runtime.clearly_faster`, the rule `optimize`'s final
  choice applies too): speedup at least `min_speedup` and faster than fp32 in every block (lowest > 1).
* **Uncertain** when it is not, but some block reached `min_speedup` (highest >= `min_speedup`: the range
  straddles the bar, e.g. 0.99-1.07x). An uncertain verdict is re-timed once, in a run `RETIME_FACTOR` (3)
  times longer (seconds and rounds), and decided on that run alone, with no further re-time. A range
  wholly below the bar is a clear loss and is not re-timed.
* **A challenger replaces the best so far** only when it is clearly faster *than the best*, judged in the
  run that timed both: its median is faster and it is faster in every block. Both ratios share fp32's
  block medians, so challenger / best per block is exactly the best's median over the challenger's in that
  block — the head-to-head range, free of fp32's own noise. When the challenger is faster at the median but
  not in every block (within the noise), the pair is re-timed once, longer, and judged on that run; a
  challenger slower at the median is not re-timed (the median already says no, and equal variants, the
  common case, would double the search's time).

Re-times are bounded: at most one extra run per decision — the early stop on the requested config, each
challenger, and the final verdict (none when the best already had a longer run: that run is its verdict
against fp32) — so a search makes at most 5 timing runs and 6 longer ones. Without blocks (too few rounds,
or an injected timer that gives none) the median alone decides and nothing is re-timed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np
import onnx

from onnxslim.errors import ModelLoadError, first_line
from onnxslim.progress import Progress
from onnxslim.quant.config import (
    MIN_SPEEDUP,
    RETIME_FACTOR,
    CandidateTiming,
    InterleavedTiming,
    QuantConfig,
    SpeedDecision,
    TimingBudget,
)
from onnxslim.runtime import block_speedups, clearly_faster, open_session, time_interleaved

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ speed guard


def alternatives(config: QuantConfig, *, per_channel_possible: bool = True) -> list[tuple[str, QuantConfig]]:
    """The one-change alternatives to `config`, in the order the speed guard tries them.

    1. the other activation type (s8 activations take s8 weights);
    2. the other format;
    3. per-tensor weights (when per-channel);
    4. only the compute ops quantized (the `compute` placement, placement.py; when another was in force).

    A dynamic config has one alternative: per-tensor weights (its activations are u8 and its form QOperator
    by construction).
    """
    steps: list[tuple[str, QuantConfig]] = []
    if config.mode == "dynamic":
        if config.per_channel and per_channel_possible:
            steps.append(("per-tensor", replace(config, per_channel=False)))
        return steps
    flipped = "s8" if config.activations == "u8" else "u8"
    steps.append(("activations", replace(config, activations=flipped, weights="s8" if flipped == "s8" else config.weights)))
    steps.append(("format", replace(config, format="qoperator" if config.format == "qdq" else "qdq")))
    if config.per_channel and per_channel_possible:
        steps.append(("per-tensor", replace(config, per_channel=False)))
    if config.op_types is None and config.placement != "compute":
        steps.append(("compute-ops-only", replace(config, placement="compute")))
    return steps


def _spread(candidate: CandidateTiming) -> str:
    """'0.95-0.99x over 5 blocks' (', re-timed 3x longer'), or '' without blocks."""
    if not candidate.block_speedups:
        return ""
    retimed = f", re-timed {RETIME_FACTOR}x longer" if candidate.retimed else ""
    return (
        f"{candidate.speedup_low:.2f}-{candidate.speedup_high:.2f}x over {len(candidate.block_speedups)} "
        f"blocks{retimed}"
    )


def is_clearly_faster(candidate: CandidateTiming, min_speedup: float = MIN_SPEEDUP) -> bool:
    """At least `min_speedup` faster than fp32 at the median and faster in every block (module docstring)."""
    return candidate.speedup is not None and clearly_faster(candidate.speedup, candidate.speedup_low, min_speedup)


def is_uncertain(candidate: CandidateTiming, min_speedup: float = MIN_SPEEDUP) -> bool:
    """Not clearly faster, but some block of its run reached `min_speedup`: a longer run may decide."""
    high = candidate.speedup_high
    return not is_clearly_faster(candidate, min_speedup) and high is not None and high >= min_speedup


def beats(challenger: CandidateTiming, best: CandidateTiming) -> bool | None:
    """Whether `challenger` is clearly faster than `best`, both timed in the same run: faster at the median
    and in every block (True); slower or equal at the median (False); faster at the median but not in
    every block, within the noise (None: re-time to decide)."""
    if challenger.speedup is None or best.speedup is None:
        raise ValueError("beats compares two candidates that ran")
    ratio = challenger.speedup / best.speedup  # == best's median latency / the challenger's
    if ratio <= 1.0:
        return False
    if len(challenger.block_speedups) != len(best.block_speedups) or not best.block_speedups:
        return True  # no blocks to judge: the median decides
    low = min(c / b for c, b in zip(challenger.block_speedups, best.block_speedups, strict=True))
    return True if clearly_faster(ratio, low, 1.0) else None


def decide(
    candidates: Sequence[CandidateTiming],
    *,
    min_speedup: float = MIN_SPEEDUP,
    force: bool = False,
    tried: int | None = None,
) -> SpeedDecision:
    """Pure: keep the fastest candidate that meets the accuracy budget if it is clearly faster than fp32
    (`is_clearly_faster`: at least `min_speedup` at the median and faster in every block), or if `force`.
    Candidates whose `budget_met` is False are never kept unless `force` and none meets it (then the most
    faithful of those clearly faster than fp32, or of all when none is). Re-timing is `search_fastest`'s; this decides on the timings given.

    `tried` is how many variants were tried in all, for the message (default: the candidates given).
    """
    ran = [c for c in candidates if c.speedup is not None]
    if not ran:
        failures = "; ".join(dict.fromkeys(c.error for c in candidates if c.error)) or "no candidate was measured"
        return SpeedDecision(None, None, f"no int8 model could be built: {failures}")
    meeting = [c for c in ran if c.budget_met is not False]
    if not meeting:
        # the closest to fp32 among those faster than fp32, when any is: --force asks for a faster model
        faster = [c for c in ran if is_clearly_faster(c, min_speedup)]
        closest = max(faster or ran, key=lambda c: (c.score if c.score is not None else -math.inf, c.speedup or 0.0))
        if force:
            return SpeedDecision(
                closest, closest,
                f"--force: keeping int8 ({closest.config.label}) although no int8 variant meets the accuracy budget",
                forced=True,
            )
        return SpeedDecision(
            None, closest,
            f"no int8 variant tried meets the accuracy budget (the closest, {closest.config.label}, has fidelity "
            f"{closest.score if closest.score is not None else float('nan'):.4f}); keeping the fp32 model",
        )
    best = max(meeting, key=lambda c: c.speedup or 0.0)
    speedup = best.speedup or 0.0
    spread = _spread(best)
    if is_clearly_faster(best, min_speedup):
        return SpeedDecision(
            best, best, f"int8 ({best.config.label}) is {speedup:.2f}x as fast as fp32" + (f" ({spread})" if spread else "")
        )
    needs = f"needs {min_speedup:.2f}x" + (" and faster in every block" if spread else "")
    detail = f"({spread}; {needs})" if spread else f"({needs})"
    if force:
        return SpeedDecision(
            best, best,
            f"--force: keeping int8 ({best.config.label}) although it is {speedup:.2f}x as fast as fp32 {detail}",
            forced=True,
        )
    verdict = "not faster" if speedup < min_speedup else "not reliably faster"
    return SpeedDecision(
        None, best,
        f"int8 is {verdict} than fp32 on this machine: the fastest of {tried or len(ran)} int8 variant(s) tried "
        f"({best.config.label}) is {speedup:.2f}x as fast {detail}; keeping the fp32 model",
    )


def search_fastest(
    requested: QuantConfig,
    measure: Callable[[Sequence[QuantConfig], TimingBudget], Sequence[CandidateTiming]],
    *,
    per_channel_possible: bool = True,
    min_speedup: float = MIN_SPEEDUP,
    force: bool = False,
    budget: TimingBudget | None = None,
) -> tuple[SpeedDecision, tuple[CandidateTiming, ...]]:
    """The speed guard's search. `measure(configs, budget)` builds the configs and times them with fp32 in
    one run of about `budget` (default `TimingBudget()`).

    The requested config is measured first and kept if clearly faster (`is_clearly_faster`). Otherwise each
    kind of change (see `alternatives`), applied to the best config so far, is measured beside it in one
    run and replaces it when clearly faster than it (`beats`); the decision is then made on the best. An
    uncertain verdict — the requested config's, a challenger's, the final one — is re-timed once in a run
    `RETIME_FACTOR` times longer before it is made (module docstring): at most one extra run per decision.
    Returns the decision and every candidate with its latest timing (its latest longer one, when it was
    re-timed: the better measure against fp32), in the order first tried.
    """
    budget = budget or TimingBudget()
    latest: dict[QuantConfig, CandidateTiming] = {}

    def run(configs: Sequence[QuantConfig], *, longer: bool = False) -> dict[QuantConfig, CandidateTiming]:
        timings = list(measure(configs, budget.longer() if longer else budget))
        if longer:
            timings = [replace(t, retimed=True) for t in timings]
        for timing in timings:
            if timing.retimed or timing.config not in latest or not latest[timing.config].retimed:
                latest[timing.config] = timing
        return {t.config: t for t in timings}

    def settled(candidate: CandidateTiming) -> CandidateTiming:
        """`candidate`, re-timed once (longer) when its verdict against fp32 is uncertain."""
        if candidate.budget_met is False or candidate.retimed or not is_uncertain(candidate, min_speedup):
            return candidate
        logger.info("%s: %s is uncertain; re-timing it longer", candidate.config.label, _spread(candidate))
        return run([candidate.config], longer=True)[candidate.config]

    first = settled(run([requested])[requested])
    if first.budget_met is not False and is_clearly_faster(first, min_speedup):
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
        best = pair.get(best.config, best)
        challenger = pair[step]
        if challenger.budget_met is False or challenger.speedup is None:
            continue  # never the base of further changes: it failed, or loses accuracy the budget does not allow
        if best.speedup is None or best.budget_met is False:
            best = challenger
            continue
        verdict = beats(challenger, best)
        if verdict is None:  # within the noise: once more, longer
            logger.info("%s against %s is within the noise; re-timing both longer", step.label, best.config.label)
            pair = run([best.config, step], longer=True)
            best, challenger = pair[best.config], pair[step]
            verdict = bool(beats(challenger, best))
        if verdict:
            best = challenger
    # The winner of the head-to-head comparisons (each made within one run), not the largest ratio seen
    # across runs: ratios from different runs carry different noise. Against fp32 it is judged on its longer
    # run when it had one, else re-timed if uncertain.
    if best.speedup is not None:
        best = settled(latest[best.config])
    # When none meets the budget, every candidate measured is a finalist: --force keeps the closest to fp32.
    finalists = [best] if best.speedup is not None and best.budget_met is not False else list(latest.values())
    decision = decide(finalists, min_speedup=min_speedup, force=force, tried=len(latest))
    return decision, tuple(latest.values())


def measure_latencies(
    models: Sequence[onnx.ModelProto],
    feeds: Mapping[str, np.ndarray],
    *,
    threads: int,
    budget: TimingBudget | None = None,
    warmup: int = 3,
    clock: Callable[[], float] = time.perf_counter,
    progress: Progress | None = None,
    spinning: bool = False,
) -> list[InterleavedTiming]:
    """Each model's median latency in ms and its block speedups against the first model
    (`runtime.block_speedups`), from one run: one onnxruntime session each (same threads, all optimizations,
    no thread spinning unless `spinning`), the same feeds, runs interleaved round by round (order
    alternating), `budget.min_rounds` to `budget.max_rounds` rounds within about `budget.seconds` seconds of
    timed runs (default `TimingBudget()`)."""
    budget = budget or TimingBudget()
    sessions = []
    for model in models:
        try:
            sessions.append(open_session(model, threads, spinning=spinning))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelLoadError(f"onnxruntime cannot load a model to time: {first_line(e)}") from e

    def report(rounds: int, spent: float) -> None:
        if progress is not None:
            expected = math.ceil(budget.seconds / (spent / rounds)) if spent > 0 else budget.max_rounds
            progress("timing", rounds, max(rounds, min(budget.max_rounds, max(budget.min_rounds, expected))))

    times = time_interleaved(
        sessions, [feeds], warmup=warmup, clock=clock, on_round=report,
        keep_going=lambda rounds, spent: rounds < budget.max_rounds and (rounds < budget.min_rounds or spent < budget.seconds),
    )
    return [
        InterleavedTiming(float(np.median(t)) * 1e3, block_speedups(times[0], t) if index else ())
        for index, t in enumerate(times)
    ]
