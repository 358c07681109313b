"""onnxslim: post-training channel pruning and int8 quantization for ONNX models."""

from onnxslim.bench import benchmark
from onnxslim.calib import open_dataset
from onnxslim.errors import OnnxSlimError
from onnxslim.io import load_model, save_model, validate
from onnxslim.model_info import inspect_model
from onnxslim.pipeline import OptimizeOptions, optimize, sweep
from onnxslim.prune import prune_model
from onnxslim.prune.sensitivity import measure_sensitivity
from onnxslim.quant import quantize_model

__version__ = "0.1.0"

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
