"""Output fidelity of a candidate model against a reference, and task accuracy with labels.

Both are computed streaming, batch by batch, from running sums, so a metric over a whole evaluation set
holds no outputs in memory. Pure numpy.

Fidelity (same inputs through both models, one output):
  cosine          mean over samples of the cosine similarity of the flattened per-sample outputs
                  (1 when both are zero, 0 when only one is);
  max_abs         largest absolute difference of any element;
  mean_abs        mean absolute difference over all elements;
  snr_db          10 log10(sum(reference^2) / sum((reference - candidate)^2)) over all elements:
                  inf when identical;
  top1_agreement  share of samples whose argmax agrees, for classifier-like outputs (one non-trivial axis
                  per sample, e.g. [batch, classes] or [batch, classes, 1, 1]); None otherwise.
Accuracy (one output, integer labels): top-1 and top-5 (None with 5 classes or fewer), classifier-like
outputs only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxslim.errors import DataError, UsageError

__all__ = [
    "Fidelity",
    "Accuracy",
    "FidelityMeter",
    "AccuracyMeter",
    "fidelity",
    "accuracy",
    "select_output",
    "is_classifier_output",
]


@dataclass(frozen=True)
class Fidelity:
    """How closely a candidate's output follows the reference's on the same inputs (see module docstring)."""

    cosine: float
    max_abs: float
    mean_abs: float
    snr_db: float
    top1_agreement: float | None
    samples: int


@dataclass(frozen=True)
class Accuracy:
    """Task accuracy against integer labels."""

    top1: float
    top5: float | None
    samples: int


def is_classifier_output(shape: Sequence[int]) -> bool:
    """True when each sample's output has exactly one axis longer than 1 (the classes)."""
    return sum(1 for d in shape[1:] if d > 1) == 1


def _rows(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 0:
        raise DataError("an output is a scalar; metrics need a batch axis first")
    return array.reshape(len(array), -1).astype(np.float64, copy=False)


class FidelityMeter:
    """Accumulates `Fidelity` over batches: call `update(reference, candidate)` per batch, then `result()`."""

    def __init__(self) -> None:
        self._samples = 0
        self._elements = 0
        self._cosine_sum = 0.0
        self._abs_sum = 0.0
        self._max_abs = 0.0
        self._signal = 0.0
        self._noise = 0.0
        self._agree = 0
        self._classifier: bool | None = None

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """Add one batch of outputs (same shape, batch axis first)."""
        reference, candidate = np.asarray(reference), np.asarray(candidate)
        if reference.shape != candidate.shape:
            raise DataError(
                f"outputs cannot be compared: the reference has shape {list(reference.shape)}, the candidate "
                f"{list(candidate.shape)}"
            )
        ref, cand = _rows(reference), _rows(candidate)
        if not len(ref):
            return
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
        classifier = is_classifier_output(reference.shape)
        self._classifier = classifier if self._classifier is None else self._classifier and classifier
        if classifier:
            self._agree += int(np.sum(np.argmax(ref, axis=1) == np.argmax(cand, axis=1)))
        self._samples += len(ref)

    def result(self) -> Fidelity:
        """The fidelity over everything added so far (NaN values when nothing was added)."""
        if not self._samples:
            return Fidelity(math.nan, math.nan, math.nan, math.nan, None, 0)
        if self._noise == 0:
            snr = math.inf
        elif self._signal == 0:
            snr = -math.inf
        else:
            snr = 10 * math.log10(self._signal / self._noise)
        return Fidelity(
            cosine=self._cosine_sum / self._samples,
            max_abs=self._max_abs,
            mean_abs=self._abs_sum / self._elements if self._elements else math.nan,
            snr_db=snr,
            top1_agreement=self._agree / self._samples if self._classifier else None,
            samples=self._samples,
        )


class AccuracyMeter:
    """Accumulates top-1/top-5 accuracy over batches: `update(logits, labels)` per batch, then `result()`."""

    def __init__(self) -> None:
        self._samples = 0
        self._top1 = 0
        self._top5 = 0
        self._classes: int | None = None

    def update(self, logits: np.ndarray, labels: np.ndarray) -> None:
        """Add one batch: scores [batch, classes] (or classifier-like), integer labels [batch]."""
        logits, labels = np.asarray(logits), np.asarray(labels)
        if not is_classifier_output(logits.shape):
            raise DataError(
                f"accuracy needs a classifier output ([batch, classes]); this output has shape {list(logits.shape)}"
            )
        if labels.shape != (len(logits),):
            raise DataError(f"{len(logits)} outputs but labels of shape {list(labels.shape)}")
        if labels.dtype.kind not in "iu":
            raise DataError(f"labels must be integer class ids, not {labels.dtype}")
        scores = _rows(logits)
        classes = scores.shape[1]
        bad = labels[(labels < 0) | (labels >= classes)]
        if bad.size:
            raise DataError(f"label {int(bad[0])} is outside the output's {classes} classes (0 to {classes - 1})")
        self._classes = classes
        self._top1 += int(np.sum(np.argmax(scores, axis=1) == labels))
        if classes > 5:
            top5 = np.argpartition(-scores, 4, axis=1)[:, :5]
            self._top5 += int(np.sum(np.any(top5 == labels[:, None], axis=1)))
        self._samples += len(labels)

    def result(self) -> Accuracy:
        """Accuracy over everything added so far (NaN when nothing was added)."""
        if not self._samples:
            return Accuracy(math.nan, None, 0)
        top5 = self._top5 / self._samples if self._classes is not None and self._classes > 5 else None
        return Accuracy(self._top1 / self._samples, top5, self._samples)


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
