"""Judging a candidate model against the original on held-out data: which samples judge (the hold-out
policies), the original's outputs on them (computed once, cached), each candidate's fidelity and top-1, and
the accuracy budget with its check.

Every command that keeps or refuses a model by its accuracy reads this module: `prune`'s held-out comparison
before and after recovery, `prune --allocate sensitivity`'s trials, `quantize`'s guards, `optimize`'s trials.

**Hold-out policies.** Two, because they hold out for different readers:
* `hold_out_tail`: the last `fraction` (20 %) of the calibration *batches*, or all of `--eval` when given.
  What `quantize` and `optimize` judge on: whole batches, because onnxruntime's calibrators read whole
  batches, and the tail so that the batches before it can calibrate (and, in optimize, prune) unseen by
  the judge.
* `hold_out_every`: every fifth calibration *sample* (`HOLDOUT_EVERY`), or `--eval` when given. What
  `prune` compares on: recovery fits each layer on the other four fifths and keeps a refit only when it
  is better on the held fifth, so the comparison of the whole model must use the same fifth; interleaved
  rather than the tail so that data ordered by class or by source is held out evenly.

**Outputs.** Every output is judged unless told which (a sentence encoder's embedding is its second
output); an output's batch axis is found by probing, not assumed (`metrics.layout_of`), and only the real
rows of a batch are compared (padding of fixed-batch models, rows held for the fit). Accuracy with labels
reads the first output, when it is a classifier's (one class position per sample).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxslim.calib import Batch, Dataset, first_samples
from onnxslim.errors import DataError, UsageError, ValidationError, first_line
from onnxslim.metrics import (
    Accuracy,
    AccuracyMeter,
    Fidelity,
    FidelityMeter,
    OutputLayout,
    has_one_position,
    layout_of,
)
from onnxslim.progress import Progress
from onnxslim.runtime import open_session

__all__ = [
    "DEFAULT_MIN_FIDELITY",
    "HOLDOUT_EVERY",
    "HOLDOUT_FRACTION",
    "DROP_CONFIDENCE",
    "AccuracyBudget",
    "BudgetCheck",
    "Paired",
    "budget_resolution_note",
    "Comparison",
    "EvalBatch",
    "Evaluator",
    "HeldOut",
    "check_budget",
    "hold_out_every",
    "hold_out_tail",
]

HOLDOUT_FRACTION = 0.2  # hold_out_tail: the last fifth of the calibration batches
# A top-1 budget is met when the drop is within it at this one-sided confidence (z standard errors of the
# paired difference): on 1,000 samples a 0.5 pt budget then admits about 2 net changed decisions, not 5.
DROP_CONFIDENCE = 0.90
DROP_Z = 1.2816
RESOLVABLE_SAMPLES = 5  # a top-1 budget worth fewer samples of the evaluation set than this draws a warning
HOLDOUT_EVERY = 5  # hold_out_every: sample i is held out when i % 5 == 4

# Cosine 0.99 of the worst channel: on the reference models int8 that keeps accuracy within 0.3 pt stays
# above 0.999 on average and above 0.99 on every channel (benchmarks/int8_accuracy.py); a collapsed channel
# gives about 0, a LayerNorm broken by int8 0.9 and below. It is a floor that plain int8 passes on healthy
# models and that broken outputs cannot.
DEFAULT_MIN_FIDELITY = 0.99


@dataclass(frozen=True)
class AccuracyBudget:
    """How close int8 must stay to fp32. `max_drop` in points of top-1 (0.3 = 0.3 pt, needs labels);
    `min_fidelity` on `Fidelity.score`. With neither, `min_fidelity` is `DEFAULT_MIN_FIDELITY`.

    On a sequence of classes (a CTC recognizer's output: `Fidelity.reads_strings`) `min_fidelity` is the
    share of samples whose greedy-decoded string must stay unchanged (default: 99% of the strings), read
    with the confidence its sample count allows, as a top-1 budget is (`check_budget`)."""

    max_drop: float | None = None
    min_fidelity: float | None = None

    def __post_init__(self) -> None:
        if self.max_drop is not None and not 0 <= self.max_drop <= 100:
            raise UsageError(f"--max-drop is in points of top-1 accuracy, 0 to 100, not {self.max_drop}")
        if self.min_fidelity is not None and not -1 <= self.min_fidelity <= 1:
            raise UsageError(f"--min-fidelity is a cosine, -1 to 1, not {self.min_fidelity}")

    @property
    def resolved(self) -> AccuracyBudget:
        if self.max_drop is None and self.min_fidelity is None:
            return AccuracyBudget(min_fidelity=DEFAULT_MIN_FIDELITY)
        return self

    @property
    def label(self) -> str:
        budget = self.resolved
        parts = []
        if budget.max_drop is not None:
            parts.append(f"top-1 drop <= {budget.max_drop:g} pt")
        if budget.min_fidelity is not None:
            parts.append(
                f"cosine (mean and worst channel) >= {budget.min_fidelity:g}, or strings unchanged on sequence outputs"
            )
        return " and ".join(parts) + (" (default)" if self.max_drop is None and self.min_fidelity is None else "")


@dataclass(frozen=True)
class BudgetCheck:
    """One candidate against the budget."""

    met: bool
    score: float  # fidelity score (higher is better)
    drop: float | None  # fp32 top-1 minus int8 top-1, in points, when labels were given
    why: str  # what missed, or "" when met
    score_name: str = "cosine"  # what `score` is: "cosine", or "top-1 agreement" on an output whose channels are classes
    samples: int | None = None  # the evaluation samples the verdict rests on
    drop_bound: float | None = None  # with paired counts: the drop's one-sided upper bound (DROP_CONFIDENCE), points
    # on a sequence output: the share of unchanged strings' one-sided lower bound (DROP_CONFIDENCE), what the
    # budget is checked against (`score` is the share measured)
    score_bound: float | None = None

    @property
    def score_label(self) -> str:
        """The score as reports print it: "cosine 0.9987", "strings unchanged 0.990 (n=60)"."""
        if self.score_name == "strings unchanged":
            return f"{self.score_name} {self.score:.3f} (n={self.samples})"
        return f"{self.score_name} {self.score:.4f}"


@dataclass(frozen=True)
class Paired:
    """Top-1 of two models on the same labelled samples, sample by sample: the discordant pairs are what a
    drop is made of (`worse`: the original right and the candidate wrong; `better`: the reverse)."""

    samples: int
    worse: int
    better: int

    @property
    def drop(self) -> float:
        """The measured drop, in points."""
        return 100 * (self.worse - self.better) / self.samples if self.samples else math.nan

    def drop_bound(self, z: float = DROP_Z) -> float:
        """The drop's one-sided upper confidence bound, in points: the paired difference plus `z` standard
        errors, the variance of a paired difference of proportions being about (worse + better) / n²."""
        if not self.samples:
            return math.nan
        return 100 * (self.worse - self.better + z * math.sqrt(self.worse + self.better)) / self.samples


def budget_resolution_note(budget: AccuracyBudget, samples: int) -> str | None:
    """A warning when a top-1 budget is smaller than the evaluation set can resolve: under
    `RESOLVABLE_SAMPLES` samples' worth of the set, one changed decision decides the verdict."""
    budget = budget.resolved
    if budget.max_drop is None or samples <= 0:
        return None
    worth = budget.max_drop / 100 * samples
    if worth >= RESOLVABLE_SAMPLES:
        return None
    needed = math.ceil(RESOLVABLE_SAMPLES * 100 / budget.max_drop) if budget.max_drop > 0 else None
    return (
        f"a top-1 budget of {budget.max_drop:g} pt is {worth:.1f} of the {samples} evaluation samples: the verdict "
        "turns on one or two decisions"
        + (f"; give at least {needed} samples (--eval) for it to mean something" if needed else "")
    )


def check_budget(
    budget: AccuracyBudget,
    fidelity: Fidelity,
    accuracy_fp32: Accuracy | None,
    accuracy_int8: Accuracy | None,
    paired: Paired | None = None,
) -> BudgetCheck:
    """Pure: whether `fidelity` and the accuracies meet `budget`. With `paired` counts, a top-1 budget is met
    only when the drop's upper confidence bound is within it (`Paired.drop_bound`): a drop measured on few
    samples does not pass on luck. On a sequence output the fidelity budget reads the strings the same way:
    the changed strings are the discordant pairs (none can get better: the reference is the truth), and the
    share unchanged must hold at its lower confidence bound -- on 100 samples a 99% budget admits no
    changed string, on 1,000 about 6."""
    budget = budget.resolved
    misses = []
    drop = bound = None
    samples = paired.samples if paired is not None else (accuracy_int8.samples if accuracy_int8 is not None else None)
    if accuracy_fp32 is not None and accuracy_int8 is not None:
        drop = 100 * (accuracy_fp32.top1 - accuracy_int8.top1)
    if budget.max_drop is not None:
        if drop is None:
            raise UsageError("--max-drop needs labels in the evaluation data (or use --min-fidelity)")
        if paired is not None and paired.samples:
            bound = paired.drop_bound()
            if bound > budget.max_drop + 1e-9:
                misses.append(
                    f"top-1 drops {drop:.2f} pt, up to {bound:.2f} pt at {DROP_CONFIDENCE:.0%} confidence on "
                    f"{paired.samples} samples ({paired.worse} worse, {paired.better} better; budget {budget.max_drop:g})"
                )
        elif drop > budget.max_drop + 1e-9:
            misses.append(f"top-1 drops {drop:.2f} pt (budget {budget.max_drop:g})")
    score = fidelity.score if math.isfinite(fidelity.score) else -1.0
    score_bound = None
    if fidelity.reads_strings:
        assert fidelity.strings_changed is not None
        strings = Paired(fidelity.samples, fidelity.strings_changed, 0)
        score_bound = 1.0 - strings.drop_bound() / 100
        samples = fidelity.samples if samples is None else samples
    if budget.min_fidelity is not None and score_bound is not None:
        if score_bound < budget.min_fidelity - 1e-9:
            misses.append(
                f"strings unchanged {score:.3f} ({fidelity.strings_changed} of {fidelity.samples} changed), at least "
                f"{score_bound:.3f} at {DROP_CONFIDENCE:.0%} confidence (budget {budget.min_fidelity:g})"
            )
    elif budget.min_fidelity is not None and score < budget.min_fidelity:
        where = "mean cosine"
        if fidelity.decides_classes and (fidelity.top1_agreement or 0.0) < fidelity.cosine:
            where = f"top-1 agreement (axis {fidelity.class_axis})"
        elif not fidelity.decides_classes and fidelity.worst_channel_cosine is not None and fidelity.worst_channel_cosine < fidelity.cosine:
            where = f"cosine of channel {fidelity.worst_channel} (axis {fidelity.channel_axis})"
        misses.append(f"{where} {score:.4f} (budget {budget.min_fidelity:g})")
    if samples is None and fidelity.samples:  # a fidelity verdict rests on the samples compared
        samples = fidelity.samples
    return BudgetCheck(not misses, score, drop, "; ".join(misses), fidelity.score_name, samples, bound, score_bound)


# --------------------------------------------------------------------------------- which nodes hurt


# ------------------------------------------------------------------------------------ hold-out policies


@dataclass(frozen=True)
class EvalBatch:
    """One batch as fed to the model and the rows of it that are judged (padding and rows kept for
    fitting are not); `labels` are the judged rows' labels."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    rows: np.ndarray

    @classmethod
    def whole(cls, batch: Batch) -> EvalBatch:
        return cls(batch.feeds, batch.labels, np.arange(batch.size))


@dataclass(frozen=True)
class HeldOut:
    """The samples that judge a model (a hold-out policy's choice) and what is left for calibration."""

    data: Dataset
    description: str
    samples: int  # judged samples
    calibration_batches: int  # leading batches of the calibration data left to calibrate on (hold_out_tail)
    skip: int = 0  # leading batches of `data` that are not judged
    every: int | None = None  # judge every n-th sample only
    max_samples: int | None = None  # of `data` read at most
    note: str | None = None

    @property
    def labelled(self) -> bool:
        return self.data.has_labels

    def batches(self) -> Iterator[EvalBatch]:
        seen = 0
        for index, batch in enumerate(first_samples(self.data, self.max_samples)):
            if index < self.skip:
                seen += batch.size
                continue
            rows = np.arange(batch.size)
            if self.every is not None:
                rows = rows[(seen + rows) % self.every == self.every - 1]
            seen += batch.size
            if len(rows):
                yield EvalBatch(batch.feeds, None if batch.labels is None else batch.labels[rows], rows)


def hold_out_tail(calib: Dataset, eval_data: Dataset | None, fraction: float = HOLDOUT_FRACTION) -> HeldOut:
    """`eval_data` judges when given (every calibration batch calibrates); else the last `fraction` of the
    calibration batches (module docstring)."""
    if eval_data is not None:
        return HeldOut(
            eval_data, f"{eval_data.description} ({eval_data.num_samples} samples)", eval_data.num_samples,
            calib.num_batches,
        )
    held = int(calib.num_batches * fraction)
    if not held:
        return HeldOut(
            calib, f"{calib.description} (the calibration data itself: too few batches to hold any out)",
            calib.num_samples, calib.num_batches,
            note="fidelity is measured on the calibration data: give --eval or more data for a held-out measure",
        )
    kept = calib.num_batches - held
    held_samples = calib.num_samples - kept * calib.batch_size
    return HeldOut(
        calib,
        f"last {held} of {calib.num_batches} batches of {calib.description} ({held_samples} samples, not used "
        "for calibration)",
        held_samples, kept, skip=kept,
    )


def hold_out_every(
    calib: Dataset, eval_data: Dataset | None, max_samples: int | None = None, every: int = HOLDOUT_EVERY
) -> HeldOut:
    """`eval_data` judges when given; else every `every`-th of the first `max_samples` calibration samples,
    the ones recovery holds out of its fit (module docstring)."""
    if eval_data is not None:
        samples = min(eval_data.num_samples, max_samples or eval_data.num_samples)
        return HeldOut(eval_data, eval_data.description, samples, calib.num_batches, max_samples=max_samples)
    used = min(calib.num_samples, max_samples or calib.num_samples)
    return HeldOut(
        calib, f"every {every}th sample of {calib.description} (held out of recovery)", used // every,
        calib.num_batches, every=every, max_samples=max_samples,
    )


# ------------------------------------------------------------------------------------------- evaluator


@dataclass(frozen=True)
class Comparison:
    """A candidate against the original on the held-out data: each judged output's fidelity (in the order
    of `Evaluator.outputs`) and, with labels on a classifier's output, both models' accuracy."""

    fidelities: tuple[Fidelity, ...]
    accuracy_original: Accuracy | None
    accuracy: Accuracy | None
    paired: Paired | None = None  # with labels: the samples each model got right that the other did not

    @property
    def worst(self) -> int:
        """The index of the output the budget reads: the lowest fidelity score."""
        return min(range(len(self.fidelities)), key=lambda i: self.fidelities[i].score)


class Evaluator:
    """Compares candidates with `original` on `held` data, every output of `outputs` (default: all) in one
    pass per candidate. The original's outputs are kept while they fit in `cache_bytes`, so each candidate
    costs one pass of its own; each output's layout is found on the first batch."""

    def __init__(
        self,
        original: onnx.ModelProto,
        held: HeldOut,
        outputs: Sequence[str] | None = None,
        *,
        threads: int | None = None,
        progress: Progress | None = None,
        cache_bytes: int = 256 << 20,
    ) -> None:
        self.original, self.held, self._threads, self._progress = original, held, threads, progress
        self.outputs = list(outputs) if outputs is not None else [o.name for o in original.graph.output]
        try:
            self._reference = open_session(original, threads)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ValidationError(f"a model does not load in onnxruntime: {first_line(e)}") from e
        self._cache: list[list[np.ndarray] | None] = []
        self._cache_left = cache_bytes
        self.layouts: list[OutputLayout] | None = None
        self.labelled = held.labelled
        self.note: str | None = None
        self.runs = 0

    # the original's side

    def ensure_layouts(self) -> list[OutputLayout]:
        """Each output's layout (found on the first judged batch if no comparison has yet)."""
        if self.layouts is None:
            self._reference_outputs(0, next(iter(self.held.batches())))
        assert self.layouts is not None
        return self.layouts

    def rows(self, arrays: Sequence[np.ndarray], batch: EvalBatch | Batch) -> list[np.ndarray]:
        """The judged rows of each output, on its own batch axis (a whole output when it has none)."""
        layouts = self.ensure_layouts()
        rows = batch.rows if isinstance(batch, EvalBatch) else np.arange(batch.size)
        fed = len(next(iter(batch.feeds.values())))
        chosen = []
        for array, layout in zip(arrays, layouts, strict=True):
            axis = layout.batch_axis
            if axis is not None and array.ndim > axis and array.shape[axis] == fed and len(rows) < fed:
                array = np.take(array, rows, axis=axis)
            chosen.append(array)
        return chosen

    def _run(self, session: object, batch: EvalBatch, number: int, what: str) -> list[np.ndarray]:
        try:
            return [np.asarray(a) for a in session.run(self.outputs, dict(batch.feeds))]  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise DataError(f"{what} fails on evaluation batch {number + 1}: {first_line(e)}") from e

    def _probe(self, output: str) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
        """Runs the original for one output on other feeds (`layout_of` resizes the batch to find its axis)."""
        return lambda feeds: self._reference.run([output], dict(feeds))[0]

    def _reference_outputs(self, index: int, batch: EvalBatch) -> list[np.ndarray]:
        if index < len(self._cache) and self._cache[index] is not None:
            cached = self._cache[index]
            assert cached is not None
            return cached
        produced = self._run(self._reference, batch, index, "the model")
        if self.layouts is None:
            self.layouts = [
                layout_of(self.original, name, want, batch.feeds, self._probe(name))
                for name, want in zip(self.outputs, produced, strict=True)
            ]
            if self.labelled and not has_one_position(np.shape(produced[0]), self.layouts[0]):
                self.labelled = False
                self.note = (
                    f"labels ignored: output {self.outputs[0]!r} of shape {list(np.shape(produced[0]))} is not a "
                    "classifier's (one class score per sample)"
                )
        wants = self.rows(produced, batch)
        if index == len(self._cache):
            size = sum(want.nbytes for want in wants)
            keep = size <= self._cache_left
            self._cache.append(wants if keep else None)
            self._cache_left -= size if keep else 0
        return wants

    def accuracy_original(self) -> Accuracy | None:
        """The original's top-1 on the held-out data (None without labels on a classifier's output)."""
        self.ensure_layouts()
        if not self.labelled:
            return None
        assert self.layouts is not None
        meter = AccuracyMeter(self.layouts[0])
        for index, batch in enumerate(self.held.batches()):
            if batch.labels is not None:
                meter.update(self._reference_outputs(index, batch)[0], batch.labels)
        return meter.result()

    # the candidate's side

    def compare(self, model: onnx.ModelProto, what: str = "the candidate model") -> Comparison:
        """`model` against the original: every judged output's fidelity, and top-1 of both with labels."""
        try:
            candidate = open_session(model, self._threads)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ValidationError(f"{what} does not load in onnxruntime: {first_line(e)}") from e
        fidelity_meters: list[FidelityMeter] | None = None
        accuracy_meters: tuple[AccuracyMeter, AccuracyMeter] | None = None
        total = max(self.held.samples, 1)
        done = worse = better = 0
        for index, batch in enumerate(self.held.batches()):
            wants = self._reference_outputs(index, batch)
            gots = self.rows(self._run(candidate, batch, index, what), batch)
            assert self.layouts is not None
            if fidelity_meters is None:
                fidelity_meters = [FidelityMeter(layout) for layout in self.layouts]
                if self.labelled:
                    accuracy_meters = (AccuracyMeter(self.layouts[0]), AccuracyMeter(self.layouts[0]))
            for meter, want, got in zip(fidelity_meters, wants, gots, strict=True):
                meter.update(want, got)
            if accuracy_meters is not None and batch.labels is not None:
                right = accuracy_meters[0].update(wants[0], batch.labels)
                got_right = accuracy_meters[1].update(gots[0], batch.labels)
                worse += int(np.sum(right & ~got_right))
                better += int(np.sum(~right & got_right))
            done += len(batch.rows)
            if self._progress is not None:
                self._progress("evaluating", min(done, total), total)
        self.runs += 1
        if fidelity_meters is None:
            raise DataError("no evaluation batch to measure fidelity on")
        fidelities = tuple(meter.result() for meter in fidelity_meters)
        if accuracy_meters is None:
            return Comparison(fidelities, None, None)
        original, candidate = accuracy_meters[0].result(), accuracy_meters[1].result()
        return Comparison(fidelities, original, candidate, Paired(candidate.samples, worse, better))
