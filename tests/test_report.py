"""Rendering details of onnxslim/report/ not covered by the command tests."""

from __future__ import annotations

from types import SimpleNamespace

from builders import make
from onnx import TensorProto, helper

from onnxslim.report.quantize import _float_label


def test_the_float_column_is_labelled_with_the_models_float_type() -> None:
    def model(elem_type: int) -> SimpleNamespace:
        x = helper.make_tensor_value_info("x", elem_type, [1, 4])
        y = helper.make_tensor_value_info("y", elem_type, [1, 4])
        return SimpleNamespace(model=make([helper.make_node("Identity", ["x"], ["y"])], [x], [y]))

    assert _float_label(model(TensorProto.FLOAT16)) == "fp16"  # type: ignore[arg-type]
    assert _float_label(model(TensorProto.FLOAT)) == "fp32"  # type: ignore[arg-type]
    assert _float_label(model(TensorProto.INT64)) == "float"  # type: ignore[arg-type]
