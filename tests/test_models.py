"""The reference models in models/: committed files load and run, the trained classifiers are as accurate
as models/README.md says, and the benchmark builders produce valid graphs shaped like real exports."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent

from models.build import BUILDERS, build_mobilenetv2_like  # noqa: E402
from models.build import main as build_main  # noqa: E402

MODELS_DIR = PROJECT_ROOT / "models"

# Measured on mnist_eval.npz (see models/README.md) minus about half a point, rounded down.
ACCURACY_FLOORS = {"mnist_resnet": 0.98, "mnist_mobilenet": 0.975}
TRAINED_FILES = [f"{name}{suffix}.onnx" for name in ACCURACY_FLOORS for suffix in ("", "_bn")]
BENCH_OUTPUTS = {
    "resnet18_like": ("input", [1, 3, 224, 224], "output", [1, 1000]),
    "mobilenetv2_like": ("input", [1, 3, 224, 224], "output", [1, 1000]),
    "yolo_like": ("images", [1, 3, 320, 320], "output0", [1, 144, 2100]),
}


def _session(model: str | Path | onnx.ModelProto) -> ort.InferenceSession:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def _load_npz(name: str) -> dict[str, np.ndarray]:
    with np.load(MODELS_DIR / name, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


@pytest.fixture(scope="module")
def eval_data() -> dict[str, np.ndarray]:
    return _load_npz("mnist_eval.npz")


@pytest.fixture(scope="module")
def logits(eval_data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Logits of every trained model file on the evaluation set, keyed by file name."""
    return {
        name: _session(MODELS_DIR / name).run(["logits"], {"input": eval_data["input"]})[0]
        for name in TRAINED_FILES
    }


@pytest.fixture(scope="module")
def bench_models() -> dict[str, onnx.ModelProto]:
    return {name: build(0) for name, build in BUILDERS.items()}


# ----------------------------------------------------------------------------------------- data


@pytest.mark.parametrize(("file", "samples"), [("mnist_calib.npz", 256), ("mnist_eval.npz", 1000)])
def test_data_files_have_documented_keys_dtypes_and_shapes(file: str, samples: int) -> None:
    data = _load_npz(file)
    assert set(data) == {"input", "labels"}
    assert data["input"].dtype == np.float32 and data["input"].shape == (samples, 1, 28, 28)
    assert data["labels"].dtype == np.int64 and data["labels"].shape == (samples,)
    assert set(np.unique(data["labels"])) == set(range(10))
    # normalised with MNIST's mean 0.1307 and std 0.3081: background is -0.4242, ink at most 2.8215
    assert data["input"].min() == pytest.approx(-0.1307 / 0.3081, abs=1e-4)
    assert data["input"].max() <= (1 - 0.1307) / 0.3081 + 1e-4


def test_eval_set_is_balanced_and_disjoint_from_calibration_set() -> None:
    calib, evaluation = _load_npz("mnist_calib.npz"), _load_npz("mnist_eval.npz")
    assert np.bincount(evaluation["labels"]).tolist() == [100] * 10
    calib_images = {image.tobytes() for image in calib["input"]}
    eval_images = {image.tobytes() for image in evaluation["input"]}
    assert len(calib_images) == 256
    assert not calib_images & eval_images


# -------------------------------------------------------------------------------- trained models


@pytest.mark.parametrize("file", TRAINED_FILES)
def test_trained_model_has_symbolic_batch_and_documented_io(file: str) -> None:
    model = onnx.load(str(MODELS_DIR / file))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    (graph_input,), (graph_output,) = model.graph.input, model.graph.output
    assert graph_input.name == "input" and graph_output.name == "logits"
    input_dims = graph_input.type.tensor_type.shape.dim
    assert input_dims[0].dim_param and [dim.dim_value for dim in input_dims[1:]] == [1, 28, 28]
    batch = _session(model).run(None, {"input": np.zeros((3, 1, 28, 28), np.float32)})[0]
    assert batch.shape == (3, 10)


@pytest.mark.parametrize("file", TRAINED_FILES)
def test_trained_model_meets_accuracy_floor(
    file: str, eval_data: dict[str, np.ndarray], logits: dict[str, np.ndarray]
) -> None:
    accuracy = float((logits[file].argmax(axis=1) == eval_data["labels"]).mean())
    assert accuracy >= ACCURACY_FLOORS[file.removesuffix(".onnx").removesuffix("_bn")]


@pytest.mark.parametrize("name", ACCURACY_FLOORS)
def test_batchnorm_kept_and_folded_exports_are_the_same_model(
    name: str, logits: dict[str, np.ndarray]
) -> None:
    folded, kept = onnx.load(str(MODELS_DIR / f"{name}.onnx")), onnx.load(str(MODELS_DIR / f"{name}_bn.onnx"))
    assert "BatchNormalization" not in _op_counts(folded)
    assert _op_counts(kept)["BatchNormalization"] >= 10
    agreement = (logits[f"{name}.onnx"].argmax(axis=1) == logits[f"{name}_bn.onnx"].argmax(axis=1)).mean()
    assert agreement >= 0.995
    np.testing.assert_allclose(logits[f"{name}.onnx"], logits[f"{name}_bn.onnx"], atol=1e-3)


def test_residual_cnn_has_projection_shortcut_and_flatten_gemm_head() -> None:
    model = onnx.load(str(MODELS_DIR / "mnist_resnet.onnx"))
    onnx.checker.check_model(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        value.name: [dim.dim_value or dim.dim_param for dim in value.type.tensor_type.shape.dim]
        for value in inferred.graph.value_info
    }
    flatten = next(node for node in model.graph.node if node.op_type == "Flatten")
    assert shapes[flatten.input[0]][1:] == [48, 3, 3]  # a C x 3 x 3 map, not a global pool
    assert any(node.op_type == "Gemm" and node.input[0] == flatten.output[0] for node in model.graph.node)
    kernels = [
        next(a.ints for a in node.attribute if a.name == "kernel_shape")
        for node in model.graph.node
        if node.op_type == "Conv"
    ]
    assert [1, 1] in [list(kernel) for kernel in kernels]
    assert _op_counts(model)["Add"] == 6


def test_mobilenet_has_depthwise_convs_hardswish_silu_and_squeeze_excite() -> None:
    model = onnx.load(str(MODELS_DIR / "mnist_mobilenet.onnx"))
    counts = _op_counts(model)
    assert counts["HardSwish"] > 0 and counts["Sigmoid"] > 0  # SiLU as Sigmoid * Mul
    assert counts["HardSigmoid"] > 0 and counts["GlobalAveragePool"] > 1  # squeeze-excite gates + head
    groups = [
        next(a.i for a in node.attribute if a.name == "group")
        for node in model.graph.node
        if node.op_type == "Conv"
    ]
    assert sum(group > 1 for group in groups) == 5
    gated = [
        node
        for node in model.graph.node
        if node.op_type == "Mul" and any("HardSigmoid" in i for i in node.input)
    ]
    assert len(gated) == counts["HardSigmoid"]


# ----------------------------------------------------------------------------- benchmark builders


@pytest.mark.parametrize("name", BENCH_OUTPUTS)
def test_bench_model_is_valid_and_runs_with_sane_activations(
    name: str, bench_models: dict[str, onnx.ModelProto]
) -> None:
    model = bench_models[name]
    onnx.checker.check_model(model, full_check=True)
    input_name, input_shape, output_name, output_shape = BENCH_OUTPUTS[name]
    assert [value.name for value in model.graph.input] == [input_name]
    assert [value.name for value in model.graph.output] == [output_name]
    assert model.opset_import[0].version == 17
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1, input_shape) if name == "yolo_like" else rng.standard_normal(input_shape)
    (output,) = _session(model).run([output_name], {input_name: images.astype(np.float32)})
    assert list(output.shape) == output_shape
    assert np.isfinite(output).all()
    assert 0.1 < float(np.sqrt(np.mean(output**2))) < 10.0  # neither exploded nor vanished through the depth


def test_resnet18_like_is_a_folded_eval_export(bench_models: dict[str, onnx.ModelProto]) -> None:
    model = bench_models["resnet18_like"]
    counts = _op_counts(model)
    assert counts == Counter(
        {"Conv": 20, "Relu": 17, "Add": 8, "MaxPool": 1, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    )
    assert all(
        len(node.input) == 3 for node in model.graph.node if node.op_type == "Conv"
    )  # BN folded into bias
    params = sum(int(np.prod(tensor.dims)) for tensor in model.graph.initializer)
    assert 11_000_000 < params < 12_000_000


def test_mobilenetv2_like_uses_clip_as_relu6_and_depthwise_convs(
    bench_models: dict[str, onnx.ModelProto],
) -> None:
    model = bench_models["mobilenetv2_like"]
    counts = _op_counts(model)
    assert counts["Conv"] == 52 and counts["Clip"] == 35 and counts["Add"] == 10
    assert all(len(node.input) == 3 for node in model.graph.node if node.op_type == "Clip")
    depthwise = [
        node
        for node in model.graph.node
        if node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute)
    ]
    assert len(depthwise) == 17
    assert [node.op_type for node in model.graph.node[-3:]] == ["GlobalAveragePool", "Flatten", "Gemm"]


def test_yolo_like_has_c2f_sppf_fpn_and_concatenated_head(bench_models: dict[str, onnx.ModelProto]) -> None:
    model = bench_models["yolo_like"]
    counts = _op_counts(model)
    assert (
        counts["Split"] == 9 and counts["MaxPool"] == 3 and counts["Resize"] == 2 and counts["Reshape"] == 3
    )
    assert counts["Concat"] >= 15 and counts["Add"] == 6
    assert counts["Sigmoid"] == counts["Mul"] + 1  # SiLU everywhere, plus the class scores' Sigmoid
    producers = {output: node for node in model.graph.node for output in node.output}
    sppf_concat = next(node for node in model.graph.node if node.name == "/model.9/Concat")
    assert [producers[name].op_type for name in sppf_concat.input] == ["Mul", "MaxPool", "MaxPool", "MaxPool"]
    for resize in (node for node in model.graph.node if node.op_type == "Resize"):
        assert resize.input[1] == "" and len(resize.input) == 3  # empty roi, scales as an input
    head_concat = producers[producers["output0"].input[0]].input[0]
    assert producers[head_concat].op_type == "Concat"
    assert [producers[name].op_type for name in producers[head_concat].input] == ["Reshape"] * 3
    params = sum(int(np.prod(tensor.dims)) for tensor in model.graph.initializer)
    assert 2_000_000 < params < 5_000_000


def test_build_command_writes_the_chosen_model_reproducibly(
    tmp_path: Path, bench_models: dict[str, onnx.ModelProto]
) -> None:
    build_main(["--out", str(tmp_path), "--only", "mobilenetv2_like"])
    assert [path.name for path in tmp_path.iterdir()] == ["mobilenetv2_like.onnx"]
    written = (tmp_path / "mobilenetv2_like.onnx").read_bytes()
    assert written == bench_models["mobilenetv2_like"].SerializeToString()  # same seed, same bytes
    assert build_mobilenetv2_like(seed=1).SerializeToString() != written
