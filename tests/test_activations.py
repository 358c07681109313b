"""The staged runner (activations.py): every range it runs gives exactly the tensors the whole model gives.

Recovery passes activations forward with `StagedRunner`, one range of nodes at a time, each range a model of
its own. `check_staged_runner` runs a model in ranges and compares every range's outputs with one run of
the whole model exposing them, bit for bit. It runs here over the onnx package's light models, the
benchmark builders (models/build.py) and the test builders (tests/builders.py), in ranges of one node (every
tensor crosses a boundary) and of random lengths, with activations spilled to disk in some; and over small
graphs with what broke it or could: scalars computed from shapes, fed inputs that override initializers,
model-local functions, nested subgraphs, string tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import (
    ModelBuilder,
    constant_weights_model,
    ctc_head,
    dynamic_lstm_model,
    paddle_dims_model,
    token_model,
    transformer_classifier,
    yolo_head,
)
from conftest import LIGHT_MODELS, light_param, load_light
from onnx import TensorProto, helper, numpy_helper
from test_prune_light import randomized_logits_model

from models.build import BUILDERS, build_yolov8_like
from onnxslim.activations import StagedRunner, check_staged_runner, stage_ends
from onnxslim.errors import StagedRunError
from onnxslim.io import normalize_model, random_inputs
from onnxslim.shapes import graph_inputs

BATCHES = 2


def _feeds(model: onnx.ModelProto, batches: int = BATCHES, seed: int = 0, free: int = 8) -> list[dict[str, np.ndarray]]:
    """Random feeds per batch: static dims as declared, a symbolic (or -1) first dim 2, other free dims `free`."""
    shapes = {}
    for value in graph_inputs(model):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.dim_value > 0 else (2 if axis == 0 else free) for axis, d in enumerate(dims)]
    return [random_inputs(model, shapes, seed=seed + batch) for batch in range(batches)]


def _assert_staged_runs_are_exact(
    model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], longest: int, *, memory_budget: int = 1 << 30
) -> None:
    ends = stage_ends(len(model.graph.node), longest, seed=longest)
    result = check_staged_runner(model, feeds, ends, memory_budget=memory_budget)
    assert result.passed, result.mismatches[:5]
    assert result.stages == len(ends) and result.compared >= len(model.graph.output) * len(feeds)


def _model(nodes, inputs, outputs, initializers=(), functions=(), opset: int = 17) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(domain, 1) for domain in {f.domain for f in functions})]
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions), ir_version=8)
    onnx.checker.check_model(model)
    return model


def _float(name: str, shape: list[int | str] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _int64(name: str, values: list[int] | int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


# ------------------------------------------------------------------------------------ what broke it


def _shape_scalars_model() -> onnx.ModelProto:
    """YOLOv8's anchors as ultralytics exports them: h·w of a feature map as a shape-[] scalar (Shape →
    Gather → Mul), then Unsqueeze → Concat with a constant → ConstantOfShape, added to the flattened map."""
    nodes = [
        helper.make_node("Relu", ["x"], ["feature"], name="relu"),
        helper.make_node("Shape", ["feature"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "two"], ["h"], name="gather_h", axis=0),
        helper.make_node("Gather", ["shape", "three"], ["w"], name="gather_w", axis=0),
        helper.make_node("Mul", ["h", "w"], ["hw"], name="mul"),
        helper.make_node("Unsqueeze", ["hw", "zero"], ["hw_1d"], name="unsqueeze"),
        helper.make_node("Concat", ["hw_1d", "one"], ["strides_shape"], name="concat", axis=0),
        helper.make_node("ConstantOfShape", ["strides_shape"], ["strides"], name="constant_of_shape",
                         value=numpy_helper.from_array(np.array([8.0], np.float32))),
        helper.make_node("Reshape", ["feature", "flat"], ["flattened"], name="reshape"),
        helper.make_node("Transpose", ["flattened"], ["by_position"], name="transpose", perm=[1, 0]),
        helper.make_node("Mul", ["by_position", "strides"], ["y"], name="scale"),
    ]
    constants = [_int64("two", 2), _int64("three", 3), _int64("zero", [0]), _int64("one", [1]), _int64("flat", [3, -1])]
    return _model(nodes, [_float("x", [1, 3, 4, 5])], [_float("y", [20, 3])], constants)


def test_a_scalar_computed_from_a_shape_keeps_its_rank_between_ranges() -> None:
    """The crash of issue 22 (YOLOv8n, `/model.22/Concat_11`): a shape-[] scalar kept between ranges came
    back as shape [1], so the Unsqueeze after it made a rank-2 tensor and the Concat refused it."""
    model = _shape_scalars_model()
    feeds = _feeds(model)
    runner = StagedRunner(model, feeds, protect=["hw"])
    runner.run_to(5)  # through the Mul
    assert runner.get(0, "hw").shape == () and runner.get(1, "hw").shape == ()
    runner.close()
    for longest in (1, 2, 3):
        _assert_staged_runs_are_exact(model, feeds, longest)
    _assert_staged_runs_are_exact(model, feeds, 1, memory_budget=0)  # every tensor spilled to disk


def test_a_fed_input_overrides_its_initializer_in_every_range() -> None:
    """A graph input with an initializer (a default) takes the fed value, in a range as in the whole model."""
    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="relu"),
        helper.make_node("Add", ["h", "offset"], ["y"], name="add"),
    ]
    offset = numpy_helper.from_array(np.zeros(3, np.float32), "offset")
    model = _model(nodes, [_float("x", [2, 3]), _float("offset", [3])], [_float("y", [2, 3])], [offset])
    feeds = [{"x": np.ones((2, 3), np.float32), "offset": np.full(3, 5.0, np.float32)}]
    runner = StagedRunner(model, feeds)
    runner.run_to(2)
    np.testing.assert_array_equal(runner.get(0, "y"), np.full((2, 3), 6.0, np.float32))
    runner.close()
    _assert_staged_runs_are_exact(model, feeds, 1)


def test_a_constant_made_in_an_earlier_range_is_a_constant_of_the_range_that_reads_it() -> None:
    """paddle2onnx's BatchNormalization parameters come from Constant nodes: onnxruntime folds them and fuses
    the BN into the Conv in the whole model, so a range must get them as constants too (as inputs, the BN
    stayed unfused and rounded differently)."""
    rng = np.random.default_rng(4)
    channels = 16
    parameters = {
        "scale": rng.uniform(0.5, 1.5, channels), "shift": rng.standard_normal(channels),
        "mean": rng.standard_normal(channels), "variance": rng.uniform(0.5, 2.0, channels),
    }
    nodes = [helper.make_node("Constant", [], [name], name=f"{name}_constant",
                              value=numpy_helper.from_array(values.astype(np.float32), name))
             for name, values in parameters.items()]
    nodes += [
        helper.make_node("Conv", ["x", "weights"], ["conv"], name="conv", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("BatchNormalization", ["conv", *parameters], ["y"], name="bn", epsilon=1e-5),
    ]
    weights = numpy_helper.from_array((rng.standard_normal((channels, 8, 3, 3)) / 8).astype(np.float32), "weights")
    model = _model(nodes, [_float("x", [1, 8, 16, 16])], [_float("y", [1, channels, 16, 16])], [weights])
    feeds = _feeds(model)
    result = check_staged_runner(model, feeds, [4, 6])  # the Constants, then the Conv and the BN together
    assert result.passed, result.mismatches
    assert result.compared == 5 * len(feeds)  # the four parameters and y


def test_model_local_functions_run_in_a_range() -> None:
    """A node calling a function of the model (as the dynamo exporter writes modules) runs in its range."""
    body = [helper.make_node("Mul", ["a", "a"], ["square"]), helper.make_node("Add", ["square", "a"], ["out"])]
    function = helper.make_function("local", "SquarePlus", ["a"], ["out"], body, [helper.make_opsetid("", 17)])
    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="relu"),
        helper.make_node("SquarePlus", ["h"], ["g"], name="call", domain="local"),
        helper.make_node("Neg", ["g"], ["y"], name="neg"),
    ]
    model = _model(nodes, [_float("x", [2, 3])], [_float("y", [2, 3])], functions=[function])
    _assert_staged_runs_are_exact(model, _feeds(model), 1)


def test_a_nested_subgraph_reading_its_enclosing_branch_is_not_taken_for_an_outer_input() -> None:
    """An If inside an If's branch reads a tensor the branch computes: that is no input of the range."""
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one_inner")
    inner_then = helper.make_graph([helper.make_node("Add", ["t", "one_inner"], ["inner_a"])], "inner_then", [],
                                   [_float("inner_a", None)], initializer=[one])
    inner_else = helper.make_graph([helper.make_node("Neg", ["t"], ["inner_b"])], "inner_else", [], [_float("inner_b", None)])
    branch_nodes = [
        helper.make_node("Mul", ["h", "h"], ["t"]),
        helper.make_node("If", ["condition"], ["branch_out"], then_branch=inner_then, else_branch=inner_else),
    ]
    outer_then = helper.make_graph(branch_nodes, "outer_then", [], [_float("branch_out", None)])
    outer_else = helper.make_graph([helper.make_node("Identity", ["h"], ["other_out"])], "outer_else", [],
                                   [_float("other_out", None)])
    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="relu"),
        helper.make_node("ReduceSum", ["h"], ["total"], name="sum", keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["condition"], name="greater"),
        helper.make_node("If", ["condition"], ["y"], name="if", then_branch=outer_then, else_branch=outer_else),
    ]
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    model = _model(nodes, [_float("x", [2, 3])], [_float("y", [2, 3])], [zero])
    _assert_staged_runs_are_exact(model, _feeds(model), 1)


def test_string_tensors_cross_ranges_and_stay_in_memory() -> None:
    """Strings come back from onnxruntime as object arrays: declared as strings, never spilled (no pickle)."""
    nodes = [
        helper.make_node("Cast", ["x"], ["text"], name="to_text", to=TensorProto.STRING),
        helper.make_node("Identity", ["text"], ["same_text"], name="identity"),
        helper.make_node("Cast", ["same_text"], ["y"], name="to_float", to=TensorProto.FLOAT),
    ]
    model = _model(nodes, [_float("x", [2, 3])], [_float("y", [2, 3])])
    _assert_staged_runs_are_exact(model, _feeds(model), 1, memory_budget=0)


def test_sparse_initializers_reach_their_range() -> None:
    """A weight stored as a sparse initializer is a constant of the range that reads it, as initializers are."""
    dense = np.zeros((3, 4), np.float32)
    dense[[0, 2], [1, 3]] = (2.0, -3.0)
    indices = np.flatnonzero(dense)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(dense.flat[indices], "weights"),
                                       numpy_helper.from_array(indices.astype(np.int64), "weights_indices"), [3, 4])
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"), helper.make_node("MatMul", ["h", "weights"], ["y"], name="matmul")]
    graph = helper.make_graph(nodes, "g", [_float("x", [2, 3])], [_float("y", [2, 4])], sparse_initializer=[sparse])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    _assert_staged_runs_are_exact(model, _feeds(model), 1)


def _sequence_model() -> onnx.ModelProto:
    """A sequence value that a later node reads: what the staged runner does not keep between ranges."""
    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="relu"),
        helper.make_node("SequenceConstruct", ["h", "h"], ["sequence"], name="construct"),
        helper.make_node("Neg", ["h"], ["g"], name="neg"),
        helper.make_node("SequenceAt", ["sequence", "index"], ["item"], name="at"),
        helper.make_node("Add", ["item", "g"], ["y"], name="add"),
    ]
    return _model(nodes, [_float("x", [2, 3])], [_float("y", [2, 3])], [_int64("index", 1)])


def test_a_sequence_between_ranges_is_the_runners_limit_and_the_check_says_so() -> None:
    model = _sequence_model()
    runner = StagedRunner(model, _feeds(model))
    with pytest.raises(StagedRunError, match="not a tensor"):
        runner.run_to(2)
    assert runner.position == 0  # it stays where it was
    runner.run_to(4)  # a range that keeps the sequence inside runs
    runner.close()
    result = check_staged_runner(model, _feeds(model), [2, 5])
    assert not result.passed and "not a tensor" in result.mismatches[0].detail
    assert check_staged_runner(model, _feeds(model), [1, 5]).passed


def test_the_check_sees_a_range_that_differs_from_the_whole_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: a kept scalar made 1-d (the old bug), or one kept float moved by one ulp, shows."""
    from onnxslim import activations

    put = activations._Store.put
    model, feeds = _shape_scalars_model(), _feeds(_shape_scalars_model())
    with monkeypatch.context() as patch:
        patch.setattr(activations._Store, "put", lambda self, batch, name, value: put(self, batch, name, np.atleast_1d(value)))
        assert not check_staged_runner(model, feeds, [5, 11]).passed

    def nudge(self, batch, name, value):  # type: ignore[no-untyped-def]
        if name == "strides":
            value = np.nextafter(value, np.inf)
        put(self, batch, name, value)

    monkeypatch.setattr(activations._Store, "put", nudge)
    result = check_staged_runner(model, feeds, [8, 11])
    assert [(m.tensor, m.batch, m.detail) for m in result.mismatches] == [  # and the output that read it
        (name, batch, "values differ") for batch in (0, 1) for name in ("strides", "y")
    ]


# ------------------------------------------------------------------------------------ over many graphs


@pytest.mark.parametrize(
    "name", [light_param(p.name) for p in LIGHT_MODELS], ids=[p.stem.removeprefix("light_") for p in LIGHT_MODELS]
)
def test_staged_runs_of_every_light_model_are_exact(name: str) -> None:
    model = randomized_logits_model(load_light(name).model)
    # ranges of 1 to 3 nodes (most tensors cross a boundary, some stay inside one), the larger ones on disk
    _assert_staged_runs_are_exact(model, _feeds(model), 3, memory_budget=4 << 20)


@cache
def _built(name: str) -> onnx.ModelProto:
    return BUILT[name]()


BUILT: dict[str, Callable[[], onnx.ModelProto]] = {
    **{name: (lambda build=build: build(0)) for name, build in BUILDERS.items()},
    "yolov8_like_dynamic": lambda: build_yolov8_like(0, size=64, dynamic=True),
    "yolo_head": yolo_head,
    "transformer_classifier": transformer_classifier,
    "ctc_head": ctc_head,
    "token_model": token_model,
    "paddle_dims_model": paddle_dims_model,
    "constant_weights_model": constant_weights_model,
    "dynamic_lstm_model": dynamic_lstm_model,
}


def _patterns_model() -> onnx.ModelProto:
    """PATTERNS.md in one graph: C2f with Split and Slice, SPPF, SE, hard-swish forms, BN, If branches."""
    b = ModelBuilder((3, 16, 16), opset=13, seed=2)
    x = b.relu(b.bn(b.conv(b.input, 16, k=3, storage="computed")))
    x = b.c2f(x, 16)
    x = b.c2f(x, 16, use_slice=True)
    x = b.sppf(x, 16)
    x = b.se(b.hardswish(x, form="clip"), 4, gate="HardSigmoid")
    x = b.hardswish(b.prelu(b.conv(x, 8, bias="add", storage="constant")), form="hardsigmoid")
    x = b.if_branches(x, x)
    return b.build(b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [x])]), 5))


BUILT["patterns_model"] = _patterns_model


@pytest.mark.parametrize("name", sorted(BUILT))
def test_staged_runs_of_every_built_model_are_exact(name: str) -> None:
    model = _built(name)
    feeds = _feeds(model, free=64)  # the dynamic YOLOv8 needs 32 pixels at least; the others take any size
    _assert_staged_runs_are_exact(model, feeds, 1)
    _assert_staged_runs_are_exact(model, feeds, 7, memory_budget=1 << 20)
    normalized = normalize_model(model)[0]  # what recovery runs: constants folded, nodes named
    _assert_staged_runs_are_exact(normalized, feeds, 4)


def test_tensor_statistics_match_numpy_over_every_batch(tmp_path: Path) -> None:
    """Two batches streamed: the statistics equal numpy's over all samples at once; NaN counted, not averaged."""
    from onnxslim.activations import tensor_statistics
    from onnxslim.calib import DataOptions, open_dataset

    b = ModelBuilder((2, 3, 3), seed=3)
    relu = b.relu(b.input)
    model = b.build(b.op("Mul", [relu, b.const(np.array(2.0, dtype=np.float32))]))
    x = np.random.default_rng(0).standard_normal((6, 2, 3, 3)).astype(np.float32)
    x[5, 0, 0, 0] = np.nan
    np.savez(tmp_path / "d.npz", input=x)
    stats = {t.op_type: t for t in tensor_statistics(model, open_dataset(tmp_path / "d.npz", model, DataOptions(batch=4)))}
    finite = np.maximum(x[np.isfinite(x)], 0).astype(np.float64)
    relu_stats = stats["Relu"]
    assert relu_stats.values == finite.size and relu_stats.nonfinite == 1
    assert relu_stats.maximum == pytest.approx(finite.max()) and relu_stats.minimum == 0
    assert relu_stats.mean == pytest.approx(finite.mean()) and relu_stats.std == pytest.approx(finite.std())
    assert relu_stats.zeros == pytest.approx(np.mean(finite == 0))
    assert stats["Mul"].maximum == pytest.approx(2 * finite.max())
    assert relu_stats.outlier_ratio == pytest.approx(finite.max() / finite.std())
