"""Where Q/DQ pays on this CPU: which nodes onnxruntime runs as int8 kernels, and the placements built on it.

int8 is only faster where onnxruntime replaces a float op by an int8 kernel. In a QDQ model, it fuses
`DequantizeLinear → op → QuantizeLinear` into QLinearConv, QLinearMatMul, QGemm, QLinearAdd, QLinearSigmoid
...; a data-movement op (Reshape, Transpose ...) loses its pair and moves int8 data; any other quantized op
stays a float op between a DequantizeLinear and a QuantizeLinear, and the pair is pure overhead. Which ops
are fused depends on the onnxruntime version and this CPU (some int8 variants have no kernel on some
CPUs), so it is read, not assumed: `onnxruntime_fates` quantizes every node the quantizer can, lets
onnxruntime optimize that model as the timing sessions do (`all`), and reads what became of each node.

Even a fused element-wise kernel rarely pays: QLinearAdd and QLinearMul requantize at every step, and each
rounding costs accuracy (PP-OCRv4's recognizer: every element-wise op in int8 lost 20 points of lines,
compute ops alone were 1.23x). So the placements, from the narrowest:

    compute   Conv, ConvTranspose, Gemm, MatMul that onnxruntime runs in int8 (`PLACEMENT_ROLES`), with the
              Relu/Clip right after one of them, which the quantizer folds into its QuantizeLinear
    kernels   every node onnxruntime runs in int8 (compute ops, fused element-wise ops, data movement)
    all       every node the quantizer handles (onnxruntime's own choice, pairs around float ops included)

The quantizer's `placement` step starts from `compute` and takes `kernels` only when it is measured
clearly faster than `compute` (one interleaved run) and meets the budget; `all` only when asked.
"""

from __future__ import annotations

import enum
import logging
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxslim.errors import UnsupportedModelError, first_line
from onnxslim.graph import ProtoIndex
from onnxslim.quant.config import PLACEMENTS
from onnxslim.runtime import cpu_session, session_options

__all__ = [
    "PLACEMENTS",
    "PLACEMENT_ROLES",
    "Fate",
    "Role",
    "NodeFate",
    "Placement",
    "onnxruntime_fates",
    "build_placements",
    "fate_counts",
]

logger = logging.getLogger(__name__)


class Role(enum.Enum):
    """What an op type is to the placements."""

    COMPUTE = "compute"  # the MAC ops int8 is for
    FOLDED = "folded"  # an activation the quantizer folds into the QuantizeLinear of its producer


# Per-op knowledge of the placements, in one table: op types absent here are placed by what onnxruntime
# does with them (`Fate`), in `kernels` only.
PLACEMENT_ROLES: Mapping[str, Role] = {
    "Conv": Role.COMPUTE,
    "ConvTranspose": Role.COMPUTE,
    "Gemm": Role.COMPUTE,
    "MatMul": Role.COMPUTE,
    "Relu": Role.FOLDED,
    "Clip": Role.FOLDED,
}


class Fate(enum.Enum):
    """What onnxruntime made of a node quantized with everything else (`onnxruntime_fates`)."""

    INT8 = "runs in int8"  # fused into an int8 kernel, or moves int8 data
    FOLDED = "folded by the quantizer"  # gone from the QDQ model (a Relu/Clip merged into a QuantizeLinear)
    FLOAT = "float between Q/DQ"  # left a float op reading DequantizeLinear: the pair is overhead
    UNQUANTIZED = "not quantized"  # the quantizer left it alone (shape paths, integer tensors)


@dataclass(frozen=True)
class NodeFate:
    name: str
    op_type: str
    fate: Fate
    became: str  # the op it became in onnxruntime's optimized graph ('' when gone or renamed)


@dataclass(frozen=True)
class Placement:
    """One placement: the nodes that may be int8 (`int8`) and those kept float, each with why."""

    name: str
    int8: tuple[str, ...]
    float_nodes: Mapping[str, str]  # node -> why it stays float (only nodes the quantizer would handle)

    @property
    def label(self) -> str:
        return f"{self.name} ({len(self.int8)} node(s) int8)"


def _optimized(model: onnx.ModelProto, scratch: Path) -> onnx.ModelProto:
    """`model` as onnxruntime's CPU session optimizes it at level `all` (what the timing sessions run)."""
    options = session_options(opt_level="all")
    options.optimized_model_filepath = str(scratch / "optimized.onnx")
    try:
        cpu_session(model, options)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise UnsupportedModelError(f"onnxruntime cannot load the int8 model: {first_line(e)}") from e
    return onnx.load_model(options.optimized_model_filepath)


def onnxruntime_fates(
    prepared: onnx.ModelProto, qdq: onnx.ModelProto, handled: Iterable[str], excluded: Iterable[str] = ()
) -> dict[str, NodeFate]:
    """What onnxruntime does on this machine with each node of `prepared` whose op type the quantizer
    `handled`, in `qdq` (the model with every such node quantized but the `excluded`, which get no fate):
    `Fate` per node.

    A node is quantized when, in `qdq`, it reads a DequantizeLinear or a QuantizeLinear reads it, or the
    quantizer removed it (folded). In onnxruntime's optimized graph, a quantized node still there under its
    name and op type, reading a DequantizeLinear or read by a QuantizeLinear, runs in float between the
    pair; otherwise it was fused into an int8 kernel (renamed, or the same name as a QLinear op) or moves
    int8 data (a Reshape whose pair was dropped)."""
    types, left_out = set(handled), set(excluded)
    quantized_graph = ProtoIndex(qdq.graph)
    with tempfile.TemporaryDirectory(prefix="onnxslim-fates-") as scratch:
        optimized = _optimized(qdq, Path(scratch))
    optimized_graph = ProtoIndex(optimized.graph)

    def between_pairs(index: ProtoIndex, node: onnx.NodeProto) -> bool:
        reads = any((p := index.producers.get(i)) is not None and p.op_type == "DequantizeLinear" for i in node.input)
        read = any(r.op_type == "QuantizeLinear" for o in node.output for r in index.consumers(o))
        return reads or read

    fates = {}
    for node in prepared.graph.node:
        if node.op_type not in types or node.name in left_out:
            continue
        twin = quantized_graph.nodes.get(node.name)
        if twin is None:
            fates[node.name] = NodeFate(node.name, node.op_type, Fate.FOLDED, "")
            continue
        if not between_pairs(quantized_graph, twin):
            fates[node.name] = NodeFate(node.name, node.op_type, Fate.UNQUANTIZED, node.op_type)
            continue
        after = optimized_graph.nodes.get(node.name)
        if after is not None and after.op_type == node.op_type and between_pairs(optimized_graph, after):
            fates[node.name] = NodeFate(node.name, node.op_type, Fate.FLOAT, after.op_type)
        else:
            fates[node.name] = NodeFate(node.name, node.op_type, Fate.INT8, "" if after is None else after.op_type)
    return fates


def build_placements(prepared: onnx.ModelProto, fates: Mapping[str, NodeFate]) -> dict[str, Placement]:
    """The `compute` and `kernels` placements (module docstring) from onnxruntime's fates; `all` is every
    node the quantizer handles, nothing kept float."""
    index = ProtoIndex(prepared.graph)
    in_int8 = {name for name, f in fates.items() if f.fate is Fate.INT8}
    compute = {name for name in in_int8 if PLACEMENT_ROLES.get(fates[name].op_type) is Role.COMPUTE}
    for node in prepared.graph.node:  # in order: a Clip after a folded Relu after a Conv folds too
        fate = fates.get(node.name)
        if fate is None or fate.fate is not Fate.FOLDED or PLACEMENT_ROLES.get(node.op_type) is not Role.FOLDED:
            continue
        producer = index.producers.get(node.input[0]) if node.input else None
        if producer is not None and producer.name in compute and len(index.consumers(node.input[0])) == 1:
            compute.add(node.name)
    kernels = in_int8 | {name for name, f in fates.items() if f.fate is Fate.FOLDED}

    def placement(name: str, chosen: set[str], why_not: str) -> Placement:
        float_nodes = {}
        for node_name, fate in fates.items():
            if node_name in chosen or fate.fate is Fate.UNQUANTIZED:
                continue
            float_nodes[node_name] = (
                f"onnxruntime runs {fate.op_type} in float between Q/DQ on this machine" if fate.fate is Fate.FLOAT
                else why_not.format(op=fate.op_type)
            )
        ordered = tuple(n.name for n in prepared.graph.node if n.name in chosen)
        return Placement(name, ordered, float_nodes)

    return {
        "compute": placement("compute", compute, "{op} is no compute op: int8 there was not measured to pay"),
        "kernels": placement("kernels", kernels, "{op}: not an int8 kernel"),
        "all": Placement("all", tuple(n.name for n in prepared.graph.node if n.name in fates), {}),
    }


def fate_counts(fates: Mapping[str, NodeFate]) -> dict[str, dict[str, int]]:
    """Fate → op type → nodes: what onnxruntime made of each op type (for the report)."""
    counts: dict[str, Counter[str]] = {}
    for fate in fates.values():
        counts.setdefault(fate.fate.value, Counter())[fate.op_type] += 1
    return {fate: dict(counter.most_common()) for fate, counter in counts.items()}
