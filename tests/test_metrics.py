"""Fidelity and accuracy on hand-made arrays whose answers are known exactly."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
import pytest
from builders import ModelBuilder, two_output_classifier
from onnx import TensorProto, helper, numpy_helper

from onnxslim.errors import DataError, UsageError
from onnxslim.metrics import (
    AccuracyMeter,
    FidelityMeter,
    OutputLayout,
    accuracy,
    ctc_greedy_decode,
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
    assert layout == OutputLayout(batch_axis=1, class_axis=2, channel_axis=2, time_axis=0)
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


# ------------------------------------------------------------------------------- sequences (CTC outputs)


def test_ctc_greedy_decoding_collapses_repeats_then_drops_the_blank() -> None:
    frames = np.array([[0, 3, 3, 0, 3, 5, 5, 0], [2, 2, 2, 2, 0, 0, 0, 0], [0] * 8])
    assert ctc_greedy_decode(frames) == [(3, 3, 5), (2,), ()]
    # a blank index of 2 (a charset with the blank elsewhere): 0 is a character, 2 is dropped
    assert ctc_greedy_decode(frames, blank=2) == [(0, 3, 0, 3, 5, 0), (0,), (0,)]
    with pytest.raises(DataError, match="samples, frames"):
        ctc_greedy_decode(np.zeros(4, np.int64))


@pytest.mark.parametrize("softmax", [False, True], ids=["logits", "softmax"])
@pytest.mark.parametrize("time_major", [True, False], ids=["TNC", "NTC"])
def test_a_ctc_reader_output_is_a_sequence_of_classes(softmax: bool, time_major: bool) -> None:
    """Conv features -> [T, N, C] or [N, T, C] scores, raw logits of a linear layer or a Softmax: the class
    axis is the last, the time axis the other non-batch one, the blank 0."""
    from builders import ctc_reader

    model = ctc_reader(steps=16, classes=12, softmax=softmax, time_major=time_major)
    output = model.graph.output[0].name
    shape = (16, 3, 12) if time_major else (3, 16, 12)
    batch_axis = find_batch_axis(model, output, shape, 3)
    assert batch_axis == (1 if time_major else 0)
    layout = output_layout(model, output, shape, batch_axis)
    assert layout == OutputLayout(batch_axis, class_axis=2, channel_axis=2, time_axis=0 if time_major else 1, blank=0)
    # one sample per run ([T, 1, C] with no batch axis found): still a sequence along T
    single = (16, 1, 12) if time_major else (1, 16, 12)
    assert output_layout(model, output, single, None).time_axis == (0 if time_major else 1)


def _gemm_reshape_reader(classes: int, steps: int = 10, features: int = 6) -> onnx.ModelProto:
    """ddddocr's head as exported: features [1, F, T] -> Transpose -> Reshape [T, F] -> Gemm (transB) ->
    Reshape [T, 1, C], raw logits, the batch fixed at 1."""
    rng = np.random.default_rng(2)
    weight = numpy_helper.from_array(rng.standard_normal((classes, features)).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(classes, np.float32), "b")
    flat = numpy_helper.from_array(np.array([steps, features], np.int64), "flat")
    lines = numpy_helper.from_array(np.array([steps, 1, classes], np.int64), "lines")
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[2, 0, 1], name="transpose"),
        helper.make_node("Reshape", ["t", "flat"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w", "b"], ["g"], transB=1, name="classifier"),
        helper.make_node("Reshape", ["g", "lines"], ["logits"], name="to_lines"),
    ]
    graph = helper.make_graph(
        nodes, "reader", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, features, steps])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seqlen"])], [weight, bias, flat, lines],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    onnx.checker.check_model(model)
    return model


def test_raw_logits_of_a_gemm_reshaped_to_lines_are_a_sequence_and_other_3d_outputs_are_not() -> None:
    reader = _gemm_reshape_reader(classes=40)
    assert find_batch_axis(reader, "logits", (10, 1, 40), 1) is None
    assert output_layout(reader, "logits", (10, 1, 40), None) == OutputLayout(None, 2, 2, time_axis=0)
    # too few classes for a charset: features, not classes
    assert output_layout(_gemm_reshape_reader(classes=4), "logits", (10, 1, 4), None).class_axis is None
    # a transformer's hidden states [N, T, D] out of a LayerNorm after a linear layer: no classes, no sequence
    b = ModelBuilder((10, 16), opset=17)
    b.channels[b.input] = 16
    y = b.matmul(b.input, 16)
    hidden = b.build(b.op("LayerNormalization", [y, b.const(np.ones(16, np.float32)), b.const(np.zeros(16, np.float32))]))
    name = hidden.graph.output[0].name
    assert output_layout(hidden, name, (2, 10, 16), 0) == OutputLayout(0, None, 2)
    linear = ModelBuilder((10, 16), opset=17)
    linear.channels[linear.input] = 16
    logits = linear.build(linear.matmul(linear.input, 16))  # the same linear layer's output *is* read as classes
    assert output_layout(logits, logits.graph.output[0].name, (2, 10, 16), 0).time_axis == 1
    # a segmentation map's Softmax over channels [N, C, H, W]: two spatial axes, not a sequence
    b = ModelBuilder((3, 8, 8))
    segmenter = b.build(b.op("Softmax", [b.conv(b.input, 5, k=3)], axis=1))
    layout = output_layout(segmenter, segmenter.graph.output[0].name, (2, 5, 8, 8), 0)
    assert layout.class_axis == 1 and layout.time_axis is None


def _frames_to_scores(frames: np.ndarray, classes: int = 12) -> np.ndarray:
    """[N, T] class ids -> [T, N, classes] scores whose argmax is those ids, with a margin."""
    scores = RNG.normal(0, 0.1, (*frames.shape, classes))
    np.put_along_axis(scores, frames[..., None], 5.0, axis=-1)
    return np.moveaxis(scores, 1, 0)


TNC = OutputLayout(batch_axis=1, class_axis=2, channel_axis=2, time_axis=0)


def test_a_changed_frame_that_keeps_the_string_changes_no_string_and_one_that_does_changes_one() -> None:
    frames = np.array([[0, 4, 4, 0, 7, 0, 0, 3], [5, 5, 0, 2, 2, 0, 9, 0]])
    reference = _frames_to_scores(frames)
    kept = frames.copy()
    kept[0, 2] = 0  # "4 4 0" -> "4 0 0": still one 4
    kept[1, 5] = 2  # "2 2 0" -> "2 2 2": still one 2
    harmless = fidelity_with(TNC, reference, _frames_to_scores(kept))
    assert harmless.top1_agreement == pytest.approx(14 / 16) and harmless.strings_changed == 0
    assert harmless.strings_unchanged == 1.0 and harmless.score == 1.0 and harmless.reads_strings
    assert harmless.score_name == "strings unchanged" and harmless.time_axis == 0
    changed = frames.copy()
    changed[1, 2] = 5  # "5 5 0 2" -> "5 5 5 2": still 5 2; and ...
    changed[1, 4] = 0  # "2 2" -> "2 0": still 2 -- both harmless; now one that reads differently:
    changed[0, 5] = 7  # "7 0 0" -> "7 7 0": harmless; then
    changed[0, 3] = 4  # "4 4 0 7" -> "4 4 4 7": harmless ... and the one that matters:
    changed[0, 7] = 0  # the final 3 dropped: "4 7 3" -> "4 7"
    broken = fidelity_with(TNC, reference, _frames_to_scores(changed))
    assert broken.strings_changed == 1 and broken.strings_unchanged == 0.5 and broken.score == 0.5
    assert broken.top1_agreement == pytest.approx(11 / 16)


def test_strings_are_compared_per_sample_across_batches_and_with_the_layouts_blank() -> None:
    frames = np.array([[1, 1, 2, 2], [0, 4, 1, 1]])
    other = np.array([[1, 2, 2, 2], [4, 4, 1, 1]])  # "1 2" and "4 1" both, the blank being 0
    meter = FidelityMeter(TNC)
    meter.update(_frames_to_scores(frames[:1]), _frames_to_scores(other[:1]))
    meter.update(_frames_to_scores(frames[1:]), _frames_to_scores(other[1:]))
    result = meter.result()
    assert (result.samples, result.strings_changed, result.strings_unchanged) == (2, 0, 1.0)
    # with the blank at 2, class 0 is a character: "0 4 1" is not "4 1" (and "1 2" -> "1" both)
    with_blank_2 = fidelity_with(dataclasses.replace(TNC, blank=2), _frames_to_scores(frames), _frames_to_scores(other))
    assert with_blank_2.strings_changed == 1
    broken = other.copy()
    broken[1] = [4, 4, 4, 4]  # "4 1" -> "4"
    assert fidelity_with(TNC, _frames_to_scores(frames), _frames_to_scores(broken)).strings_changed == 1
    # without a time axis nothing is decoded: the class-axis score as before
    plain = fidelity_with(dataclasses.replace(TNC, time_axis=None), _frames_to_scores(frames), _frames_to_scores(broken))
    assert plain.strings_unchanged is None and not plain.reads_strings and plain.decides_classes
    # the score is named for the figure that gives it: the lower of cosine and top-1 agreement
    assert plain.score == (plain.top1_agreement if plain.score_name == "top-1 agreement" else plain.cosine)


def test_when_fp32_picks_one_class_only_every_class_is_judged_by_its_cosine() -> None:
    """A binary NSFW score on safe images only: fp32 picks class 0 everywhere, so top-1 agreement is 1 whatever
    happens to class 1. A candidate whose class-1 score no longer follows the original's fails on that
    channel's cosine (open-nsfw pruned to 1% of its parameters passed at 'top-1 agreement 1.0000')."""
    samples = 64
    nsfw = RNG.uniform(0.001, 0.2, samples)  # never the top class
    reference = np.stack([1 - nsfw, nsfw], axis=1)
    flat = np.full(samples, 0.01)
    broken = np.stack([1 - flat, flat], axis=1)
    layout = OutputLayout(batch_axis=0, class_axis=1, channel_axis=1)
    result = fidelity_with(layout, reference, broken)
    assert result.classes_picked == 1 and result.one_class_only and not result.decides_classes
    assert result.top1_agreement == 1.0 and result.cosine > 0.98  # what the budget read before: both pass
    assert result.worst_channel == 1 and result.score == result.worst_channel_cosine < 0.9
    assert result.score_name == "cosine"
    # with both classes picked, agreement decides as before
    mixed = reference.copy()
    mixed[:8] = mixed[:8, ::-1]
    both = fidelity_with(layout, mixed, mixed)
    assert both.classes_picked == 2 and both.decides_classes and both.score == 1.0


def test_a_regression_output_beside_a_softmax_output_has_no_class_axis() -> None:
    """MTCNN's ONet: box [N, 4] and landmarks [N, 10] from Gemms beside the face score Softmax [N, 2]: only
    the score is a classifier; the landmarks were judged by top-1 agreement (0.94 at cosine 0.99996).
    Logits beside Softmax(logits) stay a classifier."""
    b = ModelBuilder((8,))
    features = b.relu(b.gemm(b.input, 16))
    landmarks, logits = b.gemm(features, 10), b.gemm(features, 2)
    score = b.op("Softmax", [logits], axis=1)
    model = b.build(landmarks, score)
    assert output_layout(model, landmarks, (3, 10), 0).class_axis is None
    assert output_layout(model, score, (3, 2), 0).class_axis == 1
    both = b.build(logits, score)
    assert output_layout(both, logits, (3, 2), 0).class_axis == 1
