"""Output fidelity of a candidate model against a reference, and task accuracy with labels.

Both are computed streaming, batch by batch, from running sums, so a metric over a whole evaluation set
holds no outputs in memory. Pure numpy (the output's layout is read from the model's graph).

Outputs are not assumed to be `[batch, ...]`: an `OutputLayout` says which axis is the batch (a CTC
recognizer's `[T, batch, C]`), which is the class axis (top-1 over every position of it; None where no
class axis is meaningful: embeddings, boxes, feature maps), which is the channel axis (the per-channel
measure below) and, for a sequence of classes (a CTC recognizer's `[T, N, C]` or `[N, T, C]`), which is
the time axis and which class is the CTC blank. `find_batch_axis` finds the batch axis from the symbolic
dims an output shares with the inputs, or by probing two batch sizes; `output_layout` finds the others.

Fidelity (same inputs through both models, one output):
  cosine          mean over samples of the cosine similarity of each sample's elements (every element of
                  the output, whatever the axis order; 1 when both are zero, 0 when only one is);
  max_abs         largest absolute difference of any element;
  mean_abs        mean absolute difference over all elements;
  snr_db          10 log10(sum(reference^2) / sum((reference - candidate)^2)) over all elements:
                  inf when identical;
  top1_agreement  share of positions (sample x every other non-class axis) whose argmax over the class axis
                  agrees; None without a class axis;
  strings_unchanged / strings_changed
                  on a sequence output (a layout with a time axis): each sample's scores decoded greedily
                  as CTC is (argmax per frame, repeats collapsed, the blank dropped), the share of samples
                  whose decoded string is the reference's, and how many are not. A frame that changes
                  without changing the string (a repeat, a blank beside a blank) changes nothing read;
                  one changed character in a line changes the line. None without a time axis;
  worst_channel_cosine / worst_channel_rel_error
                  per channel (each index of the channel axis, over every sample and position), the
                  cosine and the relative error ||ref - cand|| / ||ref||, worst channel reported. A
                  whole-output cosine can be fooled by scale: a YOLO head concatenating box coordinates
                  (0-320) with class scores (0-1) keeps cosine 0.998 when int8 rounds every score to 0;
                  the score channels' cosine is then 0. Channels whose reference is (almost) zero everywhere
                  (energy below 1e-12 of the largest channel's) are not scored, nor, when the channel axis
                  is a class axis, the classes fp32 never picks on the data (a CTC head's thousands of
                  unused characters have ~0 probabilities that int8 rounds to 0: cosine 0, no decision
                  changed; the picked ones and the per-sample cosine still catch a broken head). When fp32 picks one
                  class only, every class is scored and the score is that worst cosine, not top-1 agreement
                  (`Fidelity.one_class_only`).
Accuracy (one output, integer labels): top-1 and top-5 (None with 5 classes or fewer), for outputs with a
class axis and one position per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxslim.errors import DataError, UsageError
from onnxslim.graph import ProtoIndex

__all__ = [
    "Fidelity",
    "Accuracy",
    "OutputLayout",
    "FidelityMeter",
    "AccuracyMeter",
    "fidelity",
    "accuracy",
    "select_output",
    "ctc_greedy_decode",
    "is_classifier_output",
    "find_batch_axis",
    "output_layout",
    "batch_is_symbolic",
    "layout_of",
]

# Channels whose reference energy is below this share of the largest channel's are not scored.
_NEGLIGIBLE_CHANNEL = 1e-12


@dataclass(frozen=True)
class Fidelity:
    """How closely a candidate's output follows the reference's on the same inputs (see module docstring)."""

    cosine: float
    max_abs: float
    mean_abs: float
    snr_db: float
    top1_agreement: float | None
    samples: int
    worst_channel_cosine: float | None = None
    worst_channel_rel_error: float | None = None
    worst_channel: int | None = None  # index (on `channel_axis`) of the channel with the lowest cosine
    channel_axis: int | None = None
    channels: int | None = None
    batch_axis: int | None = 0  # None: each run's whole output is one sample
    class_axis: int | None = None
    strings_unchanged: float | None = None  # sequence outputs: share of samples whose decoded string is unchanged
    strings_changed: int | None = None  # ... and how many samples' strings changed
    time_axis: int | None = None
    classes_picked: int | None = None  # on a class axis: how many classes fp32's top-1 picks on the data

    @property
    def one_class_only(self) -> bool:
        """fp32 picks the same class on every sample judged (a binary NSFW score on safe images): top-1
        agreement then tells nothing, so `closeness` reads every class's cosine instead."""
        return self.classes_picked is not None and self.classes_picked < 2 and self.time_axis is None

    @property
    def reads_strings(self) -> bool:
        """The output is a sequence of classes and its decoded strings were compared."""
        return self.strings_unchanged is not None

    @property
    def decides_classes(self) -> bool:
        """The channels are classes (a Softmax's or a classifier's axis) and top-1 agreement was measured."""
        return (self.class_axis is not None and self.class_axis == self.channel_axis and self.top1_agreement is not None
                and not self.one_class_only)

    @property
    def closeness(self) -> float:
        """How close the values are, whatever the output: the lower of the mean cosine and the worst
        channel's cosine -- or, when the channels are classes, the share of positions whose top class
        agrees: a class's scores are mostly near 0 (probabilities), where int8's steps dominate its cosine
        without changing a decision, while a class int8 stops picking shows in the agreement. What `score`
        is on every output but a sequence's; what the int8 guard ranks roundings by and `prune` reports on
        every output (`quant/sensitivity.py`, `prune/sensitivity.py`): on the few samples they measure,
        strings change by whole samples and most changes would measure 0."""
        values = [self.cosine]
        if self.decides_classes:
            assert self.top1_agreement is not None
            values.append(self.top1_agreement)
        elif self.worst_channel_cosine is not None:
            values.append(self.worst_channel_cosine)
        return min(values)

    @property
    def score(self) -> float:
        """What a fidelity budget is checked against: `closeness` -- or, on a sequence of classes, the share
        of samples whose decoded string is unchanged, alone: what a reader of the output sees. Per-frame
        agreement let through a recognizer that read 80% of lines at 95% of frames; cosine let through int8
        that changed 9% of a captcha reader's strings and refused every pruning of it, strings unchanged,
        for a character the decoder never emits."""
        if self.strings_unchanged is not None:
            return self.strings_unchanged
        return self.closeness

    @property
    def score_name(self) -> str:
        """What `score` is, as reports name it."""
        if self.reads_strings:
            return "strings unchanged"
        if self.decides_classes and self.top1_agreement is not None and self.top1_agreement <= self.cosine:
            return "top-1 agreement"
        return "cosine"  # the lower of the two decides: 0.9995 on 40 samples is no agreement count


@dataclass(frozen=True)
class Accuracy:
    """Task accuracy against integer labels."""

    top1: float
    top5: float | None
    samples: int


@dataclass(frozen=True)
class OutputLayout:
    """Which axis of an output is the batch (None: one sample per run), the class axis (top-1), the channel
    axis (per-channel fidelity). Axes index the output as the model produces it.

    `time_axis`: on a sequence of classes (a CTC recognizer's `[T, N, C]` or `[N, T, C]`), the one other
    axis longer than 1: each sample's frames, decoded greedily into a string (`ctc_greedy_decode`).
    `blank`: the class index of the CTC blank that decoding drops; 0 in the PaddleOCR and ddddocr exports
    (and torch's `CTCLoss` default). `output_layout` sets the time axis and leaves the blank at 0."""

    batch_axis: int | None = 0
    class_axis: int | None = None
    channel_axis: int | None = None
    time_axis: int | None = None
    blank: int = 0


def is_classifier_output(shape: Sequence[int], batch_axis: int | None = 0) -> bool:
    """True when each sample's output has exactly one axis longer than 1 (the classes)."""
    return sum(1 for axis, d in enumerate(shape) if axis != batch_axis and d > 1) == 1


def _legacy_layout(shape: Sequence[int]) -> OutputLayout:
    """Batch first; the class axis of a classifier-like output; the channel axis 1 (or the class axis)."""
    class_axis = None
    if is_classifier_output(shape):
        class_axis = next(axis for axis, d in enumerate(shape) if axis and d > 1)
    channel_axis = class_axis if class_axis is not None else (1 if len(shape) > 1 else None)
    return OutputLayout(0, class_axis, channel_axis)


def _as_samples(array: np.ndarray, batch_axis: int | None) -> np.ndarray:
    """The output with its batch axis first (a leading axis of 1 when there is none), as float64."""
    array = np.asarray(array)
    if batch_axis is None:
        array = array[None]
    elif array.ndim == 0:
        raise DataError("an output is a scalar; metrics need a batch axis")
    else:
        array = np.moveaxis(array, batch_axis, 0)
    return array.astype(np.float64, copy=False)


def _moved(axis: int | None, batch_axis: int | None) -> int | None:
    """Where `axis` of the output lands once the batch axis is moved first (or one is prepended)."""
    if axis is None:
        return None
    if batch_axis is None:
        return axis + 1
    if axis == batch_axis:
        return 0
    return axis + 1 if axis < batch_axis else axis


def ctc_greedy_decode(frames: np.ndarray, blank: int = 0) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of class ids `[samples, T]` (argmax per frame, taken by the caller): repeats
    collapsed, then `blank` dropped, one tuple of class ids per sample."""
    frames = np.asarray(frames)
    if frames.ndim != 2:
        raise DataError(f"CTC decoding needs class ids [samples, frames], not shape {list(frames.shape)}")
    changed = np.ones(frames.shape, dtype=bool)
    changed[:, 1:] = frames[:, 1:] != frames[:, :-1]
    kept = changed & (frames != blank)
    return [tuple(int(c) for c in row[keep]) for row, keep in zip(frames, kept, strict=True)]


def _frames(classes: np.ndarray, time_axis: int) -> np.ndarray:
    """Per-frame class ids of a batch (batch axis first, class axis reduced away) as `[samples, T]`; any
    other axis (of length 1 by the layout's rule) joins the frames."""
    return np.moveaxis(classes, time_axis, -1).reshape(len(classes), -1)


class FidelityMeter:
    """Accumulates `Fidelity` over batches: call `update(reference, candidate)` per batch, then `result()`.

    Without a layout the batch axis is 0, a classifier-like output's class axis is its one non-trivial axis,
    and the channel axis is that class axis or axis 1."""

    def __init__(self, layout: OutputLayout | None = None) -> None:
        self._layout = layout
        self._samples = 0
        self._elements = 0
        self._cosine_sum = 0.0
        self._abs_sum = 0.0
        self._max_abs = 0.0
        self._signal = 0.0
        self._noise = 0.0
        self._agree = 0
        self._positions = 0
        self._classifier: bool | None = None
        self._channel_dot: np.ndarray | None = None
        self._channel_ref: np.ndarray | None = None
        self._channel_cand: np.ndarray | None = None
        self._channel_noise: np.ndarray | None = None
        self._decided: np.ndarray | None = None  # on a class axis: the classes fp32 picks somewhere
        self._strings_changed = 0
        self._strings: bool | None = None  # whether every batch had a time axis to decode along

    def _layout_for(self, shape: Sequence[int]) -> OutputLayout:
        return self._layout if self._layout is not None else _legacy_layout(shape)

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """Add one batch of outputs (same shape, laid out as the layout says)."""
        reference, candidate = np.asarray(reference), np.asarray(candidate)
        if reference.shape != candidate.shape:
            raise DataError(
                f"outputs cannot be compared: the reference has shape {list(reference.shape)}, the candidate "
                f"{list(candidate.shape)}"
            )
        layout = self._layout_for(reference.shape)
        full_ref, full_cand = _as_samples(reference, layout.batch_axis), _as_samples(candidate, layout.batch_axis)
        if not len(full_ref):
            return
        ref, cand = full_ref.reshape(len(full_ref), -1), full_cand.reshape(len(full_cand), -1)
        ref_norm, cand_norm = np.sqrt(np.sum(ref * ref, axis=1)), np.sqrt(np.sum(cand * cand, axis=1))
        dot = np.sum(ref * cand, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            cosine = np.where(
                (ref_norm == 0) & (cand_norm == 0), 1.0, np.where((ref_norm == 0) | (cand_norm == 0), 0.0, dot / (ref_norm * cand_norm))
            )
        diff = np.abs(ref - cand)
        self._cosine_sum += float(np.sum(np.clip(cosine, -1.0, 1.0)))
        self._abs_sum += float(np.sum(diff))
        self._max_abs = max(self._max_abs, float(np.max(diff))) if diff.size else self._max_abs
        if diff.size and np.isnan(diff).any():
            self._max_abs = math.nan
        self._signal += float(np.sum(ref * ref))
        self._noise += float(np.sum(diff * diff))
        self._elements += diff.size
        class_axis = _moved(layout.class_axis, layout.batch_axis)
        classifier = class_axis is not None and class_axis > 0 and full_ref.shape[class_axis] > 1
        self._classifier = classifier if self._classifier is None else self._classifier and classifier
        if classifier:
            assert class_axis is not None
            want = np.argmax(full_ref, axis=class_axis)
            got = np.argmax(full_cand, axis=class_axis)
            self._agree += int(np.sum(want == got))
            self._positions += want.size
            if layout.channel_axis == layout.class_axis:
                picked = np.bincount(want.ravel(), minlength=full_ref.shape[class_axis]) > 0
                self._decided = picked if self._decided is None or len(self._decided) != len(picked) else self._decided | picked
            self._update_strings(want, got, layout, class_axis)
        else:
            self._strings = False
        self._update_channels(full_ref, full_cand, _moved(layout.channel_axis, layout.batch_axis))
        self._samples += len(ref)

    def _update_strings(self, want: np.ndarray, got: np.ndarray, layout: OutputLayout, class_axis: int) -> None:
        """Decode both batches' per-frame classes (`want`, `got`: the argmax, batch first) and count the
        samples whose strings differ."""
        time_axis = _moved(layout.time_axis, layout.batch_axis)
        if time_axis is None or time_axis == 0 or time_axis == class_axis:
            self._strings = False
            return
        time_axis -= 1 if time_axis > class_axis else 0  # the class axis was reduced away
        wanted = ctc_greedy_decode(_frames(want, time_axis), layout.blank)
        read = ctc_greedy_decode(_frames(got, time_axis), layout.blank)
        self._strings_changed += sum(a != b for a, b in zip(wanted, read, strict=True))
        self._strings = self._strings is not False

    def _update_channels(self, ref: np.ndarray, cand: np.ndarray, axis: int | None) -> None:
        if axis is None or axis == 0 or axis >= ref.ndim:
            return
        channels = ref.shape[axis]
        ref_c = np.moveaxis(ref, axis, 0).reshape(channels, -1)
        cand_c = np.moveaxis(cand, axis, 0).reshape(channels, -1)
        sums = (
            np.sum(ref_c * cand_c, axis=1), np.sum(ref_c * ref_c, axis=1), np.sum(cand_c * cand_c, axis=1),
            np.sum((ref_c - cand_c) ** 2, axis=1),
        )
        if self._channel_dot is None or len(self._channel_dot) != channels:
            if self._channel_dot is not None:  # the channel count changed between batches: not comparable
                raise DataError(f"the output's channel axis changed size between batches ({len(self._channel_dot)} -> {channels})")
            self._channel_dot, self._channel_ref, self._channel_cand, self._channel_noise = (np.zeros(channels) for _ in range(4))
        assert self._channel_ref is not None and self._channel_cand is not None and self._channel_noise is not None
        self._channel_dot += sums[0]
        self._channel_ref += sums[1]
        self._channel_cand += sums[2]
        self._channel_noise += sums[3]

    def _channels(self) -> tuple[float | None, float | None, int | None]:
        if self._channel_dot is None:
            return None, None, None
        assert self._channel_ref is not None and self._channel_cand is not None and self._channel_noise is not None
        scored = self._channel_ref > _NEGLIGIBLE_CHANNEL * max(float(np.max(self._channel_ref)), 0.0)
        if self._decided is not None and len(self._decided) == len(scored) and int(self._decided.sum()) >= 2:
            # classes: only those fp32 picks somewhere. A CTC head's 6,625 characters are mostly ~0
            # probabilities that int8 rounds to 0 (cosine 0) without changing any decision. Not when fp32
            # picks one class only: then every class is scored (`Fidelity.one_class_only`)
            scored &= self._decided
        if not scored.any():
            return None, None, None
        with np.errstate(divide="ignore", invalid="ignore"):
            cosine = np.where(
                self._channel_cand > 0, self._channel_dot / np.sqrt(self._channel_ref * self._channel_cand), 0.0
            )
            rel_error = np.sqrt(self._channel_noise / self._channel_ref)
        cosine = np.where(scored, np.clip(np.nan_to_num(cosine, nan=0.0), -1.0, 1.0), np.inf)
        rel_error = np.where(scored, np.nan_to_num(rel_error, nan=np.inf), -np.inf)
        worst = int(np.argmin(cosine))
        return float(cosine[worst]), float(np.max(rel_error)), worst

    def result(self) -> Fidelity:
        """The fidelity over everything added so far (NaN values when nothing was added)."""
        layout = self._layout or OutputLayout()
        if not self._samples:
            return Fidelity(math.nan, math.nan, math.nan, math.nan, None, 0)
        if self._noise == 0:
            snr = math.inf
        elif self._signal == 0:
            snr = -math.inf
        else:
            snr = 10 * math.log10(self._signal / self._noise)
        worst_cosine, worst_error, worst = self._channels()
        strings = bool(self._strings)
        return Fidelity(
            cosine=self._cosine_sum / self._samples,
            max_abs=self._max_abs,
            mean_abs=self._abs_sum / self._elements if self._elements else math.nan,
            snr_db=snr,
            top1_agreement=self._agree / self._positions if self._classifier and self._positions else None,
            samples=self._samples,
            worst_channel_cosine=worst_cosine,
            worst_channel_rel_error=worst_error,
            worst_channel=worst,
            channel_axis=layout.channel_axis if self._layout is not None else (1 if worst is not None else None),
            channels=None if self._channel_dot is None else len(self._channel_dot),
            batch_axis=layout.batch_axis,
            class_axis=layout.class_axis,
            strings_unchanged=1.0 - self._strings_changed / self._samples if strings else None,
            strings_changed=self._strings_changed if strings else None,
            time_axis=layout.time_axis if strings else None,
            classes_picked=None if self._decided is None else int(self._decided.sum()),
        )


class AccuracyMeter:
    """Accumulates top-1/top-5 accuracy over batches: `update(logits, labels)` per batch, then `result()`."""

    def __init__(self, layout: OutputLayout | None = None) -> None:
        self._layout = layout
        self._samples = 0
        self._top1 = 0
        self._top5 = 0
        self._classes: int | None = None

    def update(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Add one batch: scores [batch, classes] (or classifier-like, or as the layout says), labels [batch].
        Returns whether each sample's top-1 is its label (for paired comparisons)."""
        logits, labels = np.asarray(logits), np.asarray(labels)
        layout = self._layout if self._layout is not None else _legacy_layout(logits.shape)
        samples = _as_samples(logits, layout.batch_axis)
        class_axis = _moved(layout.class_axis, layout.batch_axis)
        if class_axis is None or class_axis == 0 or samples[0].size != samples.shape[class_axis]:
            raise DataError(
                f"accuracy needs a classifier output ([batch, classes]); this output has shape {list(logits.shape)}"
            )
        if labels.shape != (len(samples),):
            raise DataError(f"{len(samples)} outputs but labels of shape {list(labels.shape)}")
        if labels.dtype.kind not in "iu":
            raise DataError(f"labels must be integer class ids, not {labels.dtype}")
        scores = samples.reshape(len(samples), -1)
        classes = scores.shape[1]
        bad = labels[(labels < 0) | (labels >= classes)]
        if bad.size:
            raise DataError(f"label {int(bad[0])} is outside the output's {classes} classes (0 to {classes - 1})")
        self._classes = classes
        correct = np.argmax(scores, axis=1) == labels
        self._top1 += int(np.sum(correct))
        if classes > 5:
            top5 = np.argpartition(-scores, 4, axis=1)[:, :5]
            self._top5 += int(np.sum(np.any(top5 == labels[:, None], axis=1)))
        self._samples += len(labels)
        return correct

    def result(self) -> Accuracy:
        """Accuracy over everything added so far (NaN when nothing was added)."""
        if not self._samples:
            return Accuracy(math.nan, None, 0)
        top5 = self._top5 / self._samples if self._classes is not None and self._classes > 5 else None
        return Accuracy(self._top1 / self._samples, top5, self._samples)


def has_one_position(shape: Sequence[int], layout: OutputLayout) -> bool:
    """True when each sample has one class position (a classifier: accuracy against labels makes sense)."""
    if layout.class_axis is None:
        return False
    return all(d == 1 for axis, d in enumerate(shape) if axis not in (layout.batch_axis, layout.class_axis))


# ------------------------------------------------------------------------------------------- layouts


def _batch_symbols(model: onnx.ModelProto) -> set[str]:
    """The symbolic names of the inputs' first dims (the batch, by the data reader's convention)."""
    initializers = {t.name for t in model.graph.initializer}
    symbols = set()
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param and not dims[0].HasField("dim_value"):
            symbols.add(dims[0].dim_param)
    return symbols


def find_batch_axis(
    model: onnx.ModelProto,
    output: str,
    shape: Sequence[int],
    batch_size: int,
    probe: Callable[[int], Sequence[int]] | None = None,
) -> int | None:
    """The axis of `output` (produced at `shape` from a batch of `batch_size` samples) that is the batch.

    1. the declared output dims: the one axis whose symbolic dim is the inputs' batch symbol (when the
       declared rank is the real one: exporters declare `[1, seqlen]` for a real `[T, 1, C]`);
    2. `probe(n)`, the output's shape for a batch of n samples (None when the batch dim is fixed): the one
       axis whose size follows the batch;
    3. with one sample per run, None (the whole output is the sample); else axis 0 when its size is the
       batch size.
    Raises DataError when no axis can be the batch of a multi-sample batch.
    """
    declared = next((v for v in model.graph.output if v.name == output), None)
    symbols = _batch_symbols(model)
    if declared is not None and symbols:
        dims = declared.type.tensor_type.shape.dim
        if len(dims) == len(shape):
            axes = [axis for axis, d in enumerate(dims) if d.dim_param in symbols and shape[axis] == batch_size]
            if len(axes) == 1:
                return axes[0]
    if probe is not None:
        other = 2 if batch_size == 1 else 1
        other_shape = list(probe(other))
        if len(other_shape) == len(shape):
            axes = [a for a, (x, y) in enumerate(zip(shape, other_shape, strict=True)) if x == batch_size and y == other]
            if len(axes) == 1:
                return axes[0]
            if not axes and shape == other_shape:
                return None  # the output does not depend on the batch size (a reduction over samples)
    if batch_size == 1:
        return None
    if shape and shape[0] == batch_size:
        return 0
    raise DataError(
        f"cannot tell which axis of output {output!r} (shape {list(shape)}) holds the {batch_size} samples of a "
        "batch; use batches of 1 (--batch 1)"
    )


_SHAPE_ONLY = frozenset({"Identity", "Cast", "Dropout", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})
_NO_CLASSES = frozenset(
    {"Concat", "LpNormalization", "ReduceMean", "ReduceSum", "ReduceL2", "ReduceMax", "GlobalAveragePool",
     "GlobalMaxPool", "Sqrt", "Div"}
)  # boxes joined to scores, pooled or normalized embeddings: an argmax over them means nothing
_SOFTMAX = frozenset({"Softmax", "LogSoftmax"})
# Raw sequence logits (no Softmax) are told by their shape and their head: [T, N, C] or [N, T, C] from a
# linear layer with at least this many output features. A CTC charset is at least the ten digits and the blank;
# ddddocr's has 8,210 classes, PaddleOCR's 97 (English) to 18,385.
MIN_SEQUENCE_CLASSES = 10
_LINEAR = frozenset({"MatMul", "Gemm"})


def _head(model: onnx.ModelProto, output: str) -> tuple[onnx.NodeProto | None, list[onnx.NodeProto]]:
    """The node that computes `output`'s values, past shape-only ops, and the shape-only ops on the way."""
    producers = ProtoIndex(model.graph).producers
    path: list[onnx.NodeProto] = []
    node = producers.get(output)
    while node is not None and node.op_type in _SHAPE_ONLY and node.input:
        path.append(node)
        node = producers.get(node.input[0])
    return node, path


def _constant_shape(model: onnx.ModelProto, name: str) -> list[int] | None:
    """The shape of `name` when it is an initializer or a Constant node's output, else None."""
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return list(tensor.dims)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            return None if value is None else list(value.dims)
    return None


def _linear_features(model: onnx.ModelProto, head: onnx.NodeProto | None) -> int | None:
    """The output features of a linear layer computing `head` -- MatMul or Gemm by a constant weight,
    optionally then Add of a constant bias -- else None."""
    if head is not None and head.op_type == "Add" and len(head.input) == 2:
        producers = ProtoIndex(model.graph).producers
        variable = [name for name in head.input if _constant_shape(model, name) is None]
        head = producers.get(variable[0]) if len(variable) == 1 else None
    if head is None or head.op_type not in _LINEAR or len(head.input) < 2:
        return None
    weight = _constant_shape(model, head.input[1])
    if not weight or (head.op_type == "Gemm" and len(weight) != 2):
        return None
    if head.op_type == "Gemm" and _attribute(head, "transB", 0):
        return weight[0]
    return weight[-1]


def _sequence_logits_axis(model: onnx.ModelProto, head: onnx.NodeProto | None, shape: Sequence[int],
                          batch_axis: int | None) -> int | None:
    """The class axis of raw sequence logits: a 3-d output whose last axis is a linear layer's
    `MIN_SEQUENCE_CLASSES` or more features and that has exactly one other non-batch axis longer than 1
    (and, with no batch axis, a leading axis of 1: `[T, 1, C]` or `[1, T, C]`). None otherwise."""
    if len(shape) != 3 or shape[-1] < MIN_SEQUENCE_CLASSES or batch_axis == 2:
        return None
    if batch_axis is None and 1 not in shape[:2]:
        return None
    if _linear_features(model, head) != shape[-1]:
        return None
    return 2 if _time_axis(shape, batch_axis, 2) is not None else None


def _time_axis(shape: Sequence[int], batch_axis: int | None, class_axis: int) -> int | None:
    """The one axis besides the batch and the classes longer than 1 (the frames), else None."""
    others = [axis for axis, d in enumerate(shape) if axis not in (batch_axis, class_axis) and d > 1]
    return others[0] if len(others) == 1 else None


def _axis_through(axis: int, path: Sequence[onnx.NodeProto]) -> int | None:
    """Follow an axis of the head's output through rank-keeping shape ops to the graph output."""
    for node in reversed(path):
        if node.op_type in ("Identity", "Cast", "Dropout"):
            continue
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            if perm is None or axis not in perm:
                return None
            axis = perm.index(axis)
            continue
        return None
    return axis


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def batch_is_symbolic(model: onnx.ModelProto, inputs: Iterable[str]) -> bool:
    """Whether every one of `inputs` (model input names) declares a symbolic first dim: a batch of any size runs."""
    wanted = set(inputs)
    return all(
        v.type.tensor_type.shape.dim and not v.type.tensor_type.shape.dim[0].HasField("dim_value")
        for v in model.graph.input if v.name in wanted
    )


def layout_of(
    model: onnx.ModelProto,
    output: str,
    produced: np.ndarray,
    feeds: Mapping[str, np.ndarray],
    run: Callable[[Mapping[str, np.ndarray]], np.ndarray],
) -> OutputLayout:
    """`output`'s batch, class and channel axes (`find_batch_axis`, `output_layout`), `produced` from `feeds`.
    When the inputs' batch dim is symbolic, `run(other feeds)` (the output for them) probes other batch sizes."""
    rows = len(next(iter(feeds.values())))

    def probe(samples: int) -> Sequence[int]:
        resized = {k: np.concatenate([a] * samples)[:samples] if rows == 1 else a[:samples] for k, a in feeds.items()}
        return np.shape(run(resized))

    symbolic = batch_is_symbolic(model, feeds)
    batch_axis = find_batch_axis(model, output, np.shape(produced), rows, probe if symbolic else None)
    return output_layout(model, output, np.shape(produced), batch_axis)


def output_layout(model: onnx.ModelProto, output: str, shape: Sequence[int], batch_axis: int | None) -> OutputLayout:
    """The class, channel and time axes of `output` (at its real `shape`), given its batch axis.

    Class axis: a Softmax/LogSoftmax's axis followed through Transposes (top-1 at every position: a CTC
    recognizer's `[T, 1, C]`); else, for an output with one axis longer than 1 besides the batch (a
    classifier), that axis -- unless the values come from a Concat, a pooling or a normalization
    (boxes, embeddings); else the last axis of raw sequence logits: `[T, N, C]` or `[N, T, C]` computed
    by a linear layer (MatMul/Gemm by a constant, then maybe a bias Add, then shape-only ops) with
    `MIN_SEQUENCE_CLASSES` or more features (ddddocr's recognizer: Gemm, Reshape, `[T, 1, 8210]`).
    Time axis: with a class axis, the one other non-batch axis longer than 1, when there is exactly one
    (a sequence of classes, judged by its decoded strings; a segmentation map's two spatial axes are
    not a sequence). Channel axis: the class axis; else a Concat's axis (a head joining boxes and
    scores); else axis 1 of a 4-d `[N, C, H, W]` map, the last axis otherwise.
    """
    rank = len(shape)
    head, path = _head(model, output)
    op_type = head.op_type if head is not None else None
    class_axis: int | None = None
    if head is not None and op_type in _SOFTMAX:
        default = -1 if _default_opset(model) >= 13 else 1
        axis = _attribute(head, "axis", default)
        axis = axis + rank if axis < 0 else axis
        class_axis = _axis_through(axis, path)
        if class_axis is not None and (class_axis == batch_axis or class_axis >= rank or shape[class_axis] < 2):
            class_axis = None
    elif (op_type not in _NO_CLASSES and is_classifier_output(shape, batch_axis)
          and not _beside_a_softmax_output(model, output)):
        class_axis = next(axis for axis, d in enumerate(shape) if axis != batch_axis and d > 1)
    else:
        class_axis = _sequence_logits_axis(model, head, shape, batch_axis)
    time_axis = _time_axis(shape, batch_axis, class_axis) if class_axis is not None else None
    channel_axis = class_axis
    if channel_axis is None and head is not None and op_type == "Concat":
        axis = _attribute(head, "axis", 0)
        channel_axis = _axis_through(axis + rank if axis < 0 else axis, path)
    if channel_axis is None:
        others = [axis for axis in range(rank) if axis != batch_axis]
        if others:
            channel_axis = 1 if rank == 4 and batch_axis == 0 else others[-1]
    if channel_axis is not None and (channel_axis == batch_axis or channel_axis >= rank):
        channel_axis = None
    return OutputLayout(batch_axis, class_axis, channel_axis, time_axis)


def _beside_a_softmax_output(model: onnx.ModelProto, output: str) -> bool:
    """Another graph output ends in a Softmax/LogSoftmax: the model's classes are there, and this output,
    with none, is a regression (MTCNN's box and landmark heads beside its face score): no class axis."""
    for other in model.graph.output:
        if other.name != output:
            head, _ = _head(model, other.name)
            if head is not None and head.op_type in _SOFTMAX and head.input[0] != output:  # not Softmax(this)
                return True
    return False


def _default_opset(model: onnx.ModelProto) -> int:
    return next((imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")), 13)


def fidelity(reference: np.ndarray, candidate: np.ndarray) -> Fidelity:
    """Fidelity of one pair of output arrays (batch axis first)."""
    meter = FidelityMeter()
    meter.update(reference, candidate)
    return meter.result()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> Accuracy:
    """Top-1/top-5 accuracy of one array of scores against integer labels."""
    meter = AccuracyMeter()
    meter.update(logits, labels)
    return meter.result()


def select_output(model: onnx.ModelProto, name: str | None = None) -> str:
    """The output the metrics read: `name` (checked), else the model's first output."""
    outputs = [o.name for o in model.graph.output]
    if not outputs:
        raise DataError("the model has no outputs")
    if name is None:
        return outputs[0]
    if name not in outputs:
        raise UsageError(f"--output {name!r} is not an output of the model; outputs: {outputs}")
    return name
