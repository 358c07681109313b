"""fp32 against int8 with `onnxslim quantize`'s accuracy and speed guards, for both kinds of CPU defaults.

    python benchmarks/int8_accuracy.py [--batch 1] [--threads N] [--no-bench-archs] [--markdown]

For each model, `quantize_model` twice: with the defaults this CPU's flags give (full 8-bit weights with
VNNI) and with the defaults of a CPU without VNNI (7-bit weights, `reduce_range`, simulated by injecting
its flags). Speed is measured on *this* CPU: the no-VNNI row's speedup is what 7-bit weights cost or gain
here, not what an AVX2 CPU would measure. Its accuracy is exact for such a CPU, though: 7-bit weights
cannot saturate VPMADDUBSW, so the integer results are the same on every x86 CPU (onnxslim/cpu.py).
A third row per MNIST model gives u8 weights (U8U8, the other documented fix for non-VNNI CPUs), with no
guard, to compare its accuracy with reduce_range's.

Columns: the decision, speedup (fp32 median / int8 median, interleaved, one run), size, accuracy (MNIST:
1000 held-out samples of models/mnist_eval.npz) or fidelity score (the lower of the mean and the
worst-channel cosine; benchmark architectures calibrated and evaluated on random inputs, so their
fidelity is only indicative), nodes kept fp32 by the guard, its trials, and whether the budget held.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from onnxslim.calib import DataOptions, open_dataset
from onnxslim.cpu import cpu_from_flags, detect_cpu
from onnxslim.io import load_model
from onnxslim.quant import QuantConfig, QuantizeOptions, QuantizeResult, quantize_model
from onnxslim.report.format import format_bytes, format_table

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
MNIST = ("mnist_resnet", "mnist_mobilenet", "mnist_resnet_bn", "mnist_mobilenet_bn")
BENCH = ("resnet18_like", "mobilenetv2_like", "yolo_like")
NO_VNNI = cpu_from_flags({"sse4_1", "avx", "avx2", "fma"}, "simulated AVX2 CPU without VNNI")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _row(name: str, setting: str, result: QuantizeResult) -> list[str]:
    accuracy = "-"
    if result.accuracy_fp32 is not None and result.accuracy_int8 is not None:
        accuracy = f"{_percent(result.accuracy_fp32.top1)} -> {_percent(result.accuracy_int8.top1)}"
    trials = len(result.method_trials) - 1 + len(result.exclusion_trials)
    return [
        name,
        setting,
        "int8" if result.quantized else "fp32",
        f"{result.speedup:.2f}x" if result.speedup else "-",
        f"{format_bytes(result.size_fp32)} -> {format_bytes(result.size_int8 or 0)}",
        accuracy,
        f"{result.fidelity.score:.4f}" if result.fidelity else "-",
        str(sum(1 for n in result.fp32_nodes if n.reason != "--exclude")),
        str(trials),
        {True: "yes", False: "NO", None: "-"}[result.budget_met],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-bench-archs", dest="bench_archs", action="store_false")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    here = detect_cpu()
    jobs: list[tuple[str, Path, str, str | None]] = [
        (name, MODELS / f"{name}.onnx", str(MODELS / "mnist_calib.npz"), str(MODELS / "mnist_eval.npz"))
        for name in MNIST if (MODELS / f"{name}.onnx").exists()
    ]
    if args.bench_archs:
        jobs += [(name, MODELS / "bench" / f"{name}.onnx", "random:16", None)
                 for name in BENCH if (MODELS / "bench" / f"{name}.onnx").exists()]
    rows = []
    for name, path, calib, eval_data in jobs:
        loaded = load_model(path)
        calib_data = open_dataset(calib, loaded.model, DataOptions(batch=args.batch))
        evaluation = open_dataset(eval_data, loaded.model, DataOptions(batch=100)) if eval_data else None
        settings = [
            (f"this CPU ({'VNNI' if here.vnni else 'no VNNI' if here.vnni is False else 'unknown'})",
             QuantizeOptions(threads=args.threads, cpu=here)),
            ("no-VNNI defaults (reduce-range)", QuantizeOptions(threads=args.threads, cpu=NO_VNNI)),
        ]
        if eval_data:
            settings.append(("u8 weights (U8U8), no guard",
                             QuantizeOptions(config=QuantConfig(weights="u8", reduce_range=False), threads=args.threads,
                                             max_trials=0, force=True)))
        for setting, options in settings:
            print(f"quantizing {name}: {setting} ...", file=sys.stderr, flush=True)
            rows.append(_row(name, setting, quantize_model(loaded, calib_data, options, eval_data=evaluation)))
    print(f"batch {args.batch}; speedup: fp32 median / int8 median, interleaved, one run on this CPU "
          f"(flags: {', '.join(here.flags)})")
    print(format_table(
        ["model", "defaults", "written", "speedup", "size", "top-1 fp32 -> int8", "fidelity", "fp32 nodes",
         "trials", "budget met"],
        rows, markdown=args.markdown,
    ))


if __name__ == "__main__":
    main()
