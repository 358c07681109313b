"""The onnxruntime format for edge deployment: a model's `.ort` file with its graph optimizations fixed
offline, and the required-operators config that builds a reduced onnxruntime with only the kernels it uses.

Converted by onnxruntime's own tool (`onnxruntime.tools.convert_onnx_models_to_ort`, the "Fixed"
optimization style at the "all" level): what onnxruntime would do at session start on this machine's CPU
execution provider is done once, here, so the device loads the result as it is. A fixed model suits the
kind of CPU it was converted on (layout and kernel choices are baked in); convert on the deployment's
architecture, or load the `.onnx` where that is not possible.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxslim.errors import UnsupportedModelError, first_line
from onnxslim.runtime import quiet_onnxruntime

__all__ = ["OrtFormat", "to_ort_format"]


@dataclass(frozen=True)
class OrtFormat:
    """A model in onnxruntime's format and the operators a reduced build must include for it."""

    model: bytes
    required_operators: str  # onnxruntime's reduced-build config (`--include_ops_by_config`)


def to_ort_format(model: onnx.ModelProto, name: str = "model") -> OrtFormat:
    """`model` converted to the ORT format (module docstring); `name` is what the config's header says it was
    made from. Raises UnsupportedModelError when onnxruntime cannot convert it."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with tempfile.TemporaryDirectory(prefix="onnxslim-ort-") as scratch:
        source = Path(scratch) / f"{name}.onnx"
        onnx.save_model(model, str(source))
        out = Path(scratch) / "out"
        try:
            with quiet_onnxruntime():
                convert_onnx_models_to_ort(source, out, [OptimizationStyle.Fixed])
        except Exception as e:  # noqa: BLE001 - the converter raises anything from RuntimeError to SystemExit's cousins
            raise UnsupportedModelError(f"onnxruntime cannot convert the model to its ORT format: {first_line(e)}") from e
        converted = out / f"{name}.ort"
        configs = list(out.glob("*.config"))
        if not converted.is_file() or not configs:
            raise UnsupportedModelError("onnxruntime's ORT-format converter wrote no model (see --verbose)")
        lines = configs[0].read_text().splitlines()
        # its header names the temporary path it converted: name the file the user gets instead
        config = "\n".join(f"# - {name}.ort" if line.startswith("# - ") else line for line in lines) + "\n"
        return OrtFormat(converted.read_bytes(), config)
