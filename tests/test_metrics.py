"""Fidelity and accuracy on hand-made arrays whose answers are known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
from builders import two_output_classifier

from onnxslim.errors import DataError, UsageError
from onnxslim.metrics import (
    AccuracyMeter,
    FidelityMeter,
    OutputLayout,
    accuracy,
    fidelity,
    find_batch_axis,
    is_classifier_output,
    output_layout,
    select_output,
)
from onnxslim.report.format import to_jsonable

RNG = np.random.default_rng(0)


def test_identical_outputs() -> None:
    x = RNG.standard_normal((6, 10)).astype(np.float32)
    result = fidelity(x, x.copy())
    assert result.cosine == pytest.approx(1.0)
    assert (result.max_abs, result.mean_abs, result.top1_agreement, result.samples) == (0.0, 0.0, 1.0, 6)
    assert result.snr_db == math.inf
    assert to_jsonable(result)["snr_db"] is None  # inf is not JSON: it becomes null


def test_known_perturbation_gives_20_db() -> None:
    reference = np.ones((4, 10), np.float32)
    noise = np.where(np.arange(40).reshape(4, 10) % 2 == 0, 0.1, -0.1).astype(np.float32)
    result = fidelity(reference, reference + noise)
    # signal sum 40, noise sum 40 * 0.01 = 0.4 -> 10 log10(100) = 20 dB
    assert result.snr_db == pytest.approx(20.0, abs=1e-5)
    assert result.max_abs == pytest.approx(0.1, abs=1e-6) and result.mean_abs == pytest.approx(0.1, abs=1e-6)


def test_scaled_negated_and_orthogonal_outputs() -> None:
    x = RNG.standard_normal((5, 10))
    scaled = fidelity(x, 2 * x)
    assert scaled.cosine == pytest.approx(1.0) and scaled.snr_db == pytest.approx(0.0, abs=1e-9)
    assert scaled.top1_agreement == 1.0 and scaled.max_abs == pytest.approx(np.abs(x).max())
    negated = fidelity(x, -x)
    assert negated.cosine == pytest.approx(-1.0) and negated.top1_agreement == 0.0
    assert negated.snr_db == pytest.approx(10 * math.log10(1 / 4))
    orthogonal = fidelity(np.array([[1.0, 0.0], [0.0, 3.0]]), np.array([[0.0, 2.0], [5.0, 0.0]]))
    assert orthogonal.cosine == pytest.approx(0.0)


def test_zero_outputs() -> None:
    zeros = np.zeros((2, 3))
    assert fidelity(zeros, zeros).cosine == 1.0 and fidelity(zeros, zeros).snr_db == math.inf
    one_sided = fidelity(zeros, np.ones((2, 3)))
    assert one_sided.cosine == 0.0 and one_sided.snr_db == -math.inf


def test_top1_agreement_fraction() -> None:
    reference = np.eye(4, 10)
    candidate = reference.copy()
    candidate[3, 9] = 5.0  # only the last sample's argmax moves
    assert fidelity(reference, candidate).top1_agreement == pytest.approx(0.75)


def test_top1_agreement_only_for_classifier_outputs() -> None:
    maps = RNG.standard_normal((2, 3, 4, 4))
    assert fidelity(maps, maps).top1_agreement is None
    assert is_classifier_output((8, 1000, 1, 1)) and not is_classifier_output((8, 1)) and not is_classifier_output((8, 3, 4))


def test_streaming_equals_one_shot() -> None:
    reference = RNG.standard_normal((9, 10))
    candidate = reference + 0.05 * RNG.standard_normal((9, 10))
    meter = FidelityMeter()
    for start in (0, 4, 5):
        stop = {0: 4, 4: 5, 5: 9}[start]
        meter.update(reference[start:stop], candidate[start:stop])
    streamed, whole = meter.result(), fidelity(reference, candidate)
    for field in ("cosine", "max_abs", "mean_abs", "snr_db", "top1_agreement"):
        assert getattr(streamed, field) == pytest.approx(getattr(whole, field), rel=1e-12)
    assert streamed.samples == 9


def test_nan_and_shape_mismatch() -> None:
    candidate = np.ones((2, 3))
    candidate[1, 1] = np.nan
    assert math.isnan(fidelity(np.ones((2, 3)), candidate).max_abs)
    with pytest.raises(DataError, match="cannot be compared"):
        fidelity(np.ones((2, 3)), np.ones((2, 4)))
    assert FidelityMeter().result().samples == 0


def test_accuracy_top1_and_top5() -> None:
    logits = np.tile(np.arange(10, dtype=np.float32), (4, 1))  # class 9 highest, then 8, 7, 6, 5
    labels = np.array([9, 5, 4, 0])
    result = accuracy(logits, labels)
    assert (result.top1, result.top5, result.samples) == (0.25, 0.5, 4)


def test_accuracy_streams_and_top5_needs_more_than_5_classes() -> None:
    meter = AccuracyMeter()
    meter.update(np.eye(3, 10), np.array([0, 1, 0]))
    meter.update(np.eye(1, 10), np.array([0]))
    assert meter.result().top1 == pytest.approx(0.75)
    assert accuracy(np.eye(3, 5), np.array([0, 1, 2])).top5 is None


def test_accuracy_errors() -> None:
    with pytest.raises(DataError, match="label 10 is outside the output's 10 classes"):
        accuracy(np.eye(2, 10), np.array([0, 10]))
    with pytest.raises(DataError, match="classifier output"):
        accuracy(np.zeros((2, 3, 4)), np.array([0, 1]))
    with pytest.raises(DataError, match="integer class ids"):
        accuracy(np.eye(2, 10), np.array([0.0, 1.0]))
    with pytest.raises(DataError, match="labels of shape"):
        accuracy(np.eye(2, 10), np.array([0, 1, 2]))


def test_select_output() -> None:
    model = two_output_classifier()
    assert select_output(model) == "logits" and select_output(model, "doubled") == "doubled"
    with pytest.raises(UsageError, match=r"'nope' is not an output.*\['logits', 'doubled'\]"):
        select_output(model, "nope")


def test_a_sequence_first_output_is_compared_on_every_timestep() -> None:
    """Issue 15: a CTC recognizer's [T, 1, C] output, declared [1, seqlen]: the batch axis is found by
    probing (axis 1), and top-1 agreement counts every timestep, not timestep 0 only."""
    from builders import ctc_head

    model = ctc_head(steps=12, classes=7)
    output = model.graph.output[0].name
    shape = (12, 2, 7)
    batch_axis = find_batch_axis(model, output, shape, 2, probe=lambda n: (12, n, 7))
    assert batch_axis == 1
    layout = output_layout(model, output, shape, batch_axis)
    assert layout == OutputLayout(batch_axis=1, class_axis=2, channel_axis=2)
    reference = RNG.random(shape)
    candidate = reference.copy()
    candidate[5:, 0, :] = candidate[5:, 0, ::-1]  # sample 0 wrong from timestep 5 on
    candidate[5:, 0, 0] += 10
    result = fidelity_with(layout, reference, candidate)
    assert result.samples == 2
    agree = np.mean(np.argmax(reference, axis=2) == np.argmax(candidate, axis=2))
    assert result.top1_agreement == pytest.approx(agree) and result.top1_agreement < 0.8


def test_a_collapsed_channel_fails_the_worst_channel_cosine() -> None:
    """Boxes (0-320) concatenated with scores (0-0.2): the scores rounded to 0 keep the mean cosine near 1."""
    boxes = RNG.uniform(0, 320, (4, 4, 50))
    scores = RNG.uniform(0, 0.2, (4, 6, 50))
    reference = np.concatenate([boxes, scores], axis=1)
    candidate = np.concatenate([boxes, np.zeros_like(scores)], axis=1)
    result = fidelity_with(OutputLayout(0, None, 1), reference, candidate)
    assert result.cosine > 0.999 and result.worst_channel_cosine == 0.0 and result.worst_channel >= 4
    assert result.score == 0.0 and result.worst_channel_rel_error == pytest.approx(1.0)
    assert result.top1_agreement is None


def test_on_a_class_axis_the_score_reads_top1_agreement_and_only_picked_classes_count_per_channel() -> None:
    """A CTC head's probabilities over many characters: int8 rounding the unused ones' ~1e-6 to 0 changes no
    decision and is not a collapsed channel; a picked class rounded away fails the score."""
    steps, classes = 40, 300
    logits = RNG.normal(0, 1, (2, steps, classes))
    logits[:, :, :5] += 12  # five characters (and blank) take every step
    reference = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    rounded = np.round(reference * 255) / 255  # one int8 scale for [0, 1]
    layout = OutputLayout(batch_axis=0, class_axis=2, channel_axis=2)
    result = fidelity_with(layout, reference, rounded)
    assert result.top1_agreement == 1.0 and result.worst_channel_cosine is not None
    assert result.worst_channel_cosine > 0.99 and result.worst_channel < 5 and result.score > 0.99
    broken = rounded.copy()
    picked = int(np.argmax(reference[0, 0]))
    broken[:, :, picked] = 0.0
    failed = fidelity_with(layout, reference, broken)
    assert failed.worst_channel_cosine == 0.0 and failed.score == failed.top1_agreement < 0.9
    # without the class axis every channel counts, and the rounded-away ones fail
    assert fidelity_with(OutputLayout(0, None, 2), reference, rounded).worst_channel_cosine == 0.0


def test_layouts_of_heads_without_classes() -> None:
    from builders import ctc_head, yolo_head

    model = yolo_head()
    output = model.graph.output[0].name
    assert output_layout(model, output, (2, 10, 256), 0) == OutputLayout(0, None, 1)  # Concat axis: channels
    assert output_layout(two_output_classifier(), "logits", (3, 10), 0) == OutputLayout(0, 1, 1)
    assert find_batch_axis(two_output_classifier(), "logits", (3, 10), 3) == 0  # the shared symbol N
    assert find_batch_axis(model, output, (1, 10, 256), 1) == 0  # declared [batch, 10, 256]
    ctc = ctc_head()
    assert find_batch_axis(ctc, ctc.graph.output[0].name, (12, 1, 7), 1) is None  # one sample per run: all of it
    with pytest.raises(DataError, match="cannot tell which axis"):
        find_batch_axis(ctc, ctc.graph.output[0].name, (12, 3, 7), 3)


def fidelity_with(layout: OutputLayout, reference: np.ndarray, candidate: np.ndarray):
    meter = FidelityMeter(layout)
    meter.update(reference, candidate)
    return meter.result()
