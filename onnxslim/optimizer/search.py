"""`optimize`: from an exported model to the fastest model that keeps its accuracy, with the proof; `sweep`.

    prune (activation criterion, lsq recovery) → int8 (CPU-aware, accuracy and speed guards) → measure

**Levels x modes.** Every level that is quantized goes through `quantize_model` with `--quant-mode`
(default `auto`): on a model whose MatMul/Gemm carry most MACs, static and dynamic int8 are measured side
by side there and the faster within the (whole) budget is kept, by quantize's own rules; the search then
moves to the next level exactly as when one mode is tried. So the choice is among levels x {static,
dynamic}, each pair judged by the same budget and speed rules, and the trial records the mode kept.

**The search.** With an accuracy budget and no target (`--max-drop` points of top-1 with labels, else
`--min-fidelity`; default: 0.5 point with labels, cosine 0.99 without — the first is what a user of a
classifier notices, the second keeps every output and every output channel close), pruning levels are
searched by bisection on the fraction of MACs kept, between 0.1 and 1, judging each *pruned fp32* model
against the original on the evaluation data with half the budget (int8 needs the other half). Each level
is one prune with recovery: `max_trials` − 1 of them at most. The most aggressive level that passed is then
quantized, and the *final* model (pruned + int8) is checked against the full budget; if it misses, the next
less aggressive level that passed is quantized instead, while trials remain. With `--target-macs` there is
one level; with `--target-speedup` the levels are bisected on the final model's *measured* speedup over the
original (each level pruned, quantized and timed), keeping the least pruned level that reaches it.

**Never worse than the input.** The original, the pruned and the int8 models are timed side by side in one
interleaved run (`bench.benchmark`) on the evaluation data. The final model is the fastest of them that
meets the budget and is at least `min_speedup` faster than the original; if none is, `optimized.onnx` is
the original (validated copy) and the report says why.

The library writes nothing: `optimize` returns an `OptimizeResult` whose `model` is the chosen one; the
command line writes it with the pruned model, the plan and the reports (`report.optimize.write_outputs`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx

from onnxslim.bench import BenchOptions, BenchResult, benchmark, physical_cores
from onnxslim.calib import DataOptions, Dataset, open_dataset
from onnxslim.cpu import CpuChoice, choose_for_cpu, detect_cpu
from onnxslim.evaluate import (
    HOLDOUT_FRACTION,
    AccuracyBudget,
    BudgetCheck,
    Comparison,
    Evaluator,
    budget_resolution_note,
    check_budget,
    hold_out_tail,
)
from onnxslim.io import LoadedModel, load_model, save_model
from onnxslim.metrics import Accuracy, Fidelity, select_output
from onnxslim.optimizer.config import (
    LOWEST_KEEP,
    Candidate,
    OptimizeOptions,
    OptimizeResult,
    Trial,
    default_budget,
    half_budget,
)
from onnxslim.progress import Progress
from onnxslim.prune import PruneOptions, PruneResult
from onnxslim.prune.pruner import branch, new_state, plan_key, result_of, run_pipeline
from onnxslim.prune.sensitivity import ALLOCATION_RATIOS, measure_curves
from onnxslim.quant import QuantizeOptions, QuantizeResult, quantize_model
from onnxslim.runtime import clearly_faster

__all__ = ["optimize", "choose_final", "Judge", "Levels", "quantize_for"]

logger = logging.getLogger(__name__)

def choose_final(
    candidates: Sequence[tuple[str, float, bool, float | None]], min_speedup: float
) -> tuple[str, str]:
    """Pure: (name, why) of the model to ship from (name, measured speedup, meets the budget, lowest speedup
    over the blocks of the interleaved run or None) — the fastest that meets the budget, is at least
    `min_speedup` faster than the original and faster in every block of the run (not within its noise;
    `runtime.clearly_faster`, the rule quantize's speed guard applies too); else the original (as loaded:
    Constant nodes become initializers, the outputs are the same)."""
    eligible = [(speedup, name, low) for name, speedup, met, low in candidates if name != "original" and met]
    fast = [(speedup, name) for speedup, name, low in eligible if clearly_faster(speedup, low, min_speedup)]
    if fast:
        speedup, name = max(fast)
        return name, f"{name} is {speedup:.2f}x as fast as the original and meets the budget"
    if not eligible:
        return "original", "no candidate met the accuracy budget; optimized.onnx is the original"
    speedup, name, low = max(eligible)
    noise = f"; {low:.2f}x in the slowest block of the run" if low is not None and low <= 1.0 else ""
    return "original", (
        f"the fastest candidate that meets the budget ({name}, {speedup:.2f}x{noise}) is not reliably "
        f"{min_speedup:.2f}x as fast as the original; optimized.onnx is the original"
    )


# -------------------------------------------------------------------------------------------- helpers


class Judge:
    """A candidate against the original on the evaluation data (`evaluate.hold_out_tail`: --eval, else the
    last batches of --calib): fidelity (every element, worst channel) and top-1 with labels of the first
    output, checked against a budget; one pass per model, remembered for the final table."""

    def __init__(
        self, original: onnx.ModelProto, calib: Dataset, evaluation: Dataset | None, threads: int, remember: int = 8
    ) -> None:
        self._seen: OrderedDict[int, tuple[onnx.ModelProto, Comparison]] = OrderedDict()
        self._remember = remember

        self.split = hold_out_tail(calib, evaluation, HOLDOUT_FRACTION)
        self._evaluate = Evaluator(original, self.split, [select_output(original)], threads=threads)
        # without --eval, the judged batches (the last ones of --calib) must not be seen by pruning either
        self.calibration_samples = None if evaluation is not None else self.split.calibration_batches * calib.batch_size
        self.note = None
        if evaluation is None:
            held = calib.num_samples - (self.calibration_samples or 0)
            self.note = (
                f"no --eval: the budget is checked on the last {held} samples of --calib, which neither pruning nor "
                "int8 calibration saw" + ("; that few samples make a noisy measure: give --eval" if held < 200 else "")
            )

    @property
    def labelled(self) -> bool:
        """Labels given *and* the output a classifier's (its layout found first: labels on an output that is not
        one are ignored, and the default budget must then be a fidelity one)."""
        self._evaluate.ensure_layouts()
        return self._evaluate.labelled

    def __call__(self, model: onnx.ModelProto, budget: AccuracyBudget) -> tuple[BudgetCheck, Fidelity, Accuracy | None]:
        # a model judged during the search is judged again for the final table (with the whole budget): its
        # evaluation is remembered, with the model itself so that its id cannot be reused meanwhile
        remembered = self._seen.get(id(model))
        if remembered is None:
            remembered = (model, self._evaluate.compare(model))
            self._seen[id(model)] = remembered
            while len(self._seen) > self._remember:
                self._seen.popitem(last=False)
        comparison = remembered[1]
        fidelity = comparison.fidelities[0]
        check = check_budget(budget, fidelity, comparison.accuracy_original, comparison.accuracy, comparison.paired)
        return check, fidelity, comparison.accuracy


def _prune_options(keep: float, options: OptimizeOptions) -> PruneOptions:
    return PruneOptions(
        target_macs=keep, criterion=options.criterion, recover=options.recover, allocate=options.allocate,
        round_to=options.round_to, protect_first=True, protect_last=True, seed=options.seed,
    )


class Levels:
    """The pruning levels of one search, sharing what does not depend on the budget: the analysis, lossless
    search, calibration statistics and scores (and with --allocate sensitivity, the damage curves) are
    computed once (`pruner.branch`); a level whose plan equals one already pruned is not pruned again (the
    same result is returned with the number of the trial that pruned it). `samples`: the calibration
    samples pruning may read (the judge keeps the rest)."""

    def __init__(
        self, loaded: LoadedModel, options: OptimizeOptions, calib: Dataset, input_shapes: Any,
        progress: Progress | None, samples: int | None,
    ) -> None:
        started = time.perf_counter()
        self._options = options
        self._base = new_state(
            loaded, _prune_options(0.5, options), input_shapes=input_shapes, calib=calib, progress=progress,
            max_samples=samples,
        )
        run_pipeline(self._base, until="score")
        if options.allocate == "sensitivity":
            self._base.sensitivity = measure_curves(
                self._base, ALLOCATION_RATIOS, self._base.eligible, progress=progress
            )
        self._done: dict[tuple[tuple[str, tuple[int, ...]], ...], tuple[PruneResult, int]] = {}
        self.seconds = time.perf_counter() - started  # the shared work

    def nothing_to_prune(self) -> str | None:
        """Why no level can remove anything (no group the budget may cut), for the report; None when some can."""
        if self._base.eligible:
            return None
        groups = self._base.groups
        if not groups:
            return "no channel group found (no Conv, Gemm or MatMul whose output channels another layer reads)"
        reasons = Counter(g.blocked_by.reason if g.blocked_by is not None else "left whole by the options"
                          for g in groups)
        listed = "; ".join(f"{reason} ({count})" for reason, count in reasons.most_common(4))
        return f"none of its {len(groups)} channel group(s) can be pruned: {listed} (`onnxslim inspect` lists them)"

    def prune(self, keep: float, number: int) -> tuple[PruneResult, int | None]:
        """The model pruned to `keep` of the MACs, and the number of the earlier trial that had the same
        plan, when there was one (`number` is this trial's)."""
        state = branch(self._base, _prune_options(keep, self._options))
        run_pipeline(state, start="plan", until="plan")
        key = plan_key(state.plan)
        if key in self._done:
            result, first = self._done[key]
            return result, first
        run_pipeline(state, start="compensate")
        result = result_of(state)
        self._done[key] = (result, number)
        return result, None


def quantize_for(
    model: onnx.ModelProto, calib: Dataset, evaluation: Dataset | None, budget: AccuracyBudget,
    options: OptimizeOptions, progress: Progress | None,
) -> QuantizeResult:
    quant_options = QuantizeOptions(
        budget=budget, threads=options.threads, min_speedup=options.min_speedup, mode=options.quant_mode
    )
    return quantize_model(model, calib, quant_options, eval_data=evaluation, progress=progress)


# --------------------------------------------------------------------------------------------- optimize


def optimize(
    model: str | os.PathLike[str],
    calib: str | os.PathLike[str],
    options: OptimizeOptions | None = None,
    *,
    eval_data: str | os.PathLike[str] | None = None,
    data_options: DataOptions | None = None,
    input_shapes: Any = None,
    progress: Progress | None = None,
    command: str = "",
) -> OptimizeResult:
    """`onnxslim optimize`: search, measure and choose (module docstring), writing nothing. The result's
    `model` is the chosen model; `prune.model` the pruned one when pruning ran."""
    started = time.perf_counter()
    options = options or OptimizeOptions()
    data_options = data_options or DataOptions()
    loaded = load_model(model)
    calib_data = open_dataset(calib, loaded.model, data_options)
    evaluation = open_dataset(eval_data, loaded.model, data_options) if eval_data is not None else None
    threads = options.threads or physical_cores()
    judge = Judge(loaded.model, calib_data, evaluation, threads, remember=options.max_trials + 2)
    budget = default_budget(options, judge.labelled)
    cpu = choose_for_cpu(detect_cpu(), None)
    trials: list[Trial] = []
    notes: list[str] = [judge.note] if judge.note else []
    resolution = budget_resolution_note(budget, judge.split.samples)
    if resolution:
        logger.warning("%s", resolution)
        notes.append(resolution)
    pruned: PruneResult | None = None
    quantized: QuantizeResult | None = None

    # a searched level is judged with half the budget (int8 spends the rest); a given --target-macs with all
    level_budget = budget if options.target_macs is not None else half_budget(budget)

    stages: dict[str, float] = {"load": time.perf_counter() - started}
    levels = Levels(loaded, options, calib_data, input_shapes, progress, judge.calibration_samples) if options.prune else None
    if levels is not None:
        stages["analysis"] = levels.seconds
        resists = levels.nothing_to_prune()
        if resists is not None:
            notes.append(f"nothing to prune: {resists}")
            levels = None
        else:
            notes.append(f"analysis, calibration statistics and scores computed once for every level ({levels.seconds:.1f} s)")
    tried = 0

    def spent(stage: str, begin: float) -> float:
        seconds = time.perf_counter() - begin
        stages[stage] = stages.get(stage, 0.0) + seconds
        return seconds

    def level(keep: float) -> tuple[PruneResult, Trial]:
        nonlocal tried
        assert levels is not None
        begin = time.perf_counter()
        tried += 1
        result, same_as = levels.prune(keep, tried)
        pruning = spent("prune levels", begin)
        check, _, _ = judge(result.model, level_budget)  # remembered when the plan was tried before
        trial = Trial(keep, result.macs_after / result.macs_before, check.score, check.drop, check.met,
                      seconds=pruning + spent("judging levels", begin + pruning), score_name=check.score_name,
                      same_as=same_as, samples=check.samples)
        logger.info("trial: keep %.3f of the MACs → %s", keep, "passes" if check.met else check.why)
        return result, trial

    def finish(result: PruneResult | None, trial: Trial | None) -> tuple[QuantizeResult | None, Trial | None]:
        if not options.quantize:
            return None, trial
        begin = time.perf_counter()
        source = result.model if result is not None else loaded.model
        q = quantize_for(source, calib_data, evaluation, budget, options, progress)
        quantizing = spent("int8", begin)
        check, _, _ = judge(q.model, budget)
        spent("judging int8", begin + quantizing)
        if trial is None:
            return q, None
        return q, replace(
            trial, quantized=q.quantized, final_score=check.score, final_drop=check.drop, final_met=check.met,
            seconds=trial.seconds + time.perf_counter() - begin, mode=None if q.mode is None else q.mode.chosen,
        )

    if levels is None:
        search = "no pruning: int8 only" if options.prune is False else "nothing to prune: int8 only"
        quantized, _ = finish(None, None)
    elif options.target_macs is not None:
        search = f"one level: --target-macs {options.target_macs:g}"
        pruned, trial = level(options.target_macs)
        quantized, final_trial = finish(pruned, trial)
        trials.append(final_trial or trial)
    elif options.target_speedup is not None:
        search = (f"bisection on the MACs kept for a measured speedup of {options.target_speedup:g}x "
                  f"(at most {options.max_trials} levels, each pruned, quantized and timed)")
        pruned, quantized, trials = _search_speed(loaded, options, level, finish)
        if pruned is None:
            notes.append(f"no level reached {options.target_speedup:g}x within {options.max_trials} trials")
    else:
        search = (f"bisection on the MACs kept ({LOWEST_KEEP:g} to 1; when the middle fails, {SHALLOWEST_KEEP:g} next, "
                  f"and no more levels if it fails too), each level's pruned model judged with half "
                  f"the budget, then int8 on the best; at most {options.max_trials} trials")
        def deeper(passed: list[tuple[float, PruneResult, int]], failed: list[tuple[float, PruneResult, int]],
                   tried_levels: list[Trial], left: int) -> PruneResult | None:
            found, message = _deeper_without_int8(passed, failed, tried_levels, left, level,
                                                  lambda model: judge(model, budget)[0])
            notes.append(message)
            return found

        pruned, quantized, trials = _search_budget(options, level, finish, budget, deeper)
    if pruned is None and levels is not None and options.target_speedup is None:
        notes.append("no pruning level met the budget" + ("; int8 was tried on the original" if options.quantize else ""))
    if pruned is not None:  # what the prune of the level kept warned about (stderr only until now)
        notes += [f"the pruned level: {note}" for note in pruned.outcome.notes]
    begin = time.perf_counter()
    result = _measure(
        loaded, calib_data, eval_data if eval_data is not None else calib, data_options, options, budget, judge,
        pruned, quantized, trials, cpu, threads, search, notes, started, command,
    )
    spent("final measurement", begin)
    return replace(result, stage_seconds=stages, seconds=time.perf_counter() - started)


SHALLOWEST_KEEP = 0.972  # the level bisection on [LOWEST_KEEP, 1] reaches after four failures


def _search_budget(
    options: OptimizeOptions,
    level: Callable[[float], tuple[PruneResult, Trial]],
    finish: Callable[[PruneResult | None, Trial | None], tuple[QuantizeResult | None, Trial | None]],
    budget: AccuracyBudget,
    full_budget: Callable[[list[tuple[float, PruneResult, int]], list[tuple[float, PruneResult, int]], list[Trial], int],
                          PruneResult | None] | None = None,
) -> tuple[PruneResult | None, QuantizeResult | None, list[Trial]]:
    """Bisect the MACs kept, each level judged with half the budget; then int8 on the deepest level that
    passed. When int8 is not kept there (not faster on this machine: a HardSwish-gated net), the pruned fp32
    model is the answer, and `full_budget(passed, failed, trials, trials_left)` may go deeper with the whole
    budget (`_deeper_without_int8`)."""
    full_budget = full_budget or (lambda *_: None)
    trials: list[Trial] = []
    passed: list[tuple[float, PruneResult, int]] = []  # (keep, result, index into trials)
    failed: list[tuple[float, PruneResult, int]] = []
    low, high = LOWEST_KEEP, 1.0  # the answer lies in [low, high]: high passes (nothing pruned)
    levels = max(options.max_trials - 1, 1) if options.quantize else options.max_trials
    for _ in range(levels):
        keep = round((low + high) / 2, 3)
        if len(trials) == 1 and failed and high == 1.0:
            # the middle failed: probe the shallowest level the bisection would reach before walking up to
            # it; if even that fails, no level will pass (real exports: YOLOv8n, PP-OCR and ddddocr failed at
            # every level up to 0.972 of the MACs, five levels for nothing)
            keep = SHALLOWEST_KEEP
        result, trial = level(keep)
        trials.append(trial)
        if not trial.pruned_met:
            failed.append((keep, result, len(trials) - 1))
            if keep == SHALLOWEST_KEEP and high == 1.0:
                break
        if trial.same_as is not None:  # rounding gives the plan of a level already tried: resolution reached
            break
        if trial.pruned_met:
            passed.append((keep, result, len(trials) - 1))
            high = keep
        else:
            low = keep
        if high - low < 0.04:
            break
    if not options.quantize:
        best = min(passed, key=lambda p: p[0]) if passed else None
        return (best[1] if best else None), None, trials
    budget_trials = options.max_trials - len(trials)
    quantized: QuantizeResult | None = None
    for _keep, result, index in sorted(passed, key=lambda p: p[0]):
        if budget_trials <= 0:
            break
        quantized, final = finish(result, trials[index])
        budget_trials -= 1
        assert final is not None
        trials[index] = final
        if final.final_met:
            return result, quantized, trials
        if not (quantized is not None and quantized.quantized):  # int8 does not pay: the pruned fp32 stands
            deeper = full_budget(passed, failed, trials, budget_trials)
            return (deeper or result), quantized, trials
    if passed:
        _, result, _ = max(passed, key=lambda p: p[0])  # the least pruned level, its int8 did not hold
        return result, quantized, trials
    quantized, _ = finish(None, None)
    return None, quantized, trials


def _deeper_without_int8(
    passed: list[tuple[float, PruneResult, int]],
    failed: list[tuple[float, PruneResult, int]],
    trials: list[Trial],
    left: int,
    level: Callable[[float], tuple[PruneResult, Trial]],
    check: Callable[[onnx.ModelProto], BudgetCheck],
) -> tuple[PruneResult | None, str]:
    """int8 was not kept, so pruning may spend the whole budget: the levels already pruned are judged again
    with it (their evaluations are remembered: no new run), then the bisection goes on between the deepest
    level that passes and the shallowest that fails, with the trials `left`. Marks the trials re-judged
    (`pruned_met` against the whole budget) and appends new ones. Returns the deepest passing level (None:
    none deeper than the levels that passed with half the budget) and a note for the report."""
    verdicts: dict[float, tuple[PruneResult, bool]] = {keep: (result, True) for keep, result, _ in passed}
    for keep, result, index in failed:
        full = check(result.model)
        verdicts[keep] = (result, full.met)
        if full.met:
            trials[index] = replace(trials[index], pruned_score=full.score, pruned_drop=full.drop, pruned_met=True,
                                    whole_budget=True)
    rejudged = sum(1 for keep, _, _ in failed if verdicts[keep][1])
    added = 0
    for _ in range(max(left, 0)):
        passing = [keep for keep, (_, met) in verdicts.items() if met]
        failing = [keep for keep, (_, met) in verdicts.items() if not met]
        high = min(passing, default=1.0)
        low = max((k for k in failing if k < high), default=LOWEST_KEEP)
        if high - low < 0.04:
            break
        keep = round((low + high) / 2, 3)
        result, trial = level(keep)
        full = check(result.model)
        trials.append(replace(trial, pruned_score=full.score, pruned_drop=full.drop, pruned_met=full.met, whole_budget=True))
        added += 1
        verdicts[keep] = (result, full.met)
        if trial.same_as is not None:
            break
    deepest = min(((keep, result) for keep, (result, met) in verdicts.items() if met), key=lambda p: p[0], default=None)
    first_passed = min((keep for keep, _, _ in passed), default=1.0)
    best = deepest if deepest is not None and deepest[0] < first_passed else None
    message = (
        f"int8 is not kept on this model (not faster on this machine), so pruning was judged with the whole budget: "
        f"{rejudged} level(s) already pruned passed with it, {added} more tried"
        + (f"; the deepest passing keeps {best[1].macs_after / best[1].macs_before:.2f} of the MACs" if best else
           "; none went deeper")
    )
    return (best[1] if best else None), message


def _search_speed(
    loaded: LoadedModel,
    options: OptimizeOptions,
    level: Callable[[float], tuple[PruneResult, Trial]],
    finish: Callable[[PruneResult | None, Trial | None], tuple[QuantizeResult | None, Trial | None]],
) -> tuple[PruneResult | None, QuantizeResult | None, list[Trial]]:
    """The least pruned level whose final model is measured `target_speedup` times as fast as the original."""
    assert options.target_speedup is not None
    trials: list[Trial] = []
    best: tuple[float, PruneResult, QuantizeResult | None] | None = None
    low, high = LOWEST_KEEP, 1.0  # high may be too slow, low is assumed fast enough
    for _ in range(options.max_trials):
        keep = round((low + high) / 2, 3)
        result, trial = level(keep)
        if trial.same_as is not None:  # the plan of a level already measured: resolution reached
            trials.append(trial)
            break
        quantized, final = finish(result, trial)
        final = final or trial
        final_model = quantized.model if quantized is not None else result.model
        speedup = _speedup(loaded.model, final_model, options)
        trials.append(replace(final, speedup=speedup))
        if speedup >= options.target_speedup:
            if best is None or keep > best[0]:
                best = (keep, result, quantized)
            low = keep
        else:
            high = keep
        if high - low < 0.04:
            break
    if best is None:
        return None, None, trials
    return best[1], best[2], trials


def _speedup(original: onnx.ModelProto, candidate: onnx.ModelProto, options: OptimizeOptions) -> float:
    """Measured p50 speedup of `candidate` over `original` on random inputs (a short interleaved run)."""
    with tempfile.TemporaryDirectory(prefix="onnxslim-speed-") as folder:
        paths = [save_model(original, Path(folder) / "original.onnx"), save_model(candidate, Path(folder) / "candidate.onnx")]
        bench = benchmark(paths, options=BenchOptions(threads=options.threads, warmup=3, repeat=20, memory=False))
    return bench.models[1].speedup


def _measure(
    loaded: LoadedModel, calib: Dataset, data: str | os.PathLike[str], data_options: DataOptions,
    options: OptimizeOptions, budget: AccuracyBudget, judge: Judge, pruned: PruneResult | None,
    quantized: QuantizeResult | None, trials: list[Trial], cpu: CpuChoice, threads: int, search: str,
    notes: list[str], started: float, command: str,
) -> OptimizeResult:
    """The final interleaved measurement and the choice."""
    models: dict[str, onnx.ModelProto] = {"original": loaded.model}
    if pruned is not None and pruned.macs_after < pruned.macs_before:  # a level that removed nothing is the original
        models["pruned"] = pruned.model
    if quantized is not None and quantized.quantized:  # int8 the quantizer did not keep is not a candidate
        models["int8"] = quantized.model
    checks: dict[str, BudgetCheck] = {name: judge(model, budget)[0] for name, model in models.items() if name != "original"}
    with tempfile.TemporaryDirectory(prefix="onnxslim-optimize-") as folder:
        paths = [save_model(model, Path(folder) / f"{name}.onnx") for name, model in models.items()]
        bench: BenchResult = benchmark(
            paths, data=data, data_options=data_options,
            options=BenchOptions(threads=threads, warmup=5, repeat=options.repeat),
        )
    candidates = tuple(Candidate(name, row, checks.get(name)) for name, row in zip(models, bench.models, strict=True))
    chosen, reason = choose_final(
        [
            (c.name, c.bench.speedup, c.check.met if c.check is not None else True,
             c.bench.speedup_range[0] if c.bench.speedup_range is not None else None)
            for c in candidates
        ],
        options.min_speedup,
    )
    if chosen == "original" and len(models) == 1:  # nothing to choose from: say why each way was closed
        causes = [note for note in notes if note.startswith(("nothing to prune", "no pruning level"))]
        if quantized is not None and not quantized.quantized:
            causes.append(f"int8 not kept: {quantized.reason}")
        if causes:
            reason = "optimized.onnx is the original: " + "; ".join(causes)
    met = chosen == "original" or checks[chosen].met
    return OptimizeResult(
        chosen=chosen, reason=reason, budget=budget, budget_met=met, candidates=candidates, trials=tuple(trials),
        prune=pruned, quantize=quantized, cpu=cpu, data=judge.split.description, threads=threads,
        seconds=time.perf_counter() - started, command=command, max_trials=options.max_trials, search=search,
        notes=tuple(notes), model=models[chosen], input_shapes=dict(calib.input_shapes),
    )


