"""int8 quantization, pre-processing: refuse quantized inputs; raise the opset for per-channel weights;
onnxruntime's basic graph optimizations; onnx shape inference on the symbolic model (see quantize.py)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx

from onnxslim.analysis.quantized import all_nodes, refuse_quantized
from onnxslim.errors import UnsupportedModelError, first_line
from onnxslim.io import infer_tensor_infos, normalize_model
from onnxslim.quant.config import MIN_QUANT_OPSET, PER_CHANNEL_OPSET, PreparedModel
from onnxslim.runtime import ort as _ort
from onnxslim.runtime import session_options

logger = logging.getLogger(__name__)

QUANTIZE_ADVICE = "quantize the fp32 model it came from instead"


# --------------------------------------------------------------------------------------- pre-processing


def default_opset(model: onnx.ModelProto) -> int:
    return next(imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx"))


def _upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """The model converted to opset `target` and checked; raises on any failure."""
    converted = onnx.version_converter.convert_version(model, target)
    onnx.checker.check_model(converted)
    return converted


def strip_unused_domains(model: onnx.ModelProto) -> None:
    """onnxruntime's optimizer imports every domain it knows; keep the default and those nodes use."""
    used = {n.domain or "" for n in all_nodes(model.graph)} | {""}
    kept = [imp for imp in model.opset_import if (imp.domain or "") in used or imp.domain == "ai.onnx"]
    if len(kept) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(kept)


def _basic_optimize(model: onnx.ModelProto, scratch: Path) -> onnx.ModelProto:
    """onnxruntime's basic-level graph optimizations, saved: plain ONNX ops only, symbolic dims kept."""
    options = session_options(opt_level="basic")
    options.optimized_model_filepath = str(scratch / "basic.onnx")
    try:
        _ort().InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise UnsupportedModelError(f"onnxruntime cannot load the model, so it cannot quantize it: {first_line(e)}") from e
    optimized = onnx.load_model(options.optimized_model_filepath)
    strip_unused_domains(optimized)
    declare_like(optimized, model)
    optimized, _ = normalize_model(optimized)  # names the nodes the optimizer created without a name
    return optimized


def declare_like(model: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """Give `model`'s graph inputs and outputs the declarations (types, symbolic dims) they have in `source`:
    they are the model's contract, and optimizers, shape inference (which can make a Resize output's dims
    concrete) and the quantizer must not change them. Applied after the optimizer and to every int8 candidate;
    the prepared model in between only calibrates, at concrete shapes."""
    for target, declared in ((model.graph.input, source.graph.input), (model.graph.output, source.graph.output)):
        by_name = {v.name: v for v in declared}
        for value in target:
            if value.name in by_name:
                value.CopyFrom(by_name[value.name])


def _infer_types(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """Symbolic shape inference, so every tensor has a type for the quantizer while dims stay symbolic.

    Tensors onnx cannot type (custom ops, shapes computed at run time) get their element type and rank
    from `io.infer_tensor_infos` at the calibration shapes, with every dim left unknown.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:  # noqa: BLE001 - onnx raises several types
        logger.debug("onnx shape inference failed on the prepared model: %s", first_line(e))
        inferred = model
    graph = inferred.graph
    typed = {v.name for v in [*graph.input, *graph.output, *graph.value_info] if v.type.tensor_type.elem_type}
    typed |= {t.name for t in graph.initializer}
    missing = [o for n in graph.node for o in n.output if o and o not in typed]
    if missing:
        infos = infer_tensor_infos(model, input_shapes)
        for name in missing:
            if name in infos:
                info = infos[name]
                graph.value_info.append(onnx.helper.make_tensor_value_info(name, info.elem_type, [None] * len(info.shape)))
    return inferred


def prepare_model(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]], *, per_channel: bool
) -> PreparedModel:
    """Pre-process a normalized fp32 model for calibration and quantization (see the module docstring)."""
    refuse_quantized(model, QUANTIZE_ADVICE)
    notes: list[str] = []
    source_opset = default_opset(model)
    want_per_channel = per_channel
    if source_opset < PER_CHANNEL_OPSET and (per_channel or source_opset < MIN_QUANT_OPSET):
        try:
            model = _upgrade_opset(model, PER_CHANNEL_OPSET)
            notes.append(f"opset upgraded from {source_opset} to {PER_CHANNEL_OPSET} for quantization")
        except Exception as e:  # noqa: BLE001 - the converter raises many types; any failure means "cannot upgrade"
            if source_opset < MIN_QUANT_OPSET:
                raise UnsupportedModelError(
                    f"opset {source_opset} has no QuantizeLinear/DequantizeLinear and upgrading the model to opset "
                    f"{PER_CHANNEL_OPSET} failed ({first_line(e)}); re-export it with opset {PER_CHANNEL_OPSET} or newer"
                ) from e
            want_per_channel = False
            message = (
                f"per-channel weights need opset {PER_CHANNEL_OPSET} and upgrading from opset {source_opset} failed "
                f"({first_line(e)}); quantizing weights per tensor instead"
            )
            logger.warning(message)
            notes.append(message)
    with tempfile.TemporaryDirectory(prefix="onnxslim-quant-") as scratch:
        optimized = _basic_optimize(model, Path(scratch))
    prepared = _infer_types(optimized, input_shapes)
    return PreparedModel(prepared, source_opset, default_opset(prepared), want_per_channel, tuple(notes))
