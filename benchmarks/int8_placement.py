"""`onnxslim quantize` at its defaults on PP-OCRv4's recognizer: the time of each step, the placement,
speed and accuracy against fp32, and the guard's group measure against the one-gate-at-a-time measure.

    python benchmarks/int8_placement.py [--cache DIR] [--threads N] [--eval-batch 25] [--placements]
                                        [--agreement compute all] [--placements] [--markdown]

The model and data are benchmarks/int8_ppocr.py's (rapidocr-onnxruntime 1.4.4's `ch_PP-OCRv4_rec_infer.onnx`,
text lines rendered with Pillow, scored by greedy CTC decoding against the rendered text: characters and
exact lines), downloaded and rendered once into the cache.

1. `quantize_model` with the default options: 200 calibration lines at batch 1 (the timing shape), the 300
   evaluation lines as `eval_data` (batched by `--eval-batch`, which only speeds the judging up: the
   comparison is the same). Printed: the wall time of each step and in all, the process's CPU time (all
   its threads: on a shared machine the wall time also counts other jobs), the placement chosen and why,
   the measure, the fallback's trials, the speedup the speed guard measured, characters and lines of fp32
   and of the model written.
2. `--placements`: each placement as plain int8 (`max_trials=0`), then fp32, the three and the model
   written timed in one interleaved run (`measure_latencies`, the speed guard's own, 10 s), with
   characters and lines: what the placement step chose between, and what full int8 costs.
3. `--agreement P ...`: for each placement P, every rounding of the plain int8 model measured both ways
   on the same calibration samples: one gate at a time (`measure_gate_deficits`, one run per gate) and by
   group testing at the guard's resolution (`measure_hierarchically`). Printed: runs and time of each,
   the gates at or above the resolution and how many the groups found (with their deficits equal), the
   rank correlation over all gates, and whether the fallback's blocks (ranked by fidelity per MAC) come in
   the same order as far as the resolution reaches.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_ppocr import REC_SEED, _rec_samples, _scorer, fetch_models, find_fonts, render_data  # noqa: E402

from onnxslim.calib import DataOptions, open_dataset  # noqa: E402
from onnxslim.evaluate import AccuracyBudget  # noqa: E402
from onnxslim.io import load_model  # noqa: E402
from onnxslim.quant import QuantizeOptions, QuantizeResult, quantize_model  # noqa: E402
from onnxslim.quant.config import TimingBudget  # noqa: E402
from onnxslim.quant.guard import RESOLUTION, layer_norm_blocks, node_costs, rank_gates  # noqa: E402
from onnxslim.quant.quantizer import QuantState, apply_range_rules, place_ops, prepare  # noqa: E402
from onnxslim.quant.sensitivity import measure_gate_deficits, measure_hierarchically  # noqa: E402
from onnxslim.quant.speed import measure_latencies  # noqa: E402
from onnxslim.report.format import format_table  # noqa: E402
from onnxslim.runtime import physical_cores  # noqa: E402

AGREEMENT_SAMPLES = 8  # calibration samples both measures run on (the guard picks 4-16 by time)


def _ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks with ties averaged."""
    array = np.asarray(values, dtype=np.float64)
    order = array.argsort(kind="stable")
    ranks = np.empty(len(array))
    ranks[order] = np.arange(len(array))
    for value in np.unique(array):
        tied = array == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _timed(run: Callable[[], QuantizeResult]) -> tuple[QuantizeResult, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _defaults(loaded, calib, evaluation, threads: int | None, score: Callable) -> tuple[list[str], QuantizeResult]:
    result, wall, cpu = _timed(lambda: quantize_model(loaded, calib, QuantizeOptions(threads=threads), eval_data=evaluation))
    lines = [f"quantize at the defaults: {wall:.0f} s wall, {cpu:.0f} s CPU (all threads of this process)"]
    lines.append(format_table(
        ["step", "wall s", "CPU s"],
        [(name, f"{s:.1f}", f"{result.step_cpu_seconds.get(name, 0.0):.1f}") for name, s in result.step_seconds.items()],
    ))
    placement = result.placement
    if placement is not None:
        lines.append(f"placement: {placement.chosen} ({placement.int8_nodes} nodes may be int8): {placement.reason}")
        for timing in placement.timings:
            if timing.speedup is not None:
                lines.append(f"  timed {timing.config.label}: {timing.speedup:.2f}x "
                             f"({timing.speedup_low or 0:.2f}-{timing.speedup_high or 0:.2f})")
    if result.measure is not None:
        m = result.measure
        lines.append(f"measure: {m.gates} roundings, {len(m.alone)} measured alone, {m.runs} runs on {m.samples} "
                     f"samples, {m.seconds:.1f} s")
    for trial in result.method_trials:
        lines.append(f"  method {trial.method}: score {trial.check.score:.4f}{' (meets)' if trial.check.met else ''}")
    for trial in result.exclusion_trials:
        share = trial.cost / result.model_macs if result.model_macs else 0.0
        lines.append(f"  fallback: top {trial.blocks} block(s), {trial.nodes} node(s), {100 * share:.1f}% of the MACs "
                     f"fp32: score {trial.check.score:.4f}{' (meets)' if trial.check.met else ''}")
    macs = f", {100 * result.fp32_macs / result.model_macs:.1f}% of the MACs" if result.model_macs and result.fp32_macs else ""
    lines.append(f"kept fp32 by the guard: {len(result.fp32_nodes)} node(s){macs}")
    speed = "-" if result.speedup is None else f"{result.speedup:.2f}x ({result.speedup_low or 0:.2f}-{result.speedup_high or 0:.2f})"
    lines.append(f"written: {'int8 ' + result.config.label if result.quantized and result.config else 'fp32'}; "
                 f"speed guard's measure of the int8 model: {speed}; budget met: {result.budget_met}")
    lines.append(f"fp32: {score(loaded.model)}; written: {score(result.model)}"
                 + ("" if result.quantized else f"; int8 not written: {score(result.int8_model)}"))
    return lines, result


def _placements(loaded, calib, evaluation, threads: int, score: Callable, written: onnx.ModelProto | None) -> list[str]:
    models: list[tuple[str, onnx.ModelProto]] = [("fp32", loaded.model)]
    for placement in ("compute", "kernels", "all"):
        options = QuantizeOptions(threads=threads, placement=placement, max_trials=0, force=True)
        result = quantize_model(loaded, calib, options, eval_data=evaluation)
        models.append((f"plain int8, {placement}", result.int8_model))
    if written is not None:
        models.append(("written at the defaults", written))
    feeds = next(iter(calib.batches())).feeds
    timings = measure_latencies([m for _, m in models], feeds, threads=threads, budget=TimingBudget(seconds=10.0))
    rows = []
    for (name, model), timing in zip(models, timings, strict=True):
        ratio = timings[0].median_ms / timing.median_ms
        spread = f" ({min(timing.block_speedups):.2f}-{max(timing.block_speedups):.2f})" if timing.block_speedups else ""
        rows.append((name, f"{timing.median_ms:.2f}", f"{ratio:.2f}x{spread}", score(model)))
    return ["placements, one interleaved run (batch 1, 10 s):",
            format_table(["model", "median ms", "speedup", "characters / lines"], rows)]


def _agreement(loaded, calib, evaluation, threads: int, placement: str) -> list[str]:
    options = QuantizeOptions(threads=threads, placement=placement)
    with tempfile.TemporaryDirectory(prefix="onnxslim-bench-") as scratch:
        state = QuantState(options, loaded.model, loaded.size_bytes, calib, evaluation, Path(scratch))
        for step in (prepare, apply_range_rules, place_ops):
            step(state)
        gated, gates = state.gated()
        assert state.evaluator is not None
        samples = calib.batches()
        chosen = [b for _, b in zip(range(AGREEMENT_SAMPLES), samples, strict=False)]
        common = dict(outputs=state.evaluator.outputs, layouts=state.evaluator.ensure_layouts(), rows=state.evaluator.rows,
                      threads=threads, seconds=0.0)
        budget = AccuracyBudget().resolved
        assert budget.min_fidelity is not None
        resolution = RESOLUTION * (1.0 - budget.min_fidelity)
        exact = measure_gate_deficits(gated, gates, iter(chosen), **common)  # type: ignore[arg-type]
        grouped = measure_hierarchically(gated, gates, iter(chosen), resolution=resolution, **common)  # type: ignore[arg-type]
        names = [g.name for g in gates]
        mattering = {n for n in names if exact.deficits[n] >= resolution}
        found = mattering & grouped.alone
        equal = all(abs(grouped.deficits[n] - exact.deficits[n]) <= 1e-9 for n in grouped.alone)
        norms = layer_norm_blocks(state.model)
        costs = node_costs(state.costs.layers)
        quantizable = state.quantizable()
        blocks_exact = [b.gate for b in rank_gates(exact.deficits, gates, norms, quantizable, minimum=resolution, costs=costs)]
        blocks_grouped = [b.gate for b in rank_gates(grouped.deficits, gates, norms, quantizable, minimum=resolution, costs=costs)]
        top = [n for n in sorted(names, key=lambda n: -exact.deficits[n])[:5]]
        return [
            f"agreement, placement {placement}: {len(gates)} roundings on {exact.samples} calibration samples, "
            f"resolution {resolution:.4g} (the guard's at the default budget)",
            format_table(
                ["measure", "runs", "seconds", "sum of deficits"],
                [("one at a time", str(exact.runs), f"{exact.seconds:.1f}", f"{sum(exact.deficits.values()):.4f}"),
                 ("group testing", str(grouped.runs), f"{grouped.seconds:.1f}", f"{sum(grouped.deficits.values()):.4f}")],
            ),
            f"  gates at or above the resolution: {len(mattering)}; found and measured alone by the groups: "
            f"{len(found)} (deficits equal: {equal}); measured alone in all: {len(grouped.alone)}",
            f"  Spearman rank correlation over all {len(gates)} gates: {spearman([exact.deficits[n] for n in names], [grouped.deficits[n] for n in names]):.3f}",
            f"  the fallback's blocks above the resolution (fidelity per MAC): {len(blocks_exact)} one at a time, "
            f"{len(blocks_grouped)} by groups, same order: {blocks_exact == blocks_grouped}",
            "  largest deficits one at a time: " + ", ".join(f"{n} {exact.deficits[n]:.4f}" for n in top),
        ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "onnxslim-bench" / "ppocr")
    parser.add_argument("--threads", type=int, default=None, help="quantize's timing threads and scoring's")
    parser.add_argument("--eval-batch", type=int, default=25, help="batch of the evaluation lines (judging only)")
    parser.add_argument("--no-defaults", action="store_true", help="skip the run at the defaults")
    parser.add_argument("--placements", action="store_true", help="time and score each placement as plain int8")
    parser.add_argument("--agreement", nargs="*", default=[], choices=("compute", "kernels", "all"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    threads = args.threads or physical_cores()
    args.cache.mkdir(parents=True, exist_ok=True)
    path = fetch_models(args.cache)["rec"]
    font_source, fonts = find_fonts()
    font_tag = {"DejaVu from matplotlib": "mpl", "DejaVu from the system": "system"}.get(font_source, "pil")
    rng = random.Random(REC_SEED)
    calib_path, eval_path, answers = render_data(
        args.cache / f"data-{font_tag}", "rec200-300", lambda n: _rec_samples(rng, fonts, n), (200, 300)
    )
    score = _scorer(path, np.load(eval_path)["x"], answers, threads)
    loaded = load_model(path)
    calib = open_dataset(calib_path, loaded.model, DataOptions())
    evaluation = open_dataset(eval_path, loaded.model, DataOptions(batch=args.eval_batch))
    print(f"PP-OCRv4 recognizer ({path.name}, {path.stat().st_size / 2**20:.1f} MiB); 200 calibration lines (batch 1), "
          f"300 evaluation lines (batch {args.eval_batch}), {font_source}; {threads} threads")
    written = None
    if not args.no_defaults:
        lines, result = _defaults(loaded, calib, evaluation, args.threads, score)
        written = result.model if result.quantized else None
        print("\n".join(lines), flush=True)
    if args.placements:
        print("\n".join(_placements(loaded, calib, evaluation, threads, score, written)), flush=True)
    for placement in args.agreement:
        print("\n".join(_agreement(loaded, calib, evaluation, threads, placement)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
