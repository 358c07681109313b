"""fp32 against int8 with `onnxslim quantize`'s speed guard, on the reference models, in one run.

    python benchmarks/quantize_speed.py [--batch 1] [--threads N] [--method minmax] [--no-bench-archs]

For each model: `quantize_model` with the default options (QDQ, u8 activations, s8 per-channel weights,
minmax), which times the requested int8 model against fp32 (same threads, same batch, interleaved, median)
and, when it is not at least 5% faster, tries the alternatives in order and keeps the fastest. Prints one
row per model (the decision, latency ratio from that run, size and weight-bytes ratios, accuracy of fp32
and int8) and then every candidate the guard timed.

* MNIST models (models/mnist_*.onnx): calibrated on models/mnist_calib.npz, accuracy and fidelity on the
  1000 held-out samples of models/mnist_eval.npz.
* Benchmark architectures (models/bench/*.onnx, written by `python -m models.build`): calibrated on 16
  random samples (`random:16`): their speed is real, their accuracy is not measured.

Speed ratios are from one interleaved run on this machine; rerun to see the spread. A few minutes on two
cores, most of it the 224/320 architectures (skip them with --no-bench-archs).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import onnx

from onnxslim.calib import DataOptions, open_dataset
from onnxslim.io import load_model
from onnxslim.quant import QuantizeOptions, QuantizeResult, quantize_model
from onnxslim.report.format import format_bytes, format_table

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
MNIST = ("mnist_resnet", "mnist_mobilenet", "mnist_resnet_bn", "mnist_mobilenet_bn")
BENCH = ("resnet18_like", "mobilenetv2_like", "yolo_like")


def _weight_bytes(model: onnx.ModelProto, int8: bool) -> int:
    wanted = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT32) if int8 else (onnx.TensorProto.FLOAT,)
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer if t.data_type in wanted)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def run_one(path: Path, calib: str, eval_data: str | None, batch: int, options: QuantizeOptions) -> tuple[QuantizeResult, float, str]:
    loaded = load_model(path)
    data_options = DataOptions(batch=batch)
    calib_data = open_dataset(calib, loaded.model, data_options)
    evaluation = open_dataset(eval_data, loaded.model, DataOptions(batch=100)) if eval_data else None
    start = time.perf_counter()
    result = quantize_model(loaded, calib_data, options, eval_data=evaluation)
    elapsed = time.perf_counter() - start
    fp32_weights = _weight_bytes(loaded.model, int8=False)
    # the fastest int8 candidate's weights (int8 values plus fp32 scales and biases), kept or not
    int8_weights = _weight_bytes(result.int8_model, int8=True) + _weight_bytes(result.int8_model, int8=False)
    return result, elapsed, f"{fp32_weights / max(int8_weights, 1):.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1, help="batch size timed (and calibrated) [default: 1]")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads [default: physical cores]")
    parser.add_argument("--method", default="minmax", choices=("minmax", "entropy", "percentile"))
    parser.add_argument("--no-bench-archs", dest="bench_archs", action="store_false",
                        help="only the MNIST models (skip models/bench)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    options = QuantizeOptions(method=args.method, threads=args.threads)

    jobs: list[tuple[str, Path, str, str | None]] = [
        (name, MODELS / f"{name}.onnx", str(MODELS / "mnist_calib.npz"), str(MODELS / "mnist_eval.npz"))
        for name in MNIST
        if (MODELS / f"{name}.onnx").exists()
    ]
    if args.bench_archs:
        jobs += [
            (name, MODELS / "bench" / f"{name}.onnx", "random:16", None)
            for name in BENCH
            if (MODELS / "bench" / f"{name}.onnx").exists()
        ]
    rows, details = [], []
    for name, path, calib, eval_data in jobs:
        print(f"quantizing {name} ...", file=sys.stderr, flush=True)
        result, elapsed, weight_ratio = run_one(path, calib, eval_data, args.batch, options)
        label = result.config.label if result.config else "-"
        rows.append([
            name,
            "int8" if result.quantized else "fp32 (guard)",
            label,
            f"{result.latency_fp32_ms:.3f}" if result.latency_fp32_ms else "-",
            f"{result.latency_int8_ms:.3f}" if result.latency_int8_ms else "-",
            f"{result.speedup:.2f}x" if result.speedup else "-",
            format_bytes(result.size_fp32),
            format_bytes(result.size_int8 or 0),
            f"{result.size_fp32 / (result.size_int8 or 1):.2f}x",
            weight_ratio,
            _percent(result.accuracy_fp32.top1 if result.accuracy_fp32 else None),
            _percent(result.accuracy_int8.top1 if result.accuracy_int8 else None),
            f"{result.fidelity.cosine:.5f}" if result.fidelity else "-",
            f"{elapsed:.0f}s",
        ])
        for candidate in result.candidates:
            details.append([
                name,
                candidate.config.label,
                f"{candidate.fp32_latency_ms:.3f}" if candidate.fp32_latency_ms else "-",
                f"{candidate.latency_ms:.3f}" if candidate.latency_ms else "-",
                f"{candidate.speedup:.2f}x" if candidate.speedup else (candidate.error or "-"),
                str(candidate.nodes_quantized if candidate.nodes_quantized is not None else "-"),
            ])
        threads = result.threads
    print(f"batch {args.batch}, {threads} threads, calibration {args.method}; speedup = fp32 median / int8 median, "
          "interleaved in one run; int8 kept when >= 1.05x")
    print(format_table(
        ["model", "written", "int8 config (best)", "fp32 ms", "int8 ms", "speedup", "fp32 size", "int8 size",
         "size ratio", "weights ratio", "fp32 acc", "int8 acc", "cosine", "time"],
        rows,
    ))
    print()
    print("candidates the speed guard timed (each against fp32 in the same run)")
    print(format_table(["model", "config", "fp32 ms", "int8 ms", "speedup", "int8 nodes"], details))


if __name__ == "__main__":
    main()
