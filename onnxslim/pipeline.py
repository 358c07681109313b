"""`optimize`: from an exported model to the fastest model that keeps its accuracy, with the proof; `sweep`.

    prune (activation criterion, lsq recovery) → int8 (CPU-aware, accuracy and speed guards) → measure

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

Outputs (all written together, or none): `optimized.onnx`, `pruned.onnx` and `plan.json` (when pruning ran),
`report.md`, `report.json`, and `report.png` when matplotlib is installed.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from onnxslim.bench import BenchOptions, BenchResult, ModelBench, benchmark, physical_cores
from onnxslim.calib import DataOptions, Dataset, open_dataset
from onnxslim.cpu import CpuChoice, choose_for_cpu, detect_cpu
from onnxslim.errors import UsageError
from onnxslim.evaluate import AccuracyBudget, BudgetCheck, check_budget
from onnxslim.io import LoadedModel, load_model, save_model
from onnxslim.metrics import Accuracy, Fidelity
from onnxslim.prune import PruneOptions, PruneResult, prune_model
from onnxslim.prune.pruner import ALLOCATIONS
from onnxslim.quant import HOLDOUT_FRACTION, MIN_SPEEDUP, QuantizeOptions, QuantizeResult, quantize_model
from onnxslim.runtime import clearly_faster

__all__ = [
    "DEFAULT_TRIALS",
    "OUTPUT_FILES",
    "check_outdir",
    "search_and_measure",
    "write_outputs",
    "OptimizeOptions",
    "Trial",
    "Candidate",
    "OptimizeResult",
    "SweepPoint",
    "SweepResult",
    "optimize",
    "sweep",
    "choose_final",
    "default_budget",
]

logger = logging.getLogger(__name__)

DEFAULT_TRIALS = 6
LOWEST_KEEP = 0.1  # the search never keeps fewer MACs than this
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class OptimizeOptions:
    """What `optimize` may do and what it must keep. See the module docstring for the search."""

    max_drop: float | None = None
    min_fidelity: float | None = None
    target_macs: float | None = None
    target_speedup: float | None = None
    prune: bool = True
    quantize: bool = True
    max_trials: int = DEFAULT_TRIALS
    threads: int | None = None
    criterion: str = "activation"
    recover: str = "lsq"
    allocate: str = "global"
    round_to: int = 8
    min_speedup: float = MIN_SPEEDUP
    repeat: int = 50  # timed runs per model in the final interleaved measurement
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target_macs is not None and self.target_speedup is not None:
            raise UsageError("--target-macs and --target-speedup are exclusive: give one")
        if not self.prune and not self.quantize:
            raise UsageError("--no-prune and --no-quantize leave nothing to do")
        if not self.prune and (self.target_macs is not None or self.target_speedup is not None):
            raise UsageError("--target-macs and --target-speedup choose how much to prune; they need pruning on")
        if self.target_macs is not None and not 0 < self.target_macs <= 1:
            raise UsageError(f"--target-macs must be in (0, 1], not {self.target_macs}")
        if self.target_speedup is not None and self.target_speedup <= 1:
            raise UsageError(f"--target-speedup must be above 1, not {self.target_speedup}")
        if self.max_trials < 1:
            raise UsageError(f"--max-trials must be at least 1, not {self.max_trials}")
        if self.allocate not in ALLOCATIONS:
            raise UsageError(f"--allocate must be one of {', '.join(ALLOCATIONS)}, not {self.allocate!r}")
        AccuracyBudget(self.max_drop, self.min_fidelity)  # validates the budget


def default_budget(options: OptimizeOptions, labelled: bool) -> AccuracyBudget:
    """The budget in force: the one given, else 0.5 point of top-1 with labels, else cosine 0.99."""
    if options.max_drop is not None or options.min_fidelity is not None:
        if options.max_drop is not None and not labelled:
            raise UsageError("--max-drop needs labels in the evaluation data (or use --min-fidelity)")
        return AccuracyBudget(options.max_drop, options.min_fidelity)
    return AccuracyBudget(max_drop=0.5) if labelled else AccuracyBudget(min_fidelity=0.99)


def _half(budget: AccuracyBudget) -> AccuracyBudget:
    """What pruning alone may spend: half the drop, half the fidelity loss (int8 gets the rest)."""
    return AccuracyBudget(
        None if budget.max_drop is None else budget.max_drop / 2,
        None if budget.min_fidelity is None else 1 - (1 - budget.min_fidelity) / 2,
    )


@dataclass(frozen=True)
class Trial:
    """One pruning level tried: MACs asked and kept, the pruned fp32 model against the original, and — when
    it was quantized — the final model's check and measured speedup."""

    target_macs: float
    macs_kept: float
    pruned_score: float
    pruned_drop: float | None
    pruned_met: bool
    quantized: bool | None = None
    final_score: float | None = None
    final_drop: float | None = None
    final_met: bool | None = None
    speedup: float | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class Candidate:
    """A model of the final measurement: what it is, how it did, and whether it meets the budget."""

    name: str  # original, pruned, int8
    bench: ModelBench
    check: BudgetCheck | None  # None for the original


@dataclass(frozen=True)
class OptimizeResult:
    """What `optimize` chose and the proof: the side-by-side measurement, the trials, what each step did."""

    chosen: str  # the candidate written as optimized.onnx
    reason: str
    budget: AccuracyBudget
    budget_met: bool
    candidates: tuple[Candidate, ...]
    trials: tuple[Trial, ...]
    prune: PruneResult | None
    quantize: QuantizeResult | None
    cpu: CpuChoice
    data: str
    threads: int
    seconds: float
    files: tuple[str, ...] = ()
    outdir: str | None = None
    command: str = ""
    max_trials: int = DEFAULT_TRIALS
    search: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def final(self) -> Candidate:
        return next(c for c in self.candidates if c.name == self.chosen)

    @property
    def speedup(self) -> float:
        return self.final.bench.speedup


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
    noise = f", and as slow as it in part of the run ({low:.2f}x)" if low is not None and low <= 1.0 else ""
    return "original", (
        f"the fastest candidate that meets the budget ({name}, {speedup:.2f}x{noise}) is not reliably "
        f"{min_speedup:.2f}x as fast as the original; optimized.onnx is the original"
    )


# -------------------------------------------------------------------------------------------- helpers


class _Judge:
    """A candidate against the original on the evaluation data: fidelity (every element, worst channel) and
    top-1 with labels, checked against a budget. Reuses the quantizer's evaluator (one pass per candidate)."""

    def __init__(
        self, original: onnx.ModelProto, calib: Dataset, evaluation: Dataset | None, threads: int, remember: int = 8
    ) -> None:
        from onnxslim.metrics import select_output
        from onnxslim.quant.quantizer import _Evaluator, _split

        self._seen: OrderedDict[int, tuple[onnx.ModelProto, list[Fidelity], Accuracy | None, Accuracy | None]] = OrderedDict()
        self._remember = remember

        self.split = _split(calib, evaluation, HOLDOUT_FRACTION)
        self._evaluate = _Evaluator(original, self.split, [select_output(original)], threads=threads, progress=None)
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
        return bool(self._evaluate.want_accuracy)

    def __call__(self, model: onnx.ModelProto, budget: AccuracyBudget) -> tuple[BudgetCheck, Fidelity, Accuracy | None]:
        # a model judged during the search is judged again for the final table (with the whole budget): its
        # evaluation is remembered, with the model itself so that its id cannot be reused meanwhile
        remembered = self._seen.get(id(model))
        if remembered is None:
            remembered = (model, *self._evaluate(model))
            self._seen[id(model)] = remembered
            while len(self._seen) > self._remember:
                self._seen.popitem(last=False)
        _, fidelities, original, candidate = remembered
        return check_budget(budget, fidelities[0], original, candidate), fidelities[0], candidate


def _prune_options(keep: float, options: OptimizeOptions) -> PruneOptions:
    return PruneOptions(
        target_macs=keep, criterion=options.criterion, recover=options.recover, allocate=options.allocate,
        round_to=options.round_to, protect_first=True, protect_last=True, seed=options.seed,
    )


def _curves(
    loaded: LoadedModel, options: OptimizeOptions, calib: Dataset, input_shapes: Any, progress: Progress | None,
    samples: int | None,
) -> Any:
    """With `--allocate sensitivity`, the damage curves of the eligible groups, measured once for every level."""
    if options.allocate != "sensitivity":
        return None
    from onnxslim.prune.pruner import new_state, run_pipeline
    from onnxslim.prune.sensitivity import ALLOCATION_RATIOS, measure_curves

    state = new_state(
        loaded, _prune_options(0.5, options), input_shapes=input_shapes, calib=calib, progress=progress,
        max_samples=samples,
    )
    run_pipeline(state, until="score")
    return measure_curves(state, ALLOCATION_RATIOS, state.eligible, progress=progress)


def _prune(
    loaded: LoadedModel, keep: float, options: OptimizeOptions, calib: Dataset, input_shapes: Any,
    progress: Progress | None, curves: Any = None, samples: int | None = None,
) -> PruneResult:
    return prune_model(
        loaded, _prune_options(keep, options), input_shapes=input_shapes, calib=calib, progress=progress,
        sensitivity=curves, max_samples=samples,
    )


def _quantize(
    model: onnx.ModelProto, calib: Dataset, evaluation: Dataset | None, budget: AccuracyBudget,
    options: OptimizeOptions, progress: Progress | None,
) -> QuantizeResult:
    quant_options = QuantizeOptions(budget=budget, threads=options.threads, min_speedup=options.min_speedup)
    return quantize_model(model, calib, quant_options, eval_data=evaluation, progress=progress)


# --------------------------------------------------------------------------------------------- optimize


OUTPUT_FILES = ("optimized.onnx", "pruned.onnx", "plan.json", "report.md", "report.json", "report.png")


def optimize(
    model: str | os.PathLike[str],
    outdir: str | os.PathLike[str] | None,
    calib: str | os.PathLike[str],
    options: OptimizeOptions | None = None,
    *,
    eval_data: str | os.PathLike[str] | None = None,
    data_options: DataOptions | None = None,
    input_shapes: Any = None,
    progress: Progress | None = None,
    command: str = "",
) -> OptimizeResult:
    """`onnxslim optimize`: search, measure, choose (module docstring) and, with `outdir`, write every output
    there together (or none). The result lists the files written."""
    if outdir is not None:
        check_outdir(outdir, model, prune=(options or OptimizeOptions()).prune)
    result, models = search_and_measure(
        model, calib, options, eval_data=eval_data, data_options=data_options, input_shapes=input_shapes,
        progress=progress, command=command,
    )
    if outdir is not None:
        result = write_outputs(result, models, outdir, source=model)
    return result


def check_outdir(outdir: str | os.PathLike[str], source: str | os.PathLike[str], *, prune: bool) -> Path:
    """Make the output folder and check every file `optimize` may write there, before any work."""
    from onnxslim.io import check_output_path

    folder = Path(outdir)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file; the output of optimize is a folder")
    if not folder.exists():  # made when the outputs are written, so a failed run leaves nothing behind
        check_output_path(folder, sources=[source])  # its parent exists and can be written to
        return folder
    for name in OUTPUT_FILES:
        if prune or name not in ("pruned.onnx", "plan.json"):
            check_output_path(folder / name, sources=[source])
    return folder


def write_outputs(
    result: OptimizeResult, models: dict[str, onnx.ModelProto], outdir: str | os.PathLike[str], *, source: str | os.PathLike[str]
) -> OptimizeResult:
    """Validate and write the models, the plan and the reports into `outdir`, all together or none."""
    from onnxslim.io import staged_outputs, write_validated
    from onnxslim.prune import save_plan
    from onnxslim.report import optimize_json, plan_record, plot_optimize, render_optimize, to_json

    folder = Path(outdir)
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot make the output folder {folder}: {e.strerror or e}") from e
    shapes: dict[str, tuple[int, ...]] = {}
    if result.prune is not None:
        shapes = dict(result.prune.analysis_shapes)
    elif result.quantize is not None:
        shapes = dict(result.quantize.timing_shapes)
    files = list(models)
    with staged_outputs() as stage:
        for name, proto in models.items():
            write_validated(proto, folder / name, source=source, input_shapes=shapes, stage=stage)
        if result.prune is not None:
            save_plan(folder / "plan.json", result.prune.plan, result.prune.groups, result.prune.model_sha256,
                      plan_record(result.prune), stage)
            files.append("plan.json")
        files += ["report.md", "report.json"]
        picture = plot_optimize(result)
        if picture is not None:
            files.append("report.png")
        result = replace(result, files=tuple(files), outdir=str(folder))
        stage.add_text(render_optimize(result, markdown=True) + "\n", folder / "report.md", sources=[source])
        stage.add_text(to_json(optimize_json(result, str(folder))) + "\n", folder / "report.json", sources=[source])
        if picture is not None:
            stage.add_bytes(picture, folder / "report.png", sources=[source])
    for stale in set(OUTPUT_FILES) - set(files):  # an earlier run's outputs this one did not make
        (folder / stale).unlink(missing_ok=True)
    return result


def search_and_measure(
    model: str | os.PathLike[str],
    calib: str | os.PathLike[str],
    options: OptimizeOptions | None = None,
    *,
    eval_data: str | os.PathLike[str] | None = None,
    data_options: DataOptions | None = None,
    input_shapes: Any = None,
    progress: Progress | None = None,
    command: str = "",
) -> tuple[OptimizeResult, dict[str, onnx.ModelProto]]:
    """Search, measure and choose (module docstring), writing nothing: the result and the models to write
    (file name → model)."""
    started = time.perf_counter()
    options = options or OptimizeOptions()
    data_options = data_options or DataOptions()
    loaded = load_model(model)
    calib_data = open_dataset(calib, loaded.model, data_options)
    evaluation = open_dataset(eval_data, loaded.model, data_options) if eval_data is not None else None
    threads = options.threads or physical_cores()
    judge = _Judge(loaded.model, calib_data, evaluation, threads, remember=options.max_trials + 2)
    budget = default_budget(options, judge.labelled)
    cpu = choose_for_cpu(detect_cpu(), None)
    trials: list[Trial] = []
    notes: list[str] = [judge.note] if judge.note else []
    pruned: PruneResult | None = None
    quantized: QuantizeResult | None = None

    # a searched level is judged with half the budget (int8 spends the rest); a given --target-macs with all
    level_budget = budget if options.target_macs is not None else _half(budget)

    curves = _curves(loaded, options, calib_data, input_shapes, progress, judge.calibration_samples) if options.prune else None

    def level(keep: float) -> tuple[PruneResult, Trial]:
        begin = time.perf_counter()
        result = _prune(loaded, keep, options, calib_data, input_shapes, progress, curves, judge.calibration_samples)
        check, _, _ = judge(result.model, level_budget)
        trial = Trial(keep, result.macs_after / result.macs_before, check.score, check.drop, check.met,
                      seconds=time.perf_counter() - begin)
        logger.info("trial: keep %.3f of the MACs → %s", keep, "passes" if check.met else check.why)
        return result, trial

    def finish(result: PruneResult | None, trial: Trial | None) -> tuple[QuantizeResult | None, Trial | None]:
        if not options.quantize:
            return None, trial
        begin = time.perf_counter()
        source = result.model if result is not None else loaded.model
        q = _quantize(source, calib_data, evaluation, budget, options, progress)
        check, _, _ = judge(q.model, budget)
        if trial is None:
            return q, None
        return q, Trial(
            trial.target_macs, trial.macs_kept, trial.pruned_score, trial.pruned_drop, trial.pruned_met,
            q.quantized, check.score, check.drop, check.met, None, trial.seconds + time.perf_counter() - begin,
        )

    if not options.prune:
        search = "no pruning: int8 only"
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
        search = (f"bisection on the MACs kept ({LOWEST_KEEP:g} to 1), each level's pruned model judged with half "
                  f"the budget, then int8 on the best; at most {options.max_trials} trials")
        pruned, quantized, trials = _search_budget(options, level, finish, budget)
    if pruned is None and options.prune and options.target_speedup is None:
        notes.append("no pruning level met the budget" + ("; int8 was tried on the original" if options.quantize else ""))
    result, files = _measure(
        loaded, calib_data, eval_data if eval_data is not None else calib, data_options, options, budget, judge,
        pruned, quantized, trials, cpu, threads, search, notes, started, command,
    )
    return result, files


def _search_budget(
    options: OptimizeOptions,
    level: Callable[[float], tuple[PruneResult, Trial]],
    finish: Callable[[PruneResult | None, Trial | None], tuple[QuantizeResult | None, Trial | None]],
    budget: AccuracyBudget,
) -> tuple[PruneResult | None, QuantizeResult | None, list[Trial]]:
    trials: list[Trial] = []
    passed: list[tuple[float, PruneResult, int]] = []  # (keep, result, index into trials)
    low, high = LOWEST_KEEP, 1.0  # the answer lies in [low, high]: high passes (nothing pruned)
    levels = max(options.max_trials - 1, 1) if options.quantize else options.max_trials
    for _ in range(levels):
        keep = round((low + high) / 2, 3)
        result, trial = level(keep)
        repeat = any(abs(t.macs_kept - trial.macs_kept) < 1e-9 for t in trials)
        trials.append(trial)
        if repeat:  # rounding to --round-to gives the same model as a level already tried: resolution reached
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
        if final.final_met or not (quantized is not None and quantized.quantized):
            return result, quantized, trials  # met with int8, or int8 was not kept: the pruned fp32 stands
    if passed:
        _, result, _ = max(passed, key=lambda p: p[0])  # the least pruned level, its int8 did not hold
        return result, quantized, trials
    quantized, _ = finish(None, None)
    return None, quantized, trials


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
        quantized, final = finish(result, trial)
        final = final or trial
        final_model = quantized.model if quantized is not None else result.model
        speedup = _speedup(loaded.model, final_model, options)
        trials.append(Trial(
            final.target_macs, final.macs_kept, final.pruned_score, final.pruned_drop, final.pruned_met,
            final.quantized, final.final_score, final.final_drop, final.final_met, speedup, final.seconds,
        ))
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
    options: OptimizeOptions, budget: AccuracyBudget, judge: _Judge, pruned: PruneResult | None,
    quantized: QuantizeResult | None, trials: list[Trial], cpu: CpuChoice, threads: int, search: str,
    notes: list[str], started: float, command: str,
) -> tuple[OptimizeResult, dict[str, Any]]:
    """The final interleaved measurement, the choice, and the files to write."""
    models: dict[str, onnx.ModelProto] = {"original": loaded.model}
    if pruned is not None:
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
    met = chosen == "original" or checks[chosen].met
    result = OptimizeResult(
        chosen=chosen, reason=reason, budget=budget, budget_met=met, candidates=candidates, trials=tuple(trials),
        prune=pruned, quantize=quantized, cpu=cpu, data=judge.split.description, threads=threads,
        seconds=time.perf_counter() - started, command=command, max_trials=options.max_trials, search=search,
        notes=tuple(notes),
    )
    files: dict[str, Any] = {"optimized.onnx": models[chosen]}
    if pruned is not None:
        files["pruned.onnx"] = pruned.model
    return result, files


def machine() -> str:
    """The CPU this ran on, for the report."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical cores"


# ------------------------------------------------------------------------------------------------ sweep


@dataclass(frozen=True)
class SweepPoint:
    """One MAC budget of a sweep: what was kept and how the model did in the shared measurement."""

    target_macs: float
    macs_kept: float
    quantized: bool
    bench: ModelBench
    check: BudgetCheck | None


@dataclass(frozen=True)
class SweepResult:
    points: tuple[SweepPoint, ...]
    original: ModelBench
    budget: AccuracyBudget
    data: str
    threads: int
    seconds: float


def sweep(
    model: str | os.PathLike[str],
    calib: str | os.PathLike[str],
    targets: Sequence[float],
    *,
    eval_data: str | os.PathLike[str] | None = None,
    quantize: bool = False,
    options: OptimizeOptions | None = None,
    data_options: DataOptions | None = None,
    input_shapes: Any = None,
    progress: Progress | None = None,
) -> SweepResult:
    """The trade-off before choosing: the model pruned (and with `quantize`, int8) at every MAC fraction in
    `targets`, all measured side by side with the original in one interleaved run."""
    started = time.perf_counter()
    options = options or OptimizeOptions()
    data_options = data_options or DataOptions()
    if not targets or any(not 0 < t <= 1 for t in targets):
        raise UsageError(f"--target-macs fractions must be in (0, 1], not {list(targets)}")
    loaded = load_model(model)
    calib_data = open_dataset(calib, loaded.model, data_options)
    evaluation = open_dataset(eval_data, loaded.model, data_options) if eval_data is not None else None
    threads = options.threads or physical_cores()
    judge = _Judge(loaded.model, calib_data, evaluation, threads)
    budget = default_budget(options, judge.labelled)
    built: list[tuple[float, float, bool, onnx.ModelProto]] = []
    curves = _curves(loaded, options, calib_data, input_shapes, progress, judge.calibration_samples)
    for target in sorted(set(targets), reverse=True):
        if target >= 1.0:
            model_at, kept = loaded.model, 1.0
        else:
            result = _prune(loaded, target, options, calib_data, input_shapes, progress, curves, judge.calibration_samples)
            model_at, kept = result.model, result.macs_after / result.macs_before
        is_int8 = False
        if quantize:
            q = _quantize(model_at, calib_data, evaluation, budget, options, progress)
            model_at, is_int8 = q.model, q.quantized
        built.append((target, kept, is_int8, model_at))
    checks = [judge(m, budget)[0] for *_, m in built]
    with tempfile.TemporaryDirectory(prefix="onnxslim-sweep-") as folder:
        paths = [save_model(loaded.model, Path(folder) / "original.onnx")]
        paths += [save_model(m, Path(folder) / f"macs_{t:g}.onnx") for t, _, _, m in built]
        bench = benchmark(
            paths, data=eval_data if eval_data is not None else calib, data_options=data_options,
            options=BenchOptions(threads=threads, warmup=5, repeat=options.repeat, memory=False),
        )
    points = tuple(
        SweepPoint(t, kept, q, row, check)
        for (t, kept, q, _), row, check in zip(built, bench.models[1:], checks, strict=True)
    )
    return SweepResult(points, bench.models[0], budget, judge.split.description, threads, time.perf_counter() - started)

