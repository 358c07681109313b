"""`onnxslim optimize` end to end: original vs optimized on the reference and benchmark models.

    python benchmarks/optimize.py [--only NAME ...] [--max-trials N] [--threads N]

MNIST ResNet and MobileNet (models/): a budget of 0.5 point of top-1 on models/mnist_eval.npz, calibrated
on models/mnist_calib.npz. ResNet-18-like, MobileNetV2-like and YOLO-like (models/build.py, random
weights, seed 0): a fidelity budget of cosine 0.99 (no labels), calibrated on 64 and judged on 16 random
inputs shaped like their probe data. For each: what optimize chose, speedup, size, accuracy or fidelity of
the final model against the original (all from optimize's own final interleaved run), and the time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.build import BUILDERS  # noqa: E402
from onnxslim.io import normalize_model, save_model  # noqa: E402
from onnxslim.optimizer import OptimizeOptions, optimize  # noqa: E402

MNIST = ("mnist_resnet", "mnist_mobilenet")


def _row(name: str, result, seconds: float) -> str:  # type: ignore[no-untyped-def]
    original = result.candidates[0].bench
    final = result.final
    if final.bench.accuracy is not None and original.accuracy is not None:
        quality = f"{100 * original.accuracy.top1:.1f}% → {100 * final.bench.accuracy.top1:.1f}%"
    else:
        quality = "1.0000" if final.check is None else f"cos {final.check.score:.4f}"
    kept = "-" if result.prune is None else f"{result.prune.macs_after / result.prune.macs_before:.2f}"
    return (
        f"{name:<18} {result.chosen:<9} {kept:>9} {final.bench.speedup:>7.2f}x "
        f"{original.size_bytes / final.bench.size_bytes:>6.2f}x {quality:>20} {len(result.trials):>6} {seconds:>6.0f}s"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append")
    parser.add_argument("--max-trials", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    names = args.only or [*MNIST, *BUILDERS]
    header = (f"{'model':<18} {'chosen':<9} {'MACs kept':>9} {'speedup':>8} {'smaller':>7} "
              f"{'accuracy / fidelity':>20} {'trials':>6} {'time':>7}")
    rows = [header, "-" * len(header)]
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            options = OptimizeOptions(max_trials=args.max_trials, threads=args.threads)
            if name in MNIST:
                model = ROOT / "models" / f"{name}.onnx"
                calib, evaluation = ROOT / "models" / "mnist_calib.npz", ROOT / "models" / "mnist_eval.npz"
            else:
                built = normalize_model(BUILDERS[name](0))[0]
                model = save_model(built, Path(folder) / f"{name}.onnx")
                shape = [d.dim_value for d in built.graph.input[0].type.tensor_type.shape.dim]
                rng = np.random.default_rng(0)
                low, high = (0.0, 1.0) if name == "yolo_like" else (-2.0, 2.0)
                calib, evaluation = Path(folder) / f"{name}_calib.npz", Path(folder) / f"{name}_eval.npz"
                input_name = built.graph.input[0].name
                np.savez(calib, **{input_name: rng.uniform(low, high, (64, *shape[1:])).astype(np.float32)})
                np.savez(evaluation, **{input_name: rng.uniform(low, high, (16, *shape[1:])).astype(np.float32)})
            start = time.perf_counter()
            result = optimize(model, calib, options, eval_data=evaluation)
            rows.append(_row(name, result, time.perf_counter() - start))
            print(rows[-1], file=sys.stderr, flush=True)
            print(f"  {result.reason}", file=sys.stderr, flush=True)
    print("onnxslim optimize, default budget (0.5 pt with labels, cosine 0.99 without), speedups from its final run")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
