"""evaluate.py: the hold-out policies, the evaluator against a perturbed copy, paired top-1 and the budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import ModelBuilder

from onnxslim.calib import open_dataset
from onnxslim.evaluate import (
    AccuracyBudget,
    Evaluator,
    Paired,
    budget_resolution_note,
    check_budget,
    hold_out_every,
    hold_out_tail,
)
from onnxslim.metrics import Accuracy, Fidelity


def _classifier(tmp_path: Path, samples: int = 50, batch: int = 10) -> tuple[onnx.ModelProto, Path]:
    b = ModelBuilder((3, 8, 8), seed=2)
    y = b.relu(b.conv(b.input, 8, 3))
    pooled = b.op("Flatten", [b.op("GlobalAveragePool", [y])], axis=1)
    model = b.build(b.gemm(pooled, 4))
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, input=rng.standard_normal((samples, 3, 8, 8)).astype(np.float32),
             labels=rng.integers(0, 4, samples))
    return model, path


def test_hold_out_every_fifth_sample_and_the_tail_of_batches(tmp_path: Path) -> None:
    model, path = _classifier(tmp_path, samples=50)
    from onnxslim.calib import DataOptions

    data = open_dataset(path, model, DataOptions(batch=10))
    every = hold_out_every(data, None)
    rows = np.concatenate([batch.rows + 10 * i for i, batch in enumerate(every.batches())])
    assert every.samples == 10 and list(rows) == [4, 9, 14, 19, 24, 29, 34, 39, 44, 49]
    limited = hold_out_every(data, None, max_samples=23)
    assert limited.samples == 4 and sum(len(b.rows) for b in limited.batches()) == 4
    tail = hold_out_tail(data, None)
    assert (tail.calibration_batches, tail.samples, tail.skip) == (4, 10, 4)
    assert sum(len(b.rows) for b in tail.batches()) == 10
    assert "last 1 of 5 batches" in tail.description


def test_the_evaluator_compares_every_output_and_counts_paired_decisions(tmp_path: Path) -> None:
    model, path = _classifier(tmp_path)
    data = open_dataset(path, model)
    evaluator = Evaluator(model, hold_out_tail(data, data))
    same = evaluator.compare(model)
    assert same.fidelities[0].cosine == pytest.approx(1.0)
    assert same.paired is not None and (same.paired.worse, same.paired.better) == (0, 0)
    assert same.accuracy_original == same.accuracy
    noisy = onnx.ModelProto()
    noisy.CopyFrom(model)
    gemm = next(t for t in noisy.graph.initializer if t.dims == [4, 8] or t.dims == [8, 4])
    weights = onnx.numpy_helper.to_array(gemm)
    flipped = onnx.numpy_helper.from_array(-weights, gemm.name)  # the classifier's decisions reversed
    gemm.CopyFrom(flipped)
    other = evaluator.compare(noisy)
    assert other.paired is not None and other.paired.samples == 50
    assert other.accuracy is not None and other.accuracy_original is not None
    measured = 100 * (other.accuracy_original.top1 - other.accuracy.top1)
    assert other.paired.drop == pytest.approx(measured)
    assert other.paired.worse + other.paired.better > 0
    assert evaluator.runs == 2


def test_a_top1_budget_is_met_only_when_its_upper_bound_is_within_it() -> None:
    good = Fidelity(0.9999, 1.0, 0.1, 40.0, None, 1000, worst_channel_cosine=0.999, worst_channel=0, channel_axis=1)
    fp32, int8 = Accuracy(0.987, None, 1000), Accuracy(0.984, None, 1000)
    budget = AccuracyBudget(max_drop=0.5)
    assert check_budget(budget, good, fp32, int8).met  # 0.3 pt measured: the point estimate passes
    noisy = check_budget(budget, good, fp32, int8, Paired(1000, worse=5, better=2))
    assert not noisy.met and noisy.drop_bound is not None and noisy.drop_bound > 0.5
    assert "at 90% confidence on 1000 samples" in noisy.why and noisy.samples == 1000
    clean = check_budget(budget, good, fp32, Accuracy(0.985, None, 1000), Paired(1000, worse=2, better=0))
    assert clean.met and clean.drop_bound == pytest.approx(0.2 + 1.2816 * np.sqrt(2) / 10)
    assert Paired(200, 0, 0).drop_bound() == 0.0


def test_a_budget_smaller_than_the_evaluation_set_resolves_is_said() -> None:
    note = budget_resolution_note(AccuracyBudget(max_drop=0.5), 200)
    assert note is not None and "1.0 of the 200 evaluation samples" in note and "1000 samples" in note
    assert budget_resolution_note(AccuracyBudget(max_drop=0.5), 1000) is None
    assert budget_resolution_note(AccuracyBudget(min_fidelity=0.99), 10) is None


def _strings(changed: int, samples: int, *, top1: float = 0.9, cosine: float = 0.5) -> Fidelity:
    """A sequence output's fidelity: `changed` of `samples` strings changed; frames and cosine as given."""
    return Fidelity(
        cosine, 1.0, 0.1, 20.0, top1, samples, worst_channel_cosine=0.3, worst_channel=5, channel_axis=2,
        class_axis=2, strings_unchanged=1 - changed / samples, strings_changed=changed, time_axis=0,
    )


def test_a_sequence_budget_reads_the_strings_with_the_confidence_their_count_allows() -> None:
    """The default budget on a CTC output: 99% of strings unchanged, at the lower confidence bound -- the
    cosine and per-frame figures (low here) do not decide."""
    default = AccuracyBudget()
    unchanged = check_budget(default, _strings(0, 60), None, None)
    assert unchanged.met and unchanged.score == 1.0 and unchanged.score_name == "strings unchanged"
    assert unchanged.samples == 60 and unchanged.score_label == "strings unchanged 1.000 (n=60)"
    one = check_budget(default, _strings(1, 60, top1=0.999, cosine=0.9999), None, None)
    assert not one.met and one.score == pytest.approx(59 / 60) and "1 of 60 changed" in one.why
    # 1 in 100 is 99% measured, but not at 90% confidence: on 1,000 samples 6 changed strings pass, 7 do not
    assert not check_budget(default, _strings(1, 100), None, None).met
    six, seven = check_budget(default, _strings(6, 1000), None, None), check_budget(default, _strings(7, 1000), None, None)
    assert six.met and not seven.met
    assert six.score_bound == pytest.approx(1 - (6 + 1.2816 * np.sqrt(6)) / 1000)
    assert seven.score_bound is not None and seven.score_bound < 0.99 < seven.score
    # a looser budget the user asked for, and optimize's half budget for its pruning levels
    assert check_budget(AccuracyBudget(min_fidelity=0.9), _strings(2, 60), None, None).met
    assert not check_budget(AccuracyBudget(min_fidelity=0.995), _strings(4, 1000), None, None).met
