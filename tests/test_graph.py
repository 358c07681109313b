"""graph.py: the one graph index, and pausing the cycle collector around whole-graph work."""

from __future__ import annotations

import gc

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from builders import ModelBuilder

from onnxslim.graph import GraphIndex, collector_paused, sort_nodes, subgraph_references
from onnxslim.io import normalize_model


def test_the_index_finds_nodes_producers_and_readers_in_topological_order() -> None:
    b = ModelBuilder((3, 6, 6))
    x = b.relu(b.conv(b.input, 4, 3))
    y = b.op("Add", [b.conv(x, 4, 1), x])  # x is read twice
    graph = gs.import_onnx(normalize_model(b.build(b.conv(y, 2)))[0])
    index = GraphIndex(graph)
    assert list(index.nodes) == [node.name for node in graph.nodes]
    assert [index.position[node.name] for node in graph.nodes] == list(range(len(graph.nodes)))
    relu = next(node for node in graph.nodes if node.op == "Relu")
    assert index.producer(relu.outputs[0].name) is relu and index.producer("input") is None
    assert [node.op for node in index.consumers(relu.outputs[0].name)] == ["Conv", "Add"]
    add = next(node for node in graph.nodes if node.op == "Add")
    assert [n.op for n in index.producers_in_order([add.outputs[0].name, relu.outputs[0].name, "input"])] == ["Relu", "Add"]
    assert index.outputs == {graph.outputs[0].name}
    with pytest.raises(KeyError, match="no node named 'missing'"):
        index.node("missing")


def test_the_collector_is_paused_inside_and_restored_as_it_was() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # it was off: it stays off
    finally:
        gc.enable()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("a failing step")
    assert gc.isenabled()


def _if_model(order: str) -> onnx.ModelProto:
    """x -> Neg -> a; If(cond) whose branches read `a` and the initializer `c` from the outer graph only;
    `order` "broken" puts the If before Neg (what onnxruntime's quantizer did to silero-vad)."""
    from onnx import TensorProto, helper, numpy_helper

    def branch(op: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(op, ["a", "c"], [f"{op}_out"])], op, [],
                                 [helper.make_tensor_value_info(f"{op}_out", TensorProto.FLOAT, None)])

    neg = helper.make_node("Neg", ["x"], ["a"], name="neg")
    cond = helper.make_node("Greater", ["x0", "zero"], ["cond"], name="cond")
    sub = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("Add"), else_branch=branch("Sub"))
    nodes = [neg, cond, sub] if order == "sorted" else [sub, cond, neg]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("x0", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "c"), numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_nodes_are_sorted_by_what_their_branches_read_from_the_outer_graph() -> None:
    broken = _if_model("broken")
    assert subgraph_references(broken.graph) >= {"a", "c"}
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(broken)
    assert sort_nodes(broken.graph)
    onnx.checker.check_model(broken)
    order = [n.name for n in broken.graph.node]
    assert order.index("neg") < order.index("if") and order.index("cond") < order.index("if")
    already = _if_model("sorted")
    assert not sort_nodes(already.graph) and [n.name for n in already.graph.node] == ["neg", "cond", "if"]
