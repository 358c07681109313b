"""The int8 baseline: plain onnxruntime static quantization of the MNIST reference models, benchmarked.

    python benchmarks/int8_baseline.py [--out DIR] [--batch B] [--repeat N]

For each of models/mnist_resnet.onnx and models/mnist_mobilenet.onnx: quantize with
`onnxruntime.quantization.quantize_static` (QDQ format, every other setting at its default, no
pre-processing) calibrated on models/mnist_calib.npz, then run `onnxslim bench fp32 int8 --data
models/mnist_eval.npz` and print its table: latency and speedup, size, accuracy and fidelity of the int8
model against the fp32 one. This is what onnxslim's own quantization has to beat. Runs in well under a
minute on two cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

from onnxslim.calib import DataOptions, open_dataset

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
CALIB = MODELS / "mnist_calib.npz"
EVAL = MODELS / "mnist_eval.npz"
NAMES = ("mnist_resnet", "mnist_mobilenet")


class NpzReader(CalibrationDataReader):
    """Feeds the calibration set to onnxruntime's calibrator through onnxslim's data reader."""

    def __init__(self, model_path: Path, batch: int) -> None:
        dataset = open_dataset(CALIB, onnx.load(str(model_path)), DataOptions(batch=batch))
        self._batches: Iterator = (b.feeds for b in dataset.batches())

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def quantize(name: str, out: Path) -> Path:
    source = MODELS / f"{name}.onnx"
    target = out / f"{name}_int8.onnx"
    quantize_static(str(source), str(target), NpzReader(source, batch=32), quant_format=QuantFormat.QDQ)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="keep the int8 models (and bench_*.md) here")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        for name in NAMES:
            int8 = quantize(name, out)
            command = [
                sys.executable, "-m", "onnxslim", "bench", str(MODELS / f"{name}.onnx"), str(int8),
                "--data", str(EVAL), "--batch", str(args.batch), "--repeat", str(args.repeat),
                "--markdown", str(out / f"bench_{name}.md"),
            ]
            print(f"$ onnxslim bench models/{name}.onnx {int8.name} --data models/{EVAL.name} "
                  f"--batch {args.batch} --repeat {args.repeat}", flush=True)
            subprocess.run(command, check=True)
            print(flush=True)


if __name__ == "__main__":
    main()
