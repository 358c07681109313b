"""Static int8 quantization with onnxruntime, guarded for accuracy and speed (`quantize_model`).

The quantizer is a pipeline of named steps over one state (`quantizer.PIPELINE`), as `prune/` is; each
concern has one module:

    config.py       constants, options (static or dynamic `mode`) (`QuantConfig`, `QuantizeOptions`) and results
    prepare.py      opset upgrade, onnxruntime's basic optimizations, type inference
    calibrate.py    calibration in bounded memory (ranges for each method)
    placement.py    which nodes may be int8: what onnxruntime runs as int8 kernels here, the placements
    guard.py        the accuracy guard: range rules, blocks, the ranking by fidelity per MAC, the bounded search
    sensitivity.py  the guard's measure: a gated int8 model, roundings switched on by groups, then alone
    speed.py        the speed guard: candidates, interleaved timing, the decision outside the noise
    quantizer.py    quantization with the ranges, the evaluator's use, the steps and `quantize_model`
"""

from onnxslim.evaluate import HOLDOUT_FRACTION
from onnxslim.quant.config import (
    CALIBRATION_MEMORY,
    COMPUTE_OP_TYPES,
    FORMATS,
    INT8_TYPES,
    METHODS,
    MIN_SPEEDUP,
    MODE_CHOICES,
    MODES,
    PLACEMENT_CHOICES,
    PLACEMENTS,
    CandidateTiming,
    ModeChoice,
    QuantConfig,
    QuantizeOptions,
    QuantizeResult,
)
from onnxslim.quant.quantizer import quantize_model

__all__ = [
    "HOLDOUT_FRACTION",
    "CALIBRATION_MEMORY",
    "COMPUTE_OP_TYPES",
    "FORMATS",
    "INT8_TYPES",
    "METHODS",
    "MIN_SPEEDUP",
    "MODE_CHOICES",
    "MODES",
    "ModeChoice",
    "PLACEMENT_CHOICES",
    "PLACEMENTS",
    "CandidateTiming",
    "QuantConfig",
    "QuantizeOptions",
    "QuantizeResult",
    "quantize_model",
]
