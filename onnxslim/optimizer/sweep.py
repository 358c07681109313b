"""`sweep`: the trade-off before choosing — the model pruned (and int8) at several MAC fractions, all
measured side by side with the original in one interleaved run."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from onnxslim.bench import BenchOptions, benchmark, physical_cores
from onnxslim.calib import DataOptions, open_dataset
from onnxslim.errors import UsageError
from onnxslim.io import load_model, save_model
from onnxslim.optimizer.config import OptimizeOptions, SweepPoint, SweepResult, default_budget
from onnxslim.optimizer.search import Judge, Levels, quantize_for
from onnxslim.progress import Progress

__all__ = ["sweep"]


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
    judge = Judge(loaded.model, calib_data, evaluation, threads)
    budget = default_budget(options, judge.labelled)
    built: list[tuple[float, float, bool, onnx.ModelProto]] = []
    levels = Levels(loaded, options, calib_data, input_shapes, progress, judge.calibration_samples)
    for number, target in enumerate(sorted(set(targets), reverse=True), start=1):
        if target >= 1.0:
            model_at, kept = loaded.model, 1.0
        else:
            result, _ = levels.prune(target, number)
            model_at, kept = result.model, result.macs_after / result.macs_before
        is_int8 = False
        if quantize:
            q = quantize_for(model_at, calib_data, evaluation, budget, options, progress)
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
