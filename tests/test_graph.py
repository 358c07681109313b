"""graph.py: the one graph index, and pausing the cycle collector around whole-graph work."""

from __future__ import annotations

import gc

import onnx_graphsurgeon as gs
import pytest
from builders import ModelBuilder

from onnxslim.graph import GraphIndex, collector_paused
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
