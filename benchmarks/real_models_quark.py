"""AMD Quark's ONNX quantizer as a peer for benchmarks/real_models.py, run inside the venv it makes for Quark.

    python benchmarks/real_models_quark.py MODEL.onnx OUT.onnx CALIB.npz [--config A8W8]

Quark 0.13's default configuration for general CPU int8 (its own recipe table: "CPU general -> A8W8",
int8 symmetric activations and weights, MinMax, QDQ), calibrated on every sample of CALIB.npz, one sample
per batch, as the other peers are. Quark pins an older onnx and depends on PyPI's unrelated `onnxslim`
package, so it cannot share onnxslim's venv: this file imports neither onnxslim nor the benchmark.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("calib", type=Path)
    parser.add_argument("--config", default="A8W8")
    args = parser.parse_args(argv)

    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader
    from quark.onnx import ModelQuantizer
    from quark.onnx.quantization.config.config import Config
    from quark.onnx.quantization.config.custom_config import get_default_config

    class NpzReader(CalibrationDataReader):
        def __init__(self, path: Path) -> None:
            with np.load(path) as data:
                self.arrays = {name: data[name] for name in data.files if name != "labels"}
            self.count = len(next(iter(self.arrays.values())))
            self.index = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.index >= self.count:
                return None
            feeds = {name: array[self.index:self.index + 1] for name, array in self.arrays.items()}
            self.index += 1
            return feeds

        def rewind(self) -> None:
            self.index = 0

    quantizer = ModelQuantizer(Config(global_quant_config=get_default_config(args.config)))
    quantizer.quantize_model(str(args.model), str(args.out), NpzReader(args.calib))
    return 0 if args.out.exists() else 1


if __name__ == "__main__":
    sys.exit(main())
