"""onnxslim: post-training channel pruning and int8 quantization for ONNX models."""

from onnxslim.errors import OnnxSlimError
from onnxslim.io import load_model, save_model, validate

__version__ = "0.1.0"

__all__ = ["OnnxSlimError", "__version__", "load_model", "save_model", "validate"]
