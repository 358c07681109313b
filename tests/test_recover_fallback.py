"""Recovery past the staged runner's limit (prune/recover.py): whole-model runs, the same refit, a warning.

A sequence kept between two ranges is what the staged runner does not hold (activations.py). Recovery must
then take each remaining layer's input and target from runs of the whole model: the refit weights are those
of a model that computes the same without the sequence, the layers' notes and a warning say so, and the
command line exits 0 — never 4, the exit code of onnxslim's own bugs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxslim.cli import cli
from onnxslim.prune.recover import RecoverOptions, recover_model

RNG = np.random.default_rng(11)


def _conv(name: str, x: str, y: str, c_in: int, c_out: int) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    weights = numpy_helper.from_array((RNG.standard_normal((c_out, c_in, 3, 3)) / np.sqrt(9 * c_in)).astype(np.float32),
                                      f"{name}.weight")
    bias = numpy_helper.from_array((0.1 * RNG.standard_normal(c_out)).astype(np.float32), f"{name}.bias")
    node = helper.make_node("Conv", [x, weights.name, bias.name], [y], name=name, kernel_shape=[3, 3], pads=[1] * 4)
    return node, [weights, bias]


def _models() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """conv_a → Relu → conv_b → Relu → conv_c, with the input kept for a second output: through a sequence
    built before conv_a and read after conv_b (SequenceConstruct → SequenceInsert → SequenceAt), or plainly
    (Identity). The two compute the same."""
    conv_a, weights_a = _conv("conv_a", "x", "a", 3, 8)
    conv_b, weights_b = _conv("conv_b", "ra", "b", 8, 8)
    conv_c, weights_c = _conv("conv_c", "rb", "y", 8, 4)
    trunk = [conv_a, helper.make_node("Relu", ["a"], ["ra"], name="relu_a"), conv_b,
             helper.make_node("Relu", ["b"], ["rb"], name="relu_b"), conv_c]
    through_sequence = [
        helper.make_node("SequenceConstruct", ["x"], ["sequence"], name="construct"),
        *trunk[:4],
        helper.make_node("SequenceInsert", ["sequence", "rb"], ["longer"], name="insert"),
        helper.make_node("SequenceAt", ["longer", "first"], ["kept"], name="at"),
        trunk[4],
        helper.make_node("ReduceSum", ["kept"], ["z"], name="sum", keepdims=0),
    ]
    plain = [helper.make_node("Identity", ["x"], ["kept"], name="at"), *trunk,
             helper.make_node("ReduceSum", ["kept"], ["z"], name="sum", keepdims=0)]
    initializers = [*weights_a, *weights_b, *weights_c, numpy_helper.from_array(np.array(0, np.int64), "first")]
    models = []
    for nodes in (through_sequence, plain):
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8]),
             helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N"])],
            initializer=initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        onnx.checker.check_model(model)
        models.append(model)
    return models[0], models[1]


def _damaged(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with half of conv_a's filters zeroed: what conv_b and conv_c must make up for."""
    damaged = onnx.ModelProto()
    damaged.CopyFrom(model)
    weights = next(t for t in damaged.graph.initializer if t.name == "conv_a.weight")
    values = numpy_helper.to_array(weights).copy()
    values[:4] = 0
    weights.CopyFrom(numpy_helper.from_array(values, weights.name))
    return damaged


def _weights(model: onnx.ModelProto, node: str, index: int = 1) -> np.ndarray:
    """A node's weight (index 1) or bias (2), wherever recovery put it."""
    name = next(n for n in model.graph.node if n.name == node).input[index]
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def test_past_the_staged_runners_limit_recovery_runs_the_whole_model_and_refits_the_same(
    caplog: pytest.LogCaptureFixture,
) -> None:
    through_sequence, plain = _models()
    feeds = [{"x": RNG.standard_normal((16, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    options = RecoverOptions(method="lsq")
    with caplog.at_level(logging.WARNING, logger="onnxslim"):
        recovered, report = recover_model(through_sequence, _damaged(through_sequence), ["conv_b", "conv_c"], {},
                                          feeds, options)
    assert "staged runner cannot go on" in caplog.text and "not a tensor" in caplog.text
    expected, expected_report = recover_model(plain, _damaged(plain), ["conv_b", "conv_c"], {}, feeds, options)
    assert "staged runner" not in " ".join(node.note for node in expected_report.nodes)
    assert [n.node for n in report.nodes] == ["conv_b", "conv_c"]
    assert all("whole-model runs" in node.note for node in report.nodes)
    assert [n.method for n in report.nodes] == [n.method for n in expected_report.nodes]
    assert report.nodes[0].method == "lsq" and report.nodes[0].error_after < report.nodes[0].error_before
    for node in ("conv_b", "conv_c"):
        for index in (1, 2):
            np.testing.assert_allclose(_weights(recovered, node, index), _weights(expected, node, index),
                                       rtol=1e-5, atol=1e-6)
    assert not np.allclose(_weights(recovered, "conv_b"), _weights(through_sequence, "conv_b"))


def test_prune_exits_0_with_a_warning_where_recovery_meets_the_runners_limit(tmp_path: Path) -> None:
    through_sequence, _ = _models()
    model = tmp_path / "model.onnx"
    onnx.save(through_sequence, str(model))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=RNG.standard_normal((40, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "pruned.onnx"
    result = CliRunner().invoke(cli, ["prune", str(model), "-o", str(out), "--ratio", "0.5", "--round-to", "1",
                                      "--no-protect-first", "--calib", str(calib), "--json"])
    assert result.exit_code == 0, result.output
    assert "staged runner cannot go on" in result.stderr and "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    layers = report["recovery"]["layers"]
    assert layers and all("whole-model runs" in layer["note"] for layer in layers)
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned)
    assert [o.name for o in pruned.graph.output] == ["y", "z"]
