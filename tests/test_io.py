"""Loading, normalization, input shapes, shape inference, saving and validation (onnxslim/io.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import constant_weights_model, conv_model, ir3_model, make, paddle_dims_model, token_model
from conftest import LIGHT_DIR, load_light
from onnx import TensorProto, helper, numpy_helper

from onnxslim import io as slim_io
from onnxslim import serialize, validation
from onnxslim.errors import (
    DataError,
    ModelLoadError,
    OutputError,
    UnsupportedModelError,
    UsageError,
    ValidationError,
)
from onnxslim.io import (
    check_output_path,
    fix_input_shapes,
    infer_tensor_infos,
    load_model,
    normalize_model,
    parse_input_shapes,
    random_inputs,
    resolve_input_shapes,
    save_model,
    save_text,
    staged_outputs,
    validate,
    write_validated,
)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


# ------------------------------------------------------------------------------------------ normalization


def test_normalization_keeps_outputs_of_every_light_model(light_model_name: str) -> None:
    original = onnx.load(str(LIGHT_DIR / light_model_name))
    normalized = load_light(light_model_name).model
    feeds = random_inputs(normalized, resolve_input_shapes(normalized))
    for want, got in zip(run(original, feeds), run(normalized, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # weights made by ConstantOfShape are now plain initializers, and nothing constant is left as a node
    assert not any(n.op_type == "ConstantOfShape" for n in normalized.graph.node)
    assert not {i.name for i in normalized.graph.input} & {t.name for t in normalized.graph.initializer}
    onnx.checker.check_model(normalized)


def test_constant_node_weights_become_initializers_and_outputs_stay(tmp_path: Path) -> None:
    model = constant_weights_model()
    loaded = load_model(save(model, tmp_path / "m.onnx"))
    normalized = loaded.model
    ops = [n.op_type for n in normalized.graph.node]
    assert "Constant" not in ops and "ConstantOfShape" not in ops and "Cast" not in ops
    assert ops.count("Reshape") == 1, "the bias Reshape(Constant) is folded; the dynamic flatten Reshape stays"
    # the shape-dependent subgraph is kept, so the model still accepts any batch size
    assert {"Shape", "Gather", "Concat"} <= set(ops)
    initializer_shapes = {tuple(t.dims) for t in normalized.graph.initializer}
    assert (1, 4, 1, 1) in initializer_shapes and (4, 1, 1) in initializer_shapes
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 8, 8)).astype(np.float32)
        (want,), (got,) = run(model, {"x": x}), run(normalized, {"x": x})
        assert got.shape == (batch, 256)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    storage = loaded.normalization.storage
    assert storage.constant_nodes[0] >= 2  # w and the Reshape's input feed variable nodes directly
    assert storage.computed[0] >= 3  # the reshaped bias, the cast/unsqueezed scale, the ConstantOfShape shift


def test_input_symbolic_dims_stay_symbolic_after_normalization() -> None:
    normalized, _ = normalize_model(constant_weights_model())
    dims = normalized.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"


def test_ir3_model_with_initializers_as_inputs_checks_after_normalization() -> None:
    model = ir3_model()
    normalized, report = normalize_model(model)
    assert [i.name for i in normalized.graph.input] == ["x"]
    assert normalized.ir_version >= 4
    assert any("IR version" in note for note in report.notes)
    onnx.checker.check_model(normalized)
    x = np.ones((1, 3, 4, 4), np.float32)
    np.testing.assert_allclose(run(normalized, {"x": x})[0], run(model, {"x": x})[0])


def test_unnamed_and_duplicate_nodes_get_stable_unique_names() -> None:
    model = ir3_model()
    model.graph.node[1].name = "dup"
    model.graph.node.insert(0, helper.make_node("Identity", ["x"], ["x_id"], name="dup"))
    model.graph.node[1].input[0] = "x_id"
    first, report = normalize_model(model)
    second, _ = normalize_model(model)
    names = [n.name for n in first.graph.node]
    assert len(set(names)) == len(names) and all(names)
    assert names == [n.name for n in second.graph.node]
    assert names[0] == "dup" and report.renamed_nodes == 2


def test_quantization_ops_are_not_folded() -> None:
    weight = numpy_helper.from_array(np.array([[1, -2], [3, 4]], np.int8), "wq")
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "s")
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "s"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    normalized, _ = normalize_model(make(nodes, [x], [y], [weight, scale]))
    assert [n.op_type for n in normalized.graph.node] == ["DequantizeLinear", "MatMul"]


def test_constant_subgraph_that_cannot_be_evaluated_is_an_error() -> None:
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.zeros(6, np.float32), "c")),
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([4], np.int64), "shape")),
        helper.make_node("Reshape", ["c", "shape"], ["bad"], name="bad_reshape"),
        helper.make_node("Add", ["x", "bad"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    with pytest.raises(UnsupportedModelError, match="bad_reshape"):
        normalize_model(make(nodes, [x], [y]))


# -------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)), "not a readable ONNX model|does not look"),
        (b"this is a text file, not a model\n" * 10, "not a readable ONNX model|does not look"),
    ],
    ids=["empty", "random-bytes", "text"],
)
def test_unreadable_files_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_truncated_model_is_refused(tmp_path: Path) -> None:
    data = conv_model().SerializeToString()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        load_model(path)


def test_missing_path_and_directory_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(ModelLoadError, match="directory"):
        load_model(tmp_path)


def test_too_old_opset_is_refused(tmp_path: Path) -> None:
    model = ir3_model()
    model.opset_import[0].version = 6
    with pytest.raises(UnsupportedModelError, match="opset 6 is too old"):
        load_model(save(model, tmp_path / "old.onnx"))


def _external_model(tmp_path: Path) -> Path:
    model = conv_model(c_in=16, c_out=16)
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    return path


def test_external_data_is_loaded(tmp_path: Path) -> None:
    path = _external_model(tmp_path)
    loaded = load_model(path)
    assert loaded.size_bytes == path.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size
    weight = next(t for t in loaded.model.graph.initializer if t.name == "w")
    assert numpy_helper.to_array(weight).shape == (16, 16, 3, 3)


def test_missing_external_data_is_refused(tmp_path: Path) -> None:
    path = _external_model(tmp_path)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(path)


@pytest.mark.parametrize("location", ["../escape.data", "/etc/passwd"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path, location: str) -> None:
    path = _external_model(tmp_path)
    model = onnx.load_model(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(path))
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_model(path)


# ----------------------------------------------------------------------------------------- input shapes


def test_parse_input_shapes() -> None:
    assert parse_input_shapes(["images:1,3,320,320", "mask:1,1,320,320"]) == {
        "images": (1, 3, 320, 320),
        "mask": (1, 1, 320, 320),
    }
    assert parse_input_shapes(["input:0:2,3"]) == {"input:0": (2, 3)}  # TensorFlow-style names keep their colon
    assert parse_input_shapes(["1,3,8,8"]) == {None: (1, 3, 8, 8)}
    for bad in (["x:1,a"], ["x:0,3"], ["x:1", "x:2"]):
        with pytest.raises(UsageError):
            parse_input_shapes(bad)


def test_resolve_input_shapes_defaults_symbolic_batch_to_one() -> None:
    assert resolve_input_shapes(constant_weights_model()) == {"x": (1, 3, 8, 8)}
    assert resolve_input_shapes(constant_weights_model(), {"x": (4, 3, 8, 8)}) == {"x": (4, 3, 8, 8)}
    assert resolve_input_shapes(constant_weights_model(), {None: (2, 3, 8, 8)}) == {"x": (2, 3, 8, 8)}


def test_resolve_input_shapes_errors_name_the_input() -> None:
    model = conv_model()
    with pytest.raises(UsageError, match="'nope', which is not an input"):
        resolve_input_shapes(model, {"nope": (1, 4, 10, 10)})
    with pytest.raises(UsageError, match="rank 3 given, but the input has rank 4"):
        resolve_input_shapes(model, {"x": (1, 4, 10)})
    with pytest.raises(UsageError, match="axis 1 is fixed to 4"):
        resolve_input_shapes(model, {"x": (1, 5, 10, 10)})
    dynamic = conv_model()
    for d, name in zip(dynamic.graph.input[0].type.tensor_type.shape.dim, ["n", "c", "h", "w"], strict=True):
        d.dim_param = name
    with pytest.raises(UsageError, match="input 'x' has symbolic dims.*--input-shapes x:"):
        resolve_input_shapes(dynamic)


def test_paddle_minus_one_dims_are_symbolic() -> None:
    assert resolve_input_shapes(paddle_dims_model(dynamic_hw=False)) == {"x": (1, 3, 8, 8)}  # batch -1: 1
    model = paddle_dims_model()  # [-1, 3, -1, -1]
    with pytest.raises(UsageError, match=r"--input-shapes x:<\?>,3,<\?>,<\?>"):
        resolve_input_shapes(model)
    assert resolve_input_shapes(model, {"x": (1, 3, 48, 192)}) == {"x": (1, 3, 48, 192)}
    with pytest.raises(UsageError, match="axis 1 is fixed to 3"):
        resolve_input_shapes(model, {"x": (1, 4, 48, 192)})
    infos = infer_tensor_infos(model, {"x": (2, 3, 48, 192)})
    assert infos["y"].shape == (2, 4, 48, 192)


def test_fix_input_shapes_only_on_request() -> None:
    model = constant_weights_model()
    fixed = fix_input_shapes(model, {"x": (2, 3, 8, 8)})
    assert [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 8, 8]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


# ------------------------------------------------------------------------------------------- inference


def test_infer_tensor_infos_covers_every_tensor() -> None:
    model, _ = normalize_model(constant_weights_model())
    infos = infer_tensor_infos(model, {"x": (2, 3, 8, 8)})
    assert infos["conv"].shape == (2, 4, 8, 8)
    assert infos["y"].shape == (2, 256)
    assert all(o in infos for n in model.graph.node for o in n.output)


def test_infer_tensor_infos_falls_back_to_onnxruntime_for_data_dependent_shapes() -> None:
    nodes = [helper.make_node("NonZero", ["x"], ["nz"]), helper.make_node("Cast", ["nz"], ["y"], to=TensorProto.FLOAT)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    infos = infer_tensor_infos(make(nodes, [x], [y]), {"x": (2, 3)})
    # onnx can only say [2, ?]; onnxruntime ran it on random inputs (all nonzero) -> [2, 6]
    assert infos["nz"].shape == (2, 6) and infos["y"].shape == (2, 6)


# ---------------------------------------------------------------------------------------- save/validate


def test_save_refuses_to_overwrite_the_source(tmp_path: Path) -> None:
    path = save(conv_model(), tmp_path / "m.onnx")
    before = path.read_bytes()
    with pytest.raises(UsageError, match="refusing to overwrite the input model"):
        save_model(conv_model(), path, source=path)
    with pytest.raises(UsageError, match="refusing"):
        save_model(conv_model(), tmp_path / "." / "m.onnx", source=path)
    assert path.read_bytes() == before


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    model = conv_model()
    out = save_model(model, tmp_path / "out.onnx")
    assert onnx.load(str(out)) == model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    with pytest.raises(UsageError, match="does not exist"):
        save_model(model, tmp_path / "no" / "such" / "dir.onnx")


def test_large_models_are_saved_loaded_checked_and_run_through_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past protobuf's 2 GiB limit nothing may be serialized in memory: simulate the limit at 1 KiB, both
    onnxslim's and onnx.checker's (which refuses in-memory models over it)."""
    monkeypatch.setattr(serialize, "_PROTOBUF_LIMIT", 1024)
    monkeypatch.setattr(serialize, "_EXTERNAL_DATA_MARGIN", 0)
    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", 1024)
    model = conv_model(c_in=16, c_out=16)
    out = save_model(model, tmp_path / "big.onnx")
    (data_file,) = tmp_path.glob("big.onnx.*.data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", data_file.name]
    loaded = load_model(out)
    assert numpy_helper.to_array(next(t for t in loaded.model.graph.initializer if t.name == "w")).shape == (16, 16, 3, 3)
    shapes = {"x": (1, 16, 10, 10)}
    assert infer_tensor_infos(loaded.model, shapes)["y"].shape == (1, 16, 10, 10)
    validate(loaded.model, model, shapes)
    # saving again replaces the model and its data together; the old data file goes
    save_model(loaded.model, out)
    (new_data,) = tmp_path.glob("big.onnx.*.data")
    assert new_data != data_file and sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", new_data.name]
    assert load_model(out).model.graph.initializer


def test_output_may_not_land_on_the_input_models_external_data(tmp_path: Path) -> None:
    path = _external_model(tmp_path)
    data = tmp_path / "ext.onnx.data"
    before = data.read_bytes()
    with pytest.raises(UsageError, match="external data of the input model"):
        save_model(conv_model(), data, source=path)
    with pytest.raises(UsageError, match="external data"):
        save_text("report", data, sources=[path])
    assert data.read_bytes() == before
    assert save_text("| a |", tmp_path / "report.md", sources=[path]).read_text() == "| a |"


def test_validate_accepts_an_equivalent_model_and_rejects_broken_contracts() -> None:
    source = conv_model()
    shapes = {"x": (1, 4, 10, 10)}
    validate(source, source, shapes)
    renamed = conv_model()
    renamed.graph.output[0].name = "z"
    renamed.graph.node[0].output[0] = "z"
    with pytest.raises(ValidationError, match="outputs changed"):
        validate(renamed, source, shapes)
    fewer_channels = conv_model(c_out=6)
    with pytest.raises(ValidationError, match="outputs changed"):
        validate(fewer_channels, source, shapes)
    # a declared shape that lies is caught by running the model
    fewer_channels.graph.output[0].CopyFrom(source.graph.output[0])
    with pytest.raises(ValidationError, match="has shape"):
        validate(fewer_channels, source, shapes)
    broken = conv_model()
    broken.graph.node[0].input[1] = "missing_weight"
    with pytest.raises(ValidationError, match="onnx.checker|onnxruntime"):
        validate(broken, source, shapes)


def test_write_validated_trusts_a_validation_record_only_for_the_very_model_it_proved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validate once: a record from `validate` of this model (same source contract, shapes and inputs) saves the
    second onnxruntime run; other inputs, another model or a model edited since are validated again."""
    source = save(conv_model(), tmp_path / "source.onnx")
    shapes = {"x": (1, 4, 10, 10)}
    candidate = conv_model()
    record = validate(candidate, conv_model(), shapes)
    runs: list[onnx.ModelProto] = []
    real_validate = slim_io.validate

    def counting(model: onnx.ModelProto, *args: object, **kwargs: object) -> object:
        runs.append(model)
        return real_validate(model, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(slim_io, "validate", counting)
    write_validated(candidate, tmp_path / "a.onnx", source=source, input_shapes=shapes, validated=record)
    assert runs == [] and (tmp_path / "a.onnx").exists()
    feeds = {"x": np.ones((1, 4, 10, 10), np.float32)}
    write_validated(candidate, tmp_path / "b.onnx", source=source, input_shapes=shapes, feeds=feeds, validated=record)
    assert len(runs) == 1  # on the user's data, not the random inputs it was proved on: validated again
    other = conv_model()
    write_validated(other, tmp_path / "c.onnx", source=source, input_shapes=shapes, validated=record)
    assert len(runs) == 2 and runs[-1] is other  # another model object: validated again
    candidate.graph.node[0].input[1] = "missing_weight"  # edited after it was validated
    with pytest.raises(ValidationError):
        write_validated(candidate, tmp_path / "d.onnx", source=source, input_shapes=shapes, validated=record)
    assert not (tmp_path / "d.onnx").exists()


# ------------------------------------------------------------------------- validation inputs and outputs


def test_random_integer_inputs_stay_below_the_tables_they_index() -> None:
    feeds = random_inputs(token_model(), {"input_ids": (4, 64), "token_type_ids": (4, 64)})
    assert feeds["token_type_ids"].min() == 0 and feeds["token_type_ids"].max() == 1  # a 2-row table
    assert feeds["input_ids"].max() >= 4 and feeds["input_ids"].max() < 30  # a 30-row table: the full range
    assert slim_io.index_limits(token_model()) == {"input_ids": 30, "token_type_ids": 2}
    assert slim_io.index_limits(token_model(hidden=True)) == {"input_ids": 30}  # through an Add: not followed
    model = token_model()
    validate(model, model, {"input_ids": (1, 6), "token_type_ids": (1, 6)})  # runs: no error


def test_original_failing_on_random_inputs_is_a_data_error_and_user_data_validates() -> None:
    model = token_model(hidden=True)
    shapes = {"input_ids": (1, 16), "token_type_ids": (1, 16)}
    with pytest.raises(DataError, match="the original model does not run on random inputs") as caught:
        validate(model, model, shapes)
    assert "--calib" in str(caught.value) and "\n" not in str(caught.value)
    rng = np.random.default_rng(0)
    good = {"input_ids": rng.integers(0, 30, (1, 16)), "token_type_ids": rng.integers(0, 2, (1, 16))}
    validate(model, model, shapes, feeds=good)
    with pytest.raises(DataError, match="does not run on the data given"):
        validate(model, model, shapes, feeds={**good, "token_type_ids": np.full((1, 16), 5)})
    broken = token_model(hidden=True)  # the original runs on this data, the candidate does not: a bug
    broken.graph.node[-1].input[1] = "words"  # MatMul [1, 16, 8] x [30, 8]
    with pytest.raises(ValidationError):
        validate(broken, model, shapes, feeds=good)


def test_known_output_shapes_spare_the_sources_session_but_never_the_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the source's output shapes known (the pruner's analysis), only the candidate is run; when the
    candidate fails or disagrees, the source is run after all, so the verdict is the full check's."""
    source, candidate = conv_model(), conv_model()
    shapes = {"x": (1, 4, 10, 10)}
    loaded: list[onnx.ModelProto] = []
    real_loadable = validation.loadable

    def counting(model: onnx.ModelProto) -> object:
        loaded.append(model)
        return real_loadable(model)

    monkeypatch.setattr(validation, "loadable", counting)
    validate(candidate, source, shapes, expected_shapes={"y": (1, 8, 10, 10)})
    assert loaded == [candidate]
    loaded.clear()
    validate(candidate, source, shapes, expected_shapes={"y": (1, 8, 5, 5)})  # a wrong analysis: the source decides
    assert loaded == [candidate, source]
    fewer_channels = conv_model(c_out=6)
    fewer_channels.graph.output[0].CopyFrom(source.graph.output[0])
    with pytest.raises(ValidationError, match="has shape"):
        validate(fewer_channels, source, shapes, expected_shapes={"y": (1, 8, 10, 10)})
    # the source failing on random inputs stays a DataError (the inputs are at fault), not exit 4
    model = token_model(hidden=True)
    tokens = {"input_ids": (1, 16), "token_type_ids": (1, 16)}
    with pytest.raises(DataError, match="the original model does not run on random inputs"):
        validate(model, model, tokens, expected_shapes={o.name: (1, 16, 8) for o in model.graph.output})


def test_unwritable_outputs_are_usage_errors_found_before_any_work(tmp_path: Path) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for path, message in (
        ("/proc/x.onnx", "cannot write /proc/x.onnx"),  # unwritable even for root
        (str(a_file / "out.onnx"), "is a file, not a folder"),
        (str(tmp_path / "missing" / "out.onnx"), "does not exist"),
        (str(tmp_path), "is a directory"),
    ):
        with pytest.raises(OutputError, match=message) as caught:
            check_output_path(path)
        assert caught.value.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # the probe leaves nothing behind


def test_staged_outputs_write_everything_or_nothing(tmp_path: Path) -> None:
    model, text = conv_model(), tmp_path / "plan.json"
    with pytest.raises(OutputError), staged_outputs() as stage:
        stage.add_model(model, tmp_path / "m.onnx")
        stage.add_text("{}", "/proc/plan.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with staged_outputs() as stage:
        stage.add_model(model, tmp_path / "m.onnx")
        stage.add_text("{}", text)
        assert not text.exists()  # not before the block ends
    assert text.read_text() == "{}" and onnx.load(str(tmp_path / "m.onnx")).graph.node[0].op_type == "Conv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "plan.json"]
