"""The per-op table: checked at import, and the decisions that depend on attributes and operand shapes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxslim.analysis import rules
from onnxslim.analysis.rules import RULES, Behaviour, Block, Create, Flow, NodeView, OpRule, decide
from onnxslim.prune.lossless import SOURCE_BIAS_INPUT
from onnxslim.prune.optables import op_table_problems
from onnxslim.prune.rewrite import REWRITE_HANDLERS


def view(
    op: str,
    inputs: list[gs.Tensor],
    shapes: list[tuple[int, ...] | None],
    out_shape: tuple[int, ...],
    channel_axes: list[int | None],
    opset: int = 13,
    domain: str | None = None,
    **attrs: object,
) -> NodeView:
    node = gs.Node(op, "node", attrs=dict(attrs), inputs=inputs, outputs=[gs.Variable("y")], domain=domain)
    return NodeView(node, opset, tuple(shapes), (out_shape,), tuple(channel_axes))


def x() -> gs.Variable:
    return gs.Variable("x", dtype=np.float32)


def const(value: np.ndarray) -> gs.Constant:
    return gs.Constant(f"c{id(value)}", np.asarray(value, np.float32))


def test_every_key_is_an_onnx_op_with_one_behaviour() -> None:
    assert rules._check_table(RULES, onnx.defs.has) == []
    for op, rule in RULES.items():
        assert isinstance(rule.behaviour, Behaviour), op


def test_the_table_check_catches_typos_and_bad_entries() -> None:
    broken = {"Rleu": OpRule(Behaviour.PASS_THROUGH, rules._unary), "Relu": "pass"}
    problems = rules._check_table(broken, onnx.defs.has)  # type: ignore[arg-type]
    assert any("'Rleu' is not an ONNX op" in p for p in problems)
    assert any("'Relu' needs exactly one Behaviour" in p for p in problems)


def test_sources_and_followers_have_rewrite_handlers() -> None:
    for op, rule in RULES.items():
        if rule.behaviour is Behaviour.SOURCE:
            assert REWRITE_HANDLERS[op].prune_output and REWRITE_HANDLERS[op].prune_input, op
        if rule.follower:
            assert REWRITE_HANDLERS[op].prune_follower, op


def test_unknown_and_custom_ops_are_blockers() -> None:
    assert decide(view("LpNormalization", [x()], [(1, 8, 4, 4)], (1, 8, 4, 4), [1])) == Block(
        "unsupported op LpNormalization"
    )
    custom = view("Foo", [x()], [(1, 8, 4, 4)], (1, 8, 4, 4), [1], domain="com.example")
    assert decide(custom) == Block("unsupported op com.example.Foo")


def test_conv_group_decides_source_depthwise_or_blocker() -> None:
    shape = [(1, 8, 4, 4), (8, 8, 3, 3)]
    assert decide(view("Conv", [x(), const(np.ones((6, 8, 3, 3)))], shape, (1, 6, 4, 4), [1, None])) == Create(1, 6)
    depthwise = view("Conv", [x(), const(np.ones((8, 1, 3, 3)))], shape, (1, 8, 4, 4), [1, None], group=8)
    assert decide(depthwise) == Flow((0,), 1, follower=True)
    grouped = view("Conv", [x(), const(np.ones((8, 4, 3, 3)))], shape, (1, 8, 4, 4), [1, None], group=2)
    assert decide(grouped) == Create(1, 8, blocks=2)
    multiplier = view("Conv", [x(), const(np.ones((16, 1, 3, 3)))], shape, (1, 16, 4, 4), [1, None], group=8)
    assert isinstance(decide(multiplier), Block)
    variable_weight = view("Conv", [x(), gs.Variable("w")], shape, (1, 8, 4, 4), [1, 1])
    assert isinstance(decide(variable_weight), Block)


@pytest.mark.parametrize(
    ("constant_shape", "follower"),
    [((), False), ((1,), False), ((1, 8, 1, 1), True), ((8, 1, 1), True), ((1, 1, 4, 4), False), ((4,), False)],
)
def test_mul_by_constant_is_per_channel_only_when_its_aligned_dim_is_c(constant_shape: tuple, follower: bool) -> None:
    decision = decide(
        view("Mul", [x(), const(np.ones(constant_shape))], [(1, 8, 4, 4), constant_shape], (1, 8, 4, 4), [1, None])
    )
    assert decision == Flow((0,), 1, follower=follower)


def test_join_of_variables_and_broadcast_operand() -> None:
    joined = view("Add", [x(), gs.Variable("z")], [(1, 8, 4, 4), (1, 8, 1, 1)], (1, 8, 4, 4), [1, 1])
    assert decide(joined) == Flow((0, 1), 1)
    broadcast = view("Mul", [x(), gs.Variable("a")], [(1, 8, 4, 4), (1, 1, 4, 4)], (1, 8, 4, 4), [1, 1])
    assert decide(broadcast) == Flow((0,), 1, broadcast=(1,))
    lower_rank = view("Add", [x(), gs.Variable("v")], [(1, 4, 8), (8,)], (1, 4, 8), [2, 0])
    assert decide(lower_rank) == Flow((0, 1), 2)
    mismatched = view("Add", [x(), gs.Variable("v")], [(1, 8, 8), (1, 8, 8)], (1, 8, 8), [1, 2])
    assert isinstance(decide(mismatched), Block)



def test_an_operand_whose_channels_are_not_followed_broadcasts_only_if_constant_along_the_channel_axis() -> None:
    """An opaque operand (from a blocker or a graph input) has only an assumed axis, 1; the tracked operand
    decides the channel axis. A channels-last gate [1, 1, 8] from a blocked op varies along it: block."""

    def opaque_mul(gate_shape: tuple[int, ...], tracked_axis: int, out: tuple[int, ...]) -> NodeView:
        node = view("Mul", [x(), gs.Variable("gate")], [out, gate_shape], out, [tracked_axis, 1])
        return NodeView(node.node, 13, node.input_shapes, node.output_shapes, node.input_axes, {1: "/r: why"})

    gate = decide(opaque_mul((1, 1, 8), 2, (1, 5, 8)))
    assert isinstance(gate, Block) and "operand 1 varies along the channel axis" in gate.reason and "/r: why" in gate.reason
    spatial = opaque_mul((1, 5, 1), 2, (1, 5, 8))  # varies along the tokens only: the same for every channel
    assert decide(spatial) == Flow((0,), 2, broadcast=(1,))
    aligned = opaque_mul((1, 8, 4, 4), 1, (1, 8, 4, 4))  # assumed axis is the channel axis: joined (and blocks)
    assert decide(aligned) == Flow((0, 1), 1)
    # a followed operand with size 1 on its own axis but not on the output's: carries channels elsewhere
    crossed = view("Mul", [x(), gs.Variable("a")], [(1, 5, 8), (1, 1, 8)], (1, 5, 8), [2, 1])
    assert isinstance(decide(crossed), Block) and "carries its channels on another axis" in decide(crossed).reason

def test_reduce_over_spatial_axes_shifts_the_axis_without_keepdims() -> None:
    assert decide(view("ReduceMean", [x()], [(1, 8, 4, 4)], (1, 8), [1], axes=[2, 3], keepdims=0)) == Flow((0,), 1)
    assert decide(view("ReduceMean", [x()], [(1, 4, 4, 8)], (1, 8), [3], axes=[1, 2], keepdims=0)) == Flow((0,), 1)
    assert isinstance(decide(view("ReduceMean", [x()], [(1, 8, 4, 4)], (1, 1, 4, 4), [1], axes=[1])), Block)
    assert isinstance(decide(view("ReduceMax", [x()], [(1, 8, 4, 4)], (1, 1, 1, 1), [1])), Block)  # all axes


def test_softmax_axis_semantics_depend_on_opset() -> None:
    shape = [(1, 8, 4)]
    assert decide(view("Softmax", [x()], shape, (1, 8, 4), [1], opset=13, axis=2)) == Flow((0,), 1)
    # before opset 13 Softmax flattens everything from `axis` on: axis 1 covers the channels
    assert isinstance(decide(view("Softmax", [x()], shape, (1, 8, 4), [1], opset=11, axis=1)), Block)
    assert isinstance(decide(view("Softmax", [x()], shape, (1, 8, 4), [1], opset=13, axis=1)), Block)


def test_pad_and_resize_on_the_channel_axis_block() -> None:
    pads = const(np.array([0, 1, 0, 0, 0, 0, 0, 0], np.int64))
    assert isinstance(decide(view("Pad", [x(), pads], [(1, 8, 4, 4), (8,)], (1, 9, 4, 4), [1, None])), Block)
    scales = const(np.array([1, 2, 2, 2], np.float32))
    resize = view("Resize", [x(), const(np.zeros(0)), scales], [(1, 8, 4, 4), (0,), (4,)], (1, 16, 8, 8), [1, None, None])
    assert isinstance(decide(resize), Block)


def test_gemm_and_matmul_sources() -> None:
    gemm = view("Gemm", [x(), const(np.ones((5, 8)))], [(1, 8), (5, 8)], (1, 5), [1, None], transB=1)
    assert decide(gemm) == Create(1, 5)
    matmul = view("MatMul", [x(), const(np.ones((8, 6)))], [(1, 3, 8), (8, 6)], (1, 3, 6), [2, None])
    assert decide(matmul) == Create(2, 6, sink_axis=2)
    variable = view("MatMul", [x(), gs.Variable("k")], [(1, 3, 8), (1, 8, 3)], (1, 3, 3), [2, 1])
    assert isinstance(decide(variable), Block)


def test_every_per_op_table_agrees_with_the_rules() -> None:
    assert op_table_problems() == []


def test_a_new_source_op_is_told_every_table_it_must_fill() -> None:
    """A newcomer who adds a source op to RULES only learns at import which tables it needs: all of them,
    MAC counting included, each with the file that holds it."""
    with_new_ops = {
        **RULES,
        "Einsum": OpRule(Behaviour.SOURCE, rules._conv),
        "LpNormalization": OpRule(Behaviour.PASS_THROUGH, rules._unary, follower=True),
    }
    problems = op_table_problems(with_new_ops)
    (source,) = [p for p in problems if "Einsum" in p]
    for table in ("analysis/cost.py MAC_OPS", "importance.py _OUT_WEIGHTS", "importance.py _IN_WEIGHTS",
                  "rewrite.py REWRITE_HANDLERS (prune_output and prune_input)", "lossless.py SOURCE_BIAS_INPUT"):
        assert table in source, table
    (follower,) = [p for p in problems if "LpNormalization" in p]
    assert follower.startswith("follower op") and "REWRITE_HANDLERS (prune_follower)" in follower
    assert len(problems) == 2
    # an entry for an op the rules do not know is stale
    stale = op_table_problems(mac_ops={"Conv", "ConvTranspose", "Gemm", "MatMul"}, source_bias={*SOURCE_BIAS_INPUT, "Foo"})
    assert stale == ["onnxslim/prune/lossless.py SOURCE_BIAS_INPUT has an entry for Foo, which RULES does not know"]
    missing_macs = op_table_problems(mac_ops={"Conv", "Gemm", "MatMul"})
    assert missing_macs == ["source op ConvTranspose has no entry in onnxslim/analysis/cost.py MAC_OPS"]


def test_a_matmul_of_two_computed_tensors_joins_channels_on_a_batch_axis_and_blocks_on_a_multiplied_one() -> None:
    q, k = gs.Variable("q", dtype=np.float32), gs.Variable("k", dtype=np.float32)
    shapes: list[tuple[int, ...] | None] = [(2, 4, 5, 3), (2, 4, 3, 5)]
    joined = decide(view("MatMul", [q, k], shapes, (2, 4, 5, 5), [1, 1]))
    assert joined == Flow((0, 1), 1, follower=True)
    mixed = decide(view("MatMul", [q, k], shapes, (2, 4, 5, 5), [3, 2]))
    assert isinstance(mixed, Block) and "multiplies along the channel axis" in mixed.reason
    broadcast = decide(view("MatMul", [q, k], [(2, 4, 5, 3), (1, 1, 3, 5)], (2, 4, 5, 5), [1, 1]))
    assert isinstance(broadcast, Flow) and broadcast.operands == (0,) and broadcast.broadcast == (1,)


@pytest.mark.parametrize(
    ("in_shape", "axis", "out_shape", "split"),
    [
        ((2, 7, 12), 2, (2, 7, 4, 3), (2, 4, 3)),  # [B, T, H·D] → [B, T, H, D]
        ((14, 12), 1, (14, 4, 3), (1, 4, 3)),  # tokens flattened into the batch
        ((2, 7, 12), 2, (14, 4, 3), (1, 4, 3)),  # batch and tokens merged by the same reshape
        ((2, 12, 7), 1, (2, 4, 3, 7), None),  # an NCHW channel split: a shuffle's first half
        ((2, 7, 12), 2, (2, 7, 12, 1), None),  # no split
        ((2, 7, 12), 2, (2, 7, 2, 2, 3), None),  # three ways
    ],
)
def test_heads_split_is_the_last_axis_into_the_last_two(in_shape, axis, out_shape, split) -> None:
    assert rules.heads_split(in_shape, axis, out_shape) == split


@pytest.mark.parametrize(
    ("head", "width", "expected"),
    [(4, 3, rules.SplitHeads(2, 4, 3, follower=True)), (-1, 3, rules.SplitHeads(2, 4, 3)),
     (4, -1, rules.SplitHeads(2, 4, 3, follower=True)), (None, 3, "computed at run time"), (-1, -1, "entries")],
)
def test_a_head_split_target_built_by_a_concat(head: int | None, width: int, expected: object) -> None:
    """Concat(Unsqueeze(batch), Unsqueeze(seq), head, width): the head entry must be a constant (or -1)."""
    pieces: list[gs.Tensor] = [gs.Variable("b", dtype=np.int64, shape=[1]), gs.Variable("t", dtype=np.int64, shape=[1])]
    pieces.append(gs.Variable("h", dtype=np.int64, shape=[1]) if head is None else gs.Constant("h", np.array([head])))
    pieces.append(gs.Constant("w", np.array([width])))
    target = gs.Variable("target", dtype=np.int64)
    gs.Node("Concat", "concat", attrs={"axis": 0}, inputs=pieces, outputs=[target])
    node = gs.Node("Reshape", "node", inputs=[x(), target], outputs=[gs.Variable("y")])
    node_view = NodeView(node, 17, ((2, 7, 12), None), ((2, 7, 4, 3),), (2, None),
                         tensor_shape=lambda tensor: tuple(tensor.shape) if tensor.shape else None)
    decision = decide(node_view)
    if isinstance(expected, str):
        assert isinstance(decision, Block) and expected in decision.reason
    else:
        assert decision == expected
