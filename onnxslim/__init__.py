"""onnxslim: post-training channel pruning and int8 quantization for ONNX models.

The public names are imported on first use (PEP 562), so `import onnxslim.prune` does not load the
quantizer and `onnxslim --help` does not load onnxruntime. Function names never shadow a subpackage
(`optimize` is a function; the search lives in `onnxslim.optimizer`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOMES = {
    "OnnxSlimError": "onnxslim.errors",
    "OptimizeOptions": "onnxslim.optimizer",
    "benchmark": "onnxslim.bench",
    "inspect_model": "onnxslim.model_info",
    "load_model": "onnxslim.io",
    "measure_sensitivity": "onnxslim.prune",
    "open_dataset": "onnxslim.calib",
    "optimize": "onnxslim.optimizer",
    "prune_model": "onnxslim.prune",
    "quantize_model": "onnxslim.quant",
    "save_model": "onnxslim.io",
    "sweep": "onnxslim.optimizer",
    "validate": "onnxslim.io",
}

__all__ = [
    "OnnxSlimError",
    "OptimizeOptions",
    "__version__",
    "benchmark",
    "inspect_model",
    "load_model",
    "measure_sensitivity",
    "open_dataset",
    "optimize",
    "prune_model",
    "quantize_model",
    "save_model",
    "sweep",
    "validate",
]

if TYPE_CHECKING:
    from onnxslim.bench import benchmark
    from onnxslim.calib import open_dataset
    from onnxslim.errors import OnnxSlimError
    from onnxslim.io import load_model, save_model, validate
    from onnxslim.model_info import inspect_model
    from onnxslim.optimizer import OptimizeOptions, optimize, sweep
    from onnxslim.prune import measure_sensitivity, prune_model
    from onnxslim.quant import quantize_model


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'onnxslim' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
