"""One fluent builder for the tiny models of the pruning tests, shaped like real exports (shared/PATTERNS.md).

Weights can live as initializers, as `Constant` nodes, or be computed by a constant subgraph
(`Reshape(Constant, Constant)`), which `load_model`/`normalize_model` fold. Inputs have a symbolic batch
dim. Weights are random, biases and BN statistics nonzero, so a wrong rewrite changes the outputs.

    b = ModelBuilder((3, 8, 8), opset=13)
    y = b.conv(b.input, 8, k=3)
    y = b.relu(b.bn(y))
    model = b.build(b.conv(y, 4))
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["ModelBuilder", "STORAGES"]

STORAGES = ("initializer", "constant", "computed")


class ModelBuilder:
    """Builds an ONNX model node by node, tracking the channel count (axis 1) of every tensor."""

    def __init__(
        self,
        shape: Sequence[int] = (3, 8, 8),
        *,
        opset: int = 13,
        seed: int = 0,
        input_name: str = "input",
        batch: str = "batch",
    ) -> None:
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.input = input_name
        self.inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, *shape])]
        self.channels: dict[str, int] = {input_name: int(shape[0])}
        self._ids = itertools.count()

    # ------------------------------------------------------------------------------------- plumbing

    def name(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids)}"

    def const(self, value: np.ndarray, storage: str = "initializer", prefix: str = "w") -> str:
        """A constant tensor stored as an initializer, a Constant node, or Reshape(Constant) (folded at load)."""
        value = np.asarray(value)
        name = self.name(prefix)
        if storage == "initializer":
            self.initializers.append(numpy_helper.from_array(value, name))
        elif storage == "constant":
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        elif storage == "computed":
            flat, shape = f"{name}_flat", f"{name}_shape"
            self.nodes.append(
                helper.make_node("Constant", [], [flat], value=numpy_helper.from_array(value.reshape(-1), flat))
            )
            self.nodes.append(
                helper.make_node(
                    "Constant", [], [shape], value=numpy_helper.from_array(np.array(value.shape, np.int64), shape)
                )
            )
            self.nodes.append(helper.make_node("Reshape", [flat, shape], [name], name=f"{name}_reshape"))
        else:
            raise ValueError(storage)
        return name

    def random(self, *shape: int, low: float | None = None, high: float | None = None) -> np.ndarray:
        if low is not None and high is not None:
            return self.rng.uniform(low, high, shape).astype(np.float32)
        return (self.rng.standard_normal(shape) * 0.5).astype(np.float32)

    def op(self, op_type: str, inputs: Sequence[str], *, channels: int | None = None, domain: str = "", **attrs: object) -> str:
        """A node with one output; its channel count is `channels` or that of its first input."""
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.name(op_type), domain=domain, **attrs))
        self.channels[out] = channels if channels is not None else self.channels[inputs[0]]
        return out

    def build(self, *outputs: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "test",
            self.inputs,
            [helper.make_empty_tensor_value_info(o) for o in outputs],
            initializer=self.initializers,
        )
        domains = sorted({n.domain for n in self.nodes if n.domain not in ("", "ai.onnx")})
        opsets = [helper.make_opsetid("", self.opset), *(helper.make_opsetid(d, 1) for d in domains)]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = max(8, helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))
        # declare the outputs with the shapes onnx infers (symbolic batch kept), as exporters do
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
        for value in model.graph.output:
            # outputs of custom ops cannot be inferred: declare them as rank-4 with unknown dims
            unknown = helper.make_tensor_value_info(value.name, TensorProto.FLOAT, ["batch", None, None, None])
            value.CopyFrom(inferred.get(value.name, unknown))
        onnx.checker.check_model(model)
        return model

    # ------------------------------------------------------------------------------- sources, sinks

    def conv(
        self,
        x: str,
        out: int,
        k: int = 1,
        *,
        group: int = 1,
        bias: str | None = "input",
        storage: str = "initializer",
    ) -> str:
        """Conv with 'same' padding; bias as the third input, as Add(x, [1,C,1,1] constant), or none."""
        c_in = self.channels[x]
        weight = self.const(self.random(out, c_in // group, k, k), storage)
        inputs = [x, weight]
        if bias == "input":
            inputs.append(self.const(self.random(out), storage, "b"))
        y = self.op("Conv", inputs, channels=out, kernel_shape=[k, k], pads=[k // 2] * 4, group=group)
        if bias == "add":
            y = self.op("Add", [y, self.const(self.random(1, out, 1, 1), storage, "b")])
        return y

    def depthwise(self, x: str, k: int = 3, **kwargs: object) -> str:
        c = self.channels[x]
        return self.conv(x, c, k, group=c, **kwargs)  # type: ignore[arg-type]

    def gemm(self, x: str, out: int, *, trans_b: int = 1, storage: str = "initializer") -> str:
        c_in = self.channels[x]
        weight = self.random(out, c_in) if trans_b else self.random(c_in, out)
        inputs = [x, self.const(weight, storage), self.const(self.random(out), storage, "b")]
        return self.op("Gemm", inputs, channels=out, transB=trans_b)

    def matmul(self, x: str, out: int, *, bias: bool = True, storage: str = "initializer") -> str:
        y = self.op("MatMul", [x, self.const(self.random(self.channels[x], out), storage)], channels=out)
        return self.op("Add", [y, self.const(self.random(out), storage, "b")]) if bias else y

    # --------------------------------------------------------------------------------- followers

    def bn(self, x: str, storage: str = "initializer") -> str:
        c = self.channels[x]
        params = [
            self.random(c, low=0.5, high=1.5),
            self.random(c),
            self.random(c),
            self.random(c, low=0.5, high=2.0),
        ]
        return self.op("BatchNormalization", [x, *(self.const(p, storage, "bn") for p in params)], epsilon=1e-5)

    def instance_norm(self, x: str, storage: str = "initializer") -> str:
        c = self.channels[x]
        scale, shift = self.random(c, low=0.5, high=1.5), self.random(c)
        return self.op("InstanceNormalization", [x, self.const(scale, storage), self.const(shift, storage)])

    def per_channel(self, op_type: str, x: str, *, shape: str = "1c11", storage: str = "initializer") -> str:
        """x (op) a per-channel constant of shape [1,C,1,1] ('1c11') or [C,1,1] ('c11')."""
        c = self.channels[x]
        dims = (1, c, 1, 1) if shape == "1c11" else (c, 1, 1)
        value = self.random(*dims, low=0.5, high=1.5) if op_type in ("Mul", "Div") else self.random(*dims)
        return self.op(op_type, [x, self.const(value, storage, "pc")])

    def prelu(self, x: str, storage: str = "initializer") -> str:
        c = self.channels[x]
        return self.op("PRelu", [x, self.const(self.random(c, 1, 1, low=0.05, high=0.3), storage, "slope")])

    def scalar(self, op_type: str, x: str, value: float, *, rank1: bool = False) -> str:
        constant = np.array([value] if rank1 else value, np.float32)
        return self.op(op_type, [x, self.const(constant, prefix="s")])

    # ------------------------------------------------------------------------------- activations

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def silu(self, x: str) -> str:
        return self.op("Mul", [x, self.op("Sigmoid", [x])])

    def relu6(self, x: str) -> str:
        if self.opset >= 11:
            low, high = self.const(np.array(0, np.float32), prefix="min"), self.const(np.array(6, np.float32), prefix="max")
            return self.op("Clip", [x, low, high])
        return self.op("Clip", [x], min=0.0, max=6.0)

    def hardswish(self, x: str, form: str = "op") -> str:
        """HardSwish as the op (opset >= 14), as x * HardSigmoid(x), or as x * Clip(x + 3, 0, 6) / 6."""
        if form == "op":
            return self.op("HardSwish", [x])
        if form == "hardsigmoid":
            return self.op("Mul", [x, self.op("HardSigmoid", [x], alpha=1 / 6, beta=0.5)])
        clipped = self.relu6(self.scalar("Add", x, 3.0))
        return self.scalar("Div", self.op("Mul", [x, clipped]), 6.0)

    # ------------------------------------------------------------------------------------ blocks

    def se(self, x: str, reduced: int, gate: str = "Sigmoid") -> str:
        """Squeeze-excite: x * gate(Conv(Relu(Conv(GlobalAveragePool(x)))))."""
        pooled = self.op("GlobalAveragePool", [x])
        squeezed = self.relu(self.conv(pooled, reduced))
        excited = self.conv(squeezed, self.channels[x])
        return self.op("Mul", [x, self.op(gate, [excited])])

    # ------------------------------------------------------------------------- concat and split

    def concat(self, *xs: str, axis: int = 1) -> str:
        channels = sum(self.channels[x] for x in xs) if axis == 1 else self.channels[xs[0]]
        return self.op("Concat", list(xs), channels=channels, axis=axis)

    def split(self, x: str, sizes: Sequence[int], *, equal: bool = False) -> list[str]:
        """Split on the channel axis: sizes as an attribute (opset < 13) or an input (>= 13); `equal` gives
        no sizes (equal parts; `num_outputs` from opset 18)."""
        outs = [self.name("split") for _ in sizes]
        inputs, attrs = [x], {"axis": 1}
        if equal and self.opset >= 18:
            attrs["num_outputs"] = len(sizes)
        elif not equal and self.opset >= 13:
            inputs.append(self.const(np.array(sizes, np.int64), prefix="split"))
        elif not equal:
            attrs["split"] = list(sizes)
        self.nodes.append(helper.make_node("Split", inputs, outs, name=self.name("Split"), **attrs))
        for out, size in zip(outs, sizes, strict=True):
            self.channels[out] = size
        return outs

    def slice_channels(self, x: str, start: int, end: int, *, axes: bool = True) -> str:
        """Slice channels [start, end) (attributes before opset 10, inputs after; end may be INT64_MAX)."""
        stop = min(end, self.channels[x])
        if self.opset < 10:
            return self.op("Slice", [x], channels=stop - start, starts=[start], ends=[end], axes=[1])
        if not axes:  # no axes input: starts/ends cover every axis from 0
            big = np.iinfo(np.int64).max
            inputs = [x, self.const(np.array([0, start], np.int64), prefix="starts"),
                      self.const(np.array([big, end], np.int64), prefix="ends")]
            return self.op("Slice", inputs, channels=stop - start)
        inputs = [
            x,
            self.const(np.array([start], np.int64), prefix="starts"),
            self.const(np.array([end], np.int64), prefix="ends"),
            self.const(np.array([1], np.int64), prefix="axes"),
        ]
        return self.op("Slice", inputs, channels=stop - start)

    def c2f(self, x: str, out: int, bottlenecks: int = 2, *, use_slice: bool = False) -> str:
        """YOLO C2f: Conv(2c) → Split(c, c) → bottlenecks on the last part → Concat(all parts) → Conv."""
        hidden = out // 2
        y = self.silu(self.conv(x, 2 * hidden, 1))
        if use_slice:
            parts = [self.slice_channels(y, 0, hidden), self.slice_channels(y, hidden, 2 * hidden)]
        else:
            parts = self.split(y, [hidden, hidden])
        for _ in range(bottlenecks):
            inner = self.silu(self.conv(parts[-1], hidden, 3))
            parts.append(self.op("Add", [parts[-1], self.silu(self.conv(inner, hidden, 3))]))
        return self.silu(self.conv(self.concat(*parts), out, 1))

    def sppf(self, x: str, out: int) -> str:
        """YOLO SPPF: Conv → MaxPool ×3 → Concat(4) → Conv."""
        y = self.silu(self.conv(x, self.channels[x] // 2, 1))
        pools = [y]
        for _ in range(3):
            pools.append(self.op("MaxPool", [pools[-1]], kernel_shape=[5, 5], pads=[2, 2, 2, 2]))
        return self.silu(self.conv(self.concat(*pools), out, 1))

    def if_branches(self, condition_from: str, x: str) -> str:
        """If(ReduceSum(condition_from) > 0) then x * 2 else x + 1, both branches reading `x` from outer scope."""
        total = self.op("ReduceSum", [condition_from], keepdims=0, channels=1)
        condition = self.op("Greater", [total, self.const(np.array(0, np.float32), prefix="zero")], channels=1)
        out = self.name("if_out")
        branches = []
        for op_type, value in (("Mul", 2.0), ("Add", 1.0)):
            constant = numpy_helper.from_array(np.array(value, np.float32), self.name("k"))
            branch_out = self.name("branch_out")
            node = helper.make_node(op_type, [x, constant.name], [branch_out], name=self.name(op_type))
            output = helper.make_tensor_value_info(branch_out, TensorProto.FLOAT, None)
            branches.append(helper.make_graph([node], self.name("branch"), [], [output], initializer=[constant]))
        self.nodes.append(
            helper.make_node("If", [condition], [out], name=self.name("If"), then_branch=branches[0], else_branch=branches[1])
        )
        self.channels[out] = self.channels[x]
        return out
