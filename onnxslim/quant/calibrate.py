"""int8 quantization, calibration in bounded memory: onnxruntime's calibrators fed chunk by chunk, so that
memory stays within `calibration_memory` whatever the number of samples (see quantize.py).

**Ranges per tensor** (method `tensor`). One calibration pass keeps a signed histogram of every calibrated
tensor (`RangeHistogram`, `HISTOGRAM_BINS` bins over a symmetric span that doubles when a batch reaches past
it, bins merged exactly) and its exact min and max. Each tensor's range is then chosen by the error it
causes (`choose_range`): among its min-max range, its percentile range (`PERCENTILE` of |x|, as the
`percentile` method) and the clipped ranges of a grid search, the one with the least expected squared
quantization error on that tensor's histogram -- rounding (step^2 / 12 per value inside the range) plus
clipping ((x - bound)^2 per value outside). A tensor with a few outliers gets a clipped range, a tensor
whose extremes are its signal keeps min-max; which kind won for how many tensors is in the summary
(`CalibrationSummary.range_kinds`). The ranges are written as a min-max cache, so onnxruntime's quantizer
reads them as it reads every other method's.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxslim.calib import Batch, Dataset
from onnxslim.errors import DataError, UnsupportedModelError, first_line
from onnxslim.graph import ProtoIndex
from onnxslim.io import infer_tensor_infos
from onnxslim.progress import Progress
from onnxslim.quant.config import CALIBRATION_MEMORY, FLOAT_TYPES, CalibrationSummary
from onnxslim.runtime import open_session, quiet_onnxruntime

logger = logging.getLogger(__name__)

HISTOGRAM_BINS = 4096  # bins of a tensor's signed histogram (method `tensor`)
SAMPLE = 1 << 15  # values of a tensor per batch its histogram counts (min and max read every value)
PERCENTILE = 99.999  # the percentile candidate of `choose_range`, as the `percentile` method's
LEVELS = 255  # steps of an 8-bit activation scale: onnxruntime's u8 and s8 activations both use 255
_GRID = np.linspace(0.01, 1.0, 100)  # fractions of the min-max bounds the MSE search tries
RANGE_KINDS = ("minmax", "percentile", "mse")


# ----------------------------------------------------------------------------------- ranges per tensor


@functools.lru_cache(maxsize=64)
def _sample_positions(size: int) -> np.ndarray:
    return np.sort(np.random.default_rng(size).choice(size, SAMPLE, replace=False))


class RangeHistogram:
    """A tensor's values, streamed: exact min and max, how many are exactly 0 (int8 keeps them exact), and a
    histogram of the finite ones over [-span, span] in `bins` bins, the span doubled (bins merged two by two,
    exactly) whenever a batch reaches past it."""

    def __init__(self, bins: int = HISTOGRAM_BINS) -> None:
        if bins % 4:
            raise ValueError(f"bins must be a multiple of 4, not {bins}")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64)
        self.span = 0.0
        self.low, self.high = np.inf, -np.inf
        self.zeros = 0

    def add(self, values: np.ndarray) -> None:
        """Merge one batch's values: min and max over all of them, the histogram over at most `SAMPLE` of
        them (the same seeded positions for every batch of a shape)."""
        flat = np.asarray(values).ravel()
        if flat.size == 0:
            return
        self.low, self.high = min(self.low, float(np.min(flat))), max(self.high, float(np.max(flat)))
        if flat.size > SAMPLE:
            flat = flat[_sample_positions(flat.size)]
        finite = flat[np.isfinite(flat)] if not (np.isfinite(self.low) and np.isfinite(self.high)) else flat
        if finite.size == 0:
            return
        self.zeros += int(np.count_nonzero(finite == 0))
        reach = float(max(-float(np.min(finite)), float(np.max(finite))))
        if self.span == 0.0:
            self.span = reach if reach > 0 else 0.0
        while reach > self.span:
            self._double()
        if self.span == 0.0:
            return  # only zeros so far
        counts, _ = np.histogram(finite, bins=self.bins, range=(-self.span, self.span))
        self.counts += counts

    def _double(self) -> None:
        half = self.bins // 2
        merged = self.counts.reshape(-1, 2).sum(axis=1)  # [-span, span] in bins/2 bins of twice the width
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.counts[half // 2: half // 2 + half] = merged
        self.span *= 2.0

    @property
    def centers(self) -> np.ndarray:
        width = 2 * self.span / self.bins
        return -self.span + width * (np.arange(self.bins) + 0.5)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow in exp


@dataclass(frozen=True)
class Transfer:
    """What a tensor's readers make of it, for the error its rounding causes: f and f'."""

    name: str
    value: Callable[[np.ndarray], np.ndarray]
    slope: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transfer("identity", lambda x: x, np.ones_like)
SIGMOID = Transfer("sigmoid", _sigmoid, lambda x: _sigmoid(x) * (1.0 - _sigmoid(x)))
SILU = Transfer("silu", lambda x: x * _sigmoid(x), lambda x: _sigmoid(x) * (1.0 + x * (1.0 - _sigmoid(x))))
RELU = Transfer("relu", lambda x: np.maximum(x, 0.0), lambda x: (x > 0).astype(np.float64))

# Per-op knowledge of the range choice, in one table: a tensor read only by one of these ops (and, for SiLU,
# x * Sigmoid(x): both readers) is judged by the error after that op; any other reader sees the tensor itself.
READER_TRANSFERS: Mapping[str, Transfer] = {"Sigmoid": SIGMOID, "Relu": RELU}


def reader_transfers(model: onnx.ModelProto, tensors: Collection[str]) -> dict[str, Transfer]:
    """Each of `tensors` whose every reader applies one known activation (`READER_TRANSFERS`, or SiLU as
    `x * Sigmoid(x)`, as exporters write it): that activation. Graph outputs and other tensors: identity."""
    index = ProtoIndex(model.graph)
    transfers: dict[str, Transfer] = {}
    for tensor in tensors:
        readers = index.consumers(tensor)
        if not readers or tensor in index.outputs:
            continue
        kinds = sorted(r.op_type for r in readers)
        if kinds == ["Mul", "Sigmoid"]:
            sigmoid = next(r for r in readers if r.op_type == "Sigmoid")
            mul = next(r for r in readers if r.op_type == "Mul")
            if sorted(mul.input) == sorted([tensor, sigmoid.output[0]]):
                transfers[tensor] = SILU
        elif len(set(kinds)) == 1 and kinds[0] in READER_TRANSFERS:
            transfers[tensor] = READER_TRANSFERS[kinds[0]]
    return transfers


def range_error(
    histogram: RangeHistogram, low: float | np.ndarray, high: float | np.ndarray, transfer: Transfer = IDENTITY
) -> np.ndarray:
    """Expected squared error per value, after `transfer` (what the readers make of the tensor), when
    `histogram`'s tensor is quantized to 8 bits over [low, high] (widened to hold 0, as onnxruntime does):
    rounding, f'(x)^2 step^2 / 12 for every nonzero value inside (0 is kept exactly), plus clipping,
    (f(x) - f(bound))^2 for every value outside. Vectorized over arrays of bounds."""
    low = np.minimum(np.asarray(low, dtype=np.float64), 0.0)[..., None]
    high = np.maximum(np.asarray(high, dtype=np.float64), 0.0)[..., None]
    centers, counts = histogram.centers, histogram.counts.astype(np.float64)
    total = max(float(counts.sum()), 1.0)
    step = (high - low) / LEVELS
    clipped = np.clip(centers, low, high)
    outside = ((transfer.value(centers) - transfer.value(clipped)) ** 2 * counts).sum(axis=-1)
    inside = (centers >= low) & (centers <= high)
    slopes = (transfer.slope(centers) ** 2) * counts
    rounding = np.where(inside, slopes, 0.0).sum(axis=-1)
    rounding = np.maximum(rounding - histogram.zeros * float(transfer.slope(np.zeros(1))[0]) ** 2, 0.0)
    return (outside + rounding * (step[..., 0] ** 2) / 12.0) / total


def percentile_range(histogram: RangeHistogram, percentile: float = PERCENTILE) -> tuple[float, float]:
    """The symmetric range holding `percentile` % of |x| (the `percentile` method's), within [min, max]."""
    half = histogram.bins // 2
    folded = histogram.counts[half:] + histogram.counts[:half][::-1]  # |x| in bins of the same width
    cumulative = np.cumsum(folded) / max(int(folded.sum()), 1)
    index = int(np.searchsorted(cumulative, percentile / 100.0))
    bound = histogram.span * (index + 1) / half
    return max(-bound, histogram.low), min(bound, histogram.high)


def choose_range(histogram: RangeHistogram, transfer: Transfer = IDENTITY) -> tuple[float, float, str]:
    """The range of least `range_error` (after `transfer`) among min-max, the percentile range, and the grid
    search (both bounds scaled together, then each refined alone): (low, high, the kind that won)."""
    low, high = histogram.low, histogram.high
    if not (np.isfinite(low) and np.isfinite(high)) or histogram.span == 0.0:
        return low, high, "minmax"  # infinite ranges are handled by the range rules; all zeros: nothing to choose

    def error(lows: float | np.ndarray, highs: float | np.ndarray) -> np.ndarray:
        return range_error(histogram, lows, highs, transfer)

    candidates: dict[str, tuple[float, float]] = {"minmax": (low, high), "percentile": percentile_range(histogram)}
    errors = {kind: float(error(*bounds)) for kind, bounds in candidates.items()}
    best = int(np.argmin(error(_GRID * low, _GRID * high)))
    best_low = float(_GRID[best] * low)
    best_high = float(_GRID[int(np.argmin(error(np.full_like(_GRID, best_low), _GRID * high)))] * high)
    best_low = float(_GRID[int(np.argmin(error(_GRID * low, np.full_like(_GRID, best_high))))] * low)
    candidates["mse"] = (best_low, best_high)
    errors["mse"] = float(error(best_low, best_high))
    kind = min(errors, key=lambda k: (errors[k], RANGE_KINDS.index(k)))  # ties: the simplest kind
    return candidates[kind][0], candidates[kind][1], kind


class _TensorRangeCollector:
    """Stands in for onnxruntime's HistogramCollector inside its HistogramCalibrater (which calls `collect`
    with every calibrated tensor's outputs of one chunk): a `RangeHistogram` per tensor."""

    def __init__(self, transfers: Mapping[str, Transfer]) -> None:
        self.histograms: dict[str, RangeHistogram] = {}
        self.transfers = transfers

    def collect(self, name_to_arr: Mapping[str, Sequence[np.ndarray]]) -> None:
        for name, arrays in name_to_arr.items():
            histogram = self.histograms.setdefault(name, RangeHistogram())
            for array in arrays:
                histogram.add(array)

    def choose(self) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, int]]:
        """Every tensor's chosen range (float32 bounds) and how many tensors each kind won."""
        ranges, kinds = {}, dict.fromkeys(RANGE_KINDS, 0)
        for name, histogram in self.histograms.items():
            low, high, kind = choose_range(histogram, self.transfers.get(name, IDENTITY))
            ranges[name] = (np.array(low, dtype=np.float32), np.array(high, dtype=np.float32))
            kinds[kind] += 1
        return ranges, kinds


# ------------------------------------------------------------------------------------------ calibration


def _calibrated_tensors(model: onnx.ModelProto, op_types: Collection[str] | None = None) -> set[str]:
    """The tensors onnxruntime's calibrator collects for `model`: float inputs and outputs of every node (of
    `op_types`, when given)."""
    graph = model.graph
    values = {v.name: v for v in [*graph.value_info, *graph.output, *graph.input]}
    initializers = {t.name for t in graph.initializer}
    names = set()
    for node in graph.node:
        if op_types is not None and node.op_type not in op_types:
            continue
        for name in [*node.input, *node.output]:
            value = values.get(name)
            if value is not None and name not in initializers and value.type.tensor_type.elem_type in FLOAT_TYPES:
                names.add(name)
    return names


def _bytes_per_batch(
    model: onnx.ModelProto, tensors: set[str], input_shapes: Mapping[str, Sequence[int]], method: str
) -> int:
    """What onnxruntime's calibrator keeps per batch until its collection call ends: for minmax a min and a
    max per tensor (it reduces in the graph), for the histogram methods every calibrated tensor whole."""
    if method == "minmax":
        return max(1, 2 * 4 * len(tensors))
    infos = infer_tensor_infos(model, input_shapes)
    total = 0
    for name in tensors:
        info = infos.get(name)
        if info is not None:
            total += int(np.prod(info.shape, dtype=np.int64)) * info.dtype.itemsize
    return max(total, 1)


class _ChunkReader:
    """A CalibrationDataReader over one chunk: up to `limit` batches of one feed shape, then None.

    The histogram calibrators stack the outputs of one collection call, so a chunk never mixes batch
    shapes (the last batch of a symbolic-batch dataset is smaller). Counts what the calibrator holds.
    """

    def __init__(self, batches: _Peekable, limit: int, on_batch: Callable[[Batch], None]) -> None:
        self._batches, self._limit, self._on_batch = batches, limit, on_batch
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self.held = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.held >= self._limit:
            return None
        batch = self._batches.peek()
        if batch is None:
            return None
        shapes = {name: array.shape for name, array in batch.feeds.items()}
        if self._shapes is not None and shapes != self._shapes:
            return None
        self._shapes = shapes
        self._batches.advance()
        self.held += 1
        self._on_batch(batch)
        return batch.feeds


class _Peekable:
    def __init__(self, iterator: Iterator[Batch]) -> None:
        self._iterator = iterator
        self._next: Batch | None = None
        self._done = False

    def peek(self) -> Batch | None:
        if self._next is None and not self._done:
            self._next = next(self._iterator, None)
            self._done = self._next is None
        return self._next

    def advance(self) -> None:
        self._next = None


def _limited(batches: Iterator[Batch], count: int) -> Iterator[Batch]:
    for index, batch in enumerate(batches):
        if index >= count:
            return
        yield batch


def _create_calibrator(
    model_path: Path, method: str, scratch: Path, only: Collection[str] | None = None,
    transfers: Mapping[str, Transfer] | None = None,
) -> Any:
    """onnxruntime's calibrator for `method`, with the settings `quantize_static` would give it (the tensors
    of every op type it quantizes, or of those `only`), and a session of ours (quiet logging). `tensor`:
    onnxruntime's histogram calibrater collecting into our `RangeHistogram`s (judged after `transfers`)."""
    from onnxruntime.quantization import calibrate as ort_calibrate
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    op_types = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))  # what quantize_static calibrates by default
    if only is not None:
        op_types = [op for op in op_types if op in only]
    augmented = str(scratch / "augmented.onnx")
    if method == "minmax":
        calibrator = ort_calibrate.MinMaxCalibrater(model_path, op_types, augmented)
    elif method == "tensor":
        calibrator = ort_calibrate.HistogramCalibrater(model_path, op_types, augmented)
        calibrator.collector = _TensorRangeCollector(transfers or {})
    elif method == "entropy":
        calibrator = ort_calibrate.EntropyCalibrater(model_path, op_types, augmented)
    else:
        calibrator = ort_calibrate.PercentileCalibrater(model_path, op_types, augmented, num_bins=2048, symmetric=True)
    calibrator.augment_graph()
    calibrator.infer_session = open_session(augmented, opt_level="none")
    return calibrator


def calibrate(
    prepared: onnx.ModelProto,
    dataset: Dataset,
    method: str = "minmax",
    *,
    batches: int | None = None,
    memory: int = CALIBRATION_MEMORY,
    cache_path: str | os.PathLike[str],
    progress: Progress | None = None,
    op_types: Collection[str] | None = None,
) -> CalibrationSummary:
    """Calibrate `prepared` on the first `batches` batches of `dataset` (all when None) in bounded memory
    and write the ranges to `cache_path` (onnxruntime's calibration cache, read by `quantize_with_ranges`).
    `op_types`: only the tensors of nodes of these types (a placement's: every other range would go unread;
    the histogram methods spend most of their time on the tensors they collect).

    Raises DataError when onnxruntime cannot run a batch or a range comes out NaN or infinite.
    """
    total = dataset.num_batches if batches is None else min(batches, dataset.num_batches)
    if total < 1:
        raise DataError(f"{dataset.description}: no batches to calibrate on")
    tensors = _calibrated_tensors(prepared, op_types)
    per_batch = _bytes_per_batch(prepared, tensors, dataset.input_shapes, method)
    chunk = max(1, memory // per_batch)
    done = 0
    peak = 0
    samples = min(dataset.num_samples, total * dataset.batch_size)

    def on_batch(batch: Batch) -> None:
        nonlocal done
        done += 1
        for name, array in batch.feeds.items():
            if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                raise DataError(
                    f"{dataset.description}: calibration batch {done} holds NaN or infinite values in input "
                    f"{name!r}; calibration data must be finite"
                )
        if progress is not None:
            progress("calibrating", done, total)

    from onnxruntime.quantization import calibrate as ort_calibrate

    with tempfile.TemporaryDirectory(prefix="onnxslim-calib-") as scratch, quiet_onnxruntime():
        model_path = Path(scratch) / "prepared.onnx"
        onnx.save_model(prepared, str(model_path))
        try:
            transfers = reader_transfers(prepared, tensors) if method == "tensor" else None
            calibrator = _create_calibrator(model_path, method, Path(scratch), op_types, transfers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise UnsupportedModelError(f"onnxruntime cannot prepare the model for calibration: {first_line(e)}") from e
        source = _Peekable(_limited(dataset.batches(), total))
        while source.peek() is not None:
            first = source.peek()
            assert first is not None
            reader = _ChunkReader(source, chunk, on_batch)
            try:
                calibrator.collect_data(reader)
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
                shapes = {name: list(array.shape) for name, array in first.feeds.items()}
                raise DataError(
                    f"{dataset.description}: onnxruntime failed to run calibration batch {done} (inputs {shapes}): "
                    f"{first_line(e)}"
                ) from e
            peak = max(peak, reader.held)
        kinds: dict[str, int] = {}
        try:
            if method == "tensor":
                chosen, kinds = calibrator.collector.choose()
                ranges = ort_calibrate.TensorsData(ort_calibrate.CalibrationMethod.MinMax, chosen)
            else:
                ranges = calibrator.compute_data()
        except Exception as e:  # noqa: BLE001 - onnxruntime raises anything from ValueError to AssertionError
            raise UnsupportedModelError(f"onnxruntime's {method} calibrator failed: {first_line(e)}") from e
        infinite = _check_ranges(ranges, dataset.description)
        ort_calibrate.save_tensors_data(ranges, cache_path)
    return CalibrationSummary(
        method=method, data=dataset.description, samples=samples, batches=total, batch_size=dataset.batch_size,
        tensors=len(ranges.data), chunk_batches=chunk, bytes_per_batch=per_batch,
        memory_bound_bytes=chunk * per_batch, peak_held_batches=peak, random=dataset.is_random,
        infinite_ranges=infinite, range_kinds=kinds,
    )


def _check_ranges(ranges: Any, description: str) -> tuple[str, ...]:
    """The tensors whose calibrated range is infinite, made finite in `ranges` (they stay fp32: see
    `quant_guard.nonfinite_offenders`). A NaN range is refused: the data or the model is broken. Infinite ones
    are normal in exports that add float32-min as an attention mask (Hugging Face BERT: scores + mask →
    Softmax)."""
    infinite = []
    for name, data in ranges.items():
        low, high = (np.asarray(v) for v in data.range_value)
        if np.any(np.isnan(low)) or np.any(np.isnan(high)):
            raise DataError(
                f"{description}: calibration gave tensor {name!r} a range of [{low}, {high}]: the data holds NaN "
                "values, or the model produces them on it. Check the calibration data."
            )
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            infinite.append(name)
            big = float(np.finfo(np.float32).max) / 4
            data.lowest = np.nan_to_num(low, neginf=-big, posinf=big).astype(low.dtype)
            data.highest = np.nan_to_num(high, neginf=-big, posinf=big).astype(high.dtype)
    if infinite:
        logger.info("calibrated ranges are infinite for %d tensor(s) (%s): they stay fp32", len(infinite), infinite[:3])
    return tuple(infinite)
