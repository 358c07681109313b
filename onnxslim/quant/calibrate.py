"""int8 quantization, calibration in bounded memory: onnxruntime's calibrators fed chunk by chunk, so that
memory stays within `calibration_memory` whatever the number of samples (see quantize.py)."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxslim.calib import Batch, Dataset
from onnxslim.errors import DataError, UnsupportedModelError, first_line
from onnxslim.io import infer_tensor_infos
from onnxslim.progress import Progress
from onnxslim.quant.config import CALIBRATION_MEMORY, FLOAT_TYPES, CalibrationSummary
from onnxslim.runtime import open_session, quiet_onnxruntime

logger = logging.getLogger(__name__)


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


def _create_calibrator(model_path: Path, method: str, scratch: Path, only: Collection[str] | None = None) -> Any:
    """onnxruntime's calibrator for `method`, with the settings `quantize_static` would give it (the tensors
    of every op type it quantizes, or of those `only`), and a session of ours (quiet logging)."""
    from onnxruntime.quantization import calibrate as ort_calibrate
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    op_types = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))  # what quantize_static calibrates by default
    if only is not None:
        op_types = [op for op in op_types if op in only]
    augmented = str(scratch / "augmented.onnx")
    if method == "minmax":
        calibrator = ort_calibrate.MinMaxCalibrater(model_path, op_types, augmented)
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

    with tempfile.TemporaryDirectory(prefix="onnxslim-calib-") as scratch, quiet_onnxruntime():
        model_path = Path(scratch) / "prepared.onnx"
        onnx.save_model(prepared, str(model_path))
        try:
            calibrator = _create_calibrator(model_path, method, Path(scratch), op_types)
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
        try:
            ranges = calibrator.compute_data()
        except Exception as e:  # noqa: BLE001 - onnxruntime raises anything from ValueError to AssertionError
            raise UnsupportedModelError(f"onnxruntime's {method} calibrator failed: {first_line(e)}") from e
        infinite = _check_ranges(ranges, dataset.description)
        from onnxruntime.quantization.calibrate import save_tensors_data

        save_tensors_data(ranges, cache_path)
    return CalibrationSummary(
        method=method, data=dataset.description, samples=samples, batches=total, batch_size=dataset.batch_size,
        tensors=len(ranges.data), chunk_batches=chunk, bytes_per_batch=per_batch,
        memory_bound_bytes=chunk * per_batch, peak_held_batches=peak, random=dataset.is_random,
        infinite_ranges=infinite,
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
