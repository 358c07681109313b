"""Which roundings int8 hurts most, measured one at a time: the accuracy guard's ranking (quant_guard.py).

A *gate* is one place where int8 rounds: an activation tensor's QuantizeLinear/DequantizeLinear pair, or
one node's constant inputs (weights, bias). `gated_model` turns the int8 (QDQ) model into one model with a
scalar switch per gate -- all off is the fp32 model, one on rounds at that one place only -- so a single
onnxruntime session measures every gate alone (`measure_gate_deficits`): its *deficit* is 1 minus the
fidelity score the budget reads (mean cosine and worst channel, worst output), on a few calibration samples.

Measured alone, not inferred: a relative error at a tensor says nothing of what the rest of the network
makes of it (a residual stream's outlier features, a Softmax's logits, a LayerNorm's input), and charging
a node for the error it adds misses the tensor that carries it in. A gate's deficit is exactly what keeping
it float buys, to first order; the guard then keeps the gates that cost most in fp32 -- their *touchers*,
every quantizable node that makes or reads them (onnxruntime rounds a tensor when any of them is int8).

Cost: one run per gate on up to `SENSITIVITY_SAMPLES` samples (as one batch when the batch dim is
symbolic). A switch is a `Where` on a boolean scalar (one pass over the tensor, and exact either way, even
on an attention mask's -inf); every weight is dequantized once up front.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from onnxslim.calib import Batch
from onnxslim.graph import ProtoIndex
from onnxslim.metrics import FidelityMeter, OutputLayout, batch_is_symbolic
from onnxslim.progress import Progress
from onnxslim.quant.guard import Gate
from onnxslim.runtime import open_session

__all__ = [
    "GATE_PREFIX",
    "SENSITIVITY_SAMPLES",
    "CHANNEL_VALUES",
    "MIN_SAMPLES",
    "SENSITIVITY_SECONDS",
    "gated_model",
    "measure_gate_deficits",
]

GATE_PREFIX = "onnxslim_gate/"
SENSITIVITY_SAMPLES = 16  # calibration samples each gate is measured on, at most ...
SENSITIVITY_SECONDS = 60.0  # ... as many as measuring every gate on them within about this allows ...
MIN_SAMPLES = 4  # ... but never fewer (one sample ranked a recognizer's gates by 40 decisions) ...
CHANNEL_VALUES = 8  # ... and enough for each output channel's cosine to span this many values


def gated_model(
    qdq: onnx.ModelProto, prepared: onnx.ModelProto, quantizable: Iterable[str]
) -> tuple[onnx.ModelProto, list[Gate]]:
    """The int8 (QDQ) model with a switch on every rounding: a boolean scalar input per gate.
    `quantizable`: the prepared model's nodes that the quantizer may make int8 (a gate's touchers).

    * an activation: consumers of `DequantizeLinear(QuantizeLinear(x))` read `Where(g, dq, x)`;
    * a constant input (weight, bias) of node N, dequantized once here (onnxruntime runs the
      DequantizeLinear nodes): N reads `Where(g, w_int8, w)`, `w` the prepared model's float value -- for a
      Gather's table, the rows it gathers are switched instead (`Where(g, Gather(w_int8), Gather(w))`), not
      the whole table.

    `qdq` must keep its removable activations (`QDQKeepRemovableActivations`), else a Relu folded into a
    QuantizeLinear would vanish with the switch off. Returns the model and its gates."""
    allowed = set(quantizable)
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    float_weights = {t.name: t for t in prepared.graph.initializer}
    prepared_nodes = {n.name: n for n in prepared.graph.node}
    built = ProtoIndex(graph)  # of the graph as quantized, before the switches go in
    producers, readers = built.producers, built.readers
    touched: dict[str, set[str]] = {}
    for node in prepared.graph.node:
        if node.name in allowed:
            for name in [*node.input, *node.output]:
                touched.setdefault(name, set()).add(node.name)
    dequantized = _run_constants(
        model, [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers]
    )

    gates: dict[str, Gate] = {}
    after: dict[str, list[onnx.NodeProto]] = {}  # node name -> the nodes that follow it
    dropped: set[str] = set()
    added: list[onnx.TensorProto] = []

    def gate_for(key: str, kind: str, touchers: Iterable[str]) -> Gate:
        if key not in gates:
            gates[key] = Gate(key, kind, tuple(sorted(touchers)), f"{GATE_PREFIX}{len(gates)}")
        return gates[key]

    def switch(place: str, gate: Gate, on: str, off: str, out: str) -> None:
        after.setdefault(place, []).append(
            onnx.helper.make_node("Where", [gate.input, on, off], [out], name=f"{out}/gate")
        )

    for node in list(graph.node):
        if node.op_type != "DequantizeLinear" or not node.output or not node.output[0]:
            continue
        source = producers.get(node.input[0])
        users = readers.get(node.output[0], [])
        rounded = node.output[0]
        if source is not None and source.op_type == "QuantizeLinear" and source.input[0] not in initializers:
            original = source.input[0]
            gate = gate_for(original, "activation", touched.get(original, set()))
            node.output[0] = f"{rounded}/rounded"
            switch(node.name, gate, node.output[0], original, rounded)
            continue
        if node.input[0] not in initializers or not users or rounded not in dequantized:
            continue
        value = dequantized[rounded]
        first, index = users[0]
        twin = prepared_nodes.get(first.name)
        if twin is None or index >= len(twin.input) or twin.input[index] not in float_weights:
            continue
        weight = numpy_helper.to_array(float_weights[twin.input[index]]).astype(value.dtype)
        if weight.shape != value.shape:
            continue
        gate = gate_for(first.name, "weights", {u.name for u, _ in users if u.name in allowed})
        dropped.add(node.name)
        added += [numpy_helper.from_array(weight, f"{rounded}/float"), numpy_helper.from_array(value, f"{rounded}/int8")]
        tables = [(u, i) for u, i in users if u.op_type == "Gather" and i == 0]
        for user, _ in tables:  # switch the gathered rows, not the table
            out = user.output[0]
            user.input[0] = f"{rounded}/float"
            user.output[0] = f"{out}/float"
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in user.attribute}
            after.setdefault(user.name, []).append(
                onnx.helper.make_node("Gather", [f"{rounded}/int8", user.input[1]], [f"{out}/int8"], name=f"{out}/int8", **attributes)
            )
            switch(user.name, gate, f"{out}/int8", f"{out}/float", out)
        if len(tables) < len(users):
            switch(node.name, gate, f"{rounded}/int8", f"{rounded}/float", rounded)

    graph.initializer.extend(added)
    nodes = []
    for node in graph.node:
        if node.name not in dropped:
            nodes.append(node)
        nodes += after.get(node.name, [])
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.extend(onnx.helper.make_tensor_value_info(g.input, onnx.TensorProto.BOOL, []) for g in gates.values())
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model, list(gates.values())


def _element(dequantize: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> int:
    """The float type a DequantizeLinear makes: its scale's."""
    scale = initializers.get(dequantize.input[1]) if len(dequantize.input) > 1 else None
    return scale.data_type if scale is not None else onnx.TensorProto.FLOAT


def _run_constants(model: onnx.ModelProto, dequantizes: Sequence[onnx.NodeProto]) -> dict[str, np.ndarray]:
    """The outputs of DequantizeLinear nodes whose inputs are all initializers, computed by onnxruntime."""
    if not dequantizes:
        return {}
    initializers = {t.name: t for t in model.graph.initializer}
    needed = dict.fromkeys(name for node in dequantizes for name in node.input if name)
    sub = onnx.helper.make_graph(
        list(dequantizes), "constants", [],
        [onnx.helper.make_tensor_value_info(n.output[0], _element(n, initializers), None) for n in dequantizes],
        [initializers[name] for name in needed if name in initializers],
    )
    constants = onnx.helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    session = open_session(constants, 1, opt_level="basic")
    names = [n.output[0] for n in dequantizes]
    return dict(zip(names, (np.asarray(a) for a in session.run(names, {})), strict=True))


def measure_gate_deficits(
    gated: onnx.ModelProto,
    gates: Sequence[Gate],
    batches: Iterator[Batch],
    outputs: Sequence[str],
    layouts: Sequence[OutputLayout],
    rows: Callable[[Sequence[np.ndarray], Batch], list[np.ndarray]],
    *,
    threads: int,
    progress: Progress | None = None,
    seconds: float = SENSITIVITY_SECONDS,
) -> tuple[dict[str, float], int]:
    """Each gate's deficit alone: 1 - the fidelity score (the worst of `outputs`, laid out as `layouts`, as
    the budget reads it) of the gated model with only that gate on, against all gates off (fp32), on the
    first calibration samples. How many: as many as measuring every gate within about `seconds` allows, at
    most `SENSITIVITY_SAMPLES`, at least `MIN_SAMPLES`, and enough for every output channel to hold
    `CHANNEL_VALUES` values (a [N, C] embedding needs that many samples). Batches are
    joined into one run when the inputs' batch dim is symbolic and shapes agree. `rows(arrays, batch)`
    keeps a batch's real samples. Returns the deficits (2 for a gate whose outputs are not finite) and the
    samples used."""
    session = open_session(gated, threads, opt_level="all")
    off = {g.input: np.array(False) for g in gates}
    source = iter(batches)
    first = next(source, None)
    if first is None or not gates:
        return {}, 0
    feeds = {**first.feeds, **off}
    session.run(outputs, feeds)  # a session's first run is slow: not a measure of the others
    started = time.perf_counter()
    produced = rows(session.run(outputs, feeds), first)
    per_sample = (time.perf_counter() - started) / max(1, first.size)
    needed = max(
        (math.ceil(CHANNEL_VALUES * first.size * array.shape[layout.channel_axis] / max(1, array.size))
         for array, layout in zip(produced, layouts, strict=True) if layout.channel_axis is not None and array.size),
        default=MIN_SAMPLES,
    )
    affordable = int(seconds / max(per_sample * len(gates), 1e-9))
    wanted = max(MIN_SAMPLES, needed, min(SENSITIVITY_SAMPLES, affordable))
    chosen = [first]
    for batch in source:
        if sum(b.size for b in chosen) >= wanted:
            break
        chosen.append(batch)
    runs = _joined(chosen) if batch_is_symbolic(gated, first.feeds) else chosen
    references = [rows(session.run(outputs, {**batch.feeds, **off}), batch) for batch in runs]
    deficits = {}
    for number, gate in enumerate(gates, start=1):
        meters = [FidelityMeter(layout) for layout in layouts]
        for batch, wants in zip(runs, references, strict=True):
            feeds = {**batch.feeds, **off, gate.input: np.array(True)}
            for meter, want, got in zip(meters, wants, rows(session.run(outputs, feeds), batch), strict=True):
                meter.update(want, got)
        score = min(meter.result().score for meter in meters)
        deficits[gate.name] = 1.0 - score if np.isfinite(score) else 2.0
        if progress is not None:
            progress("measuring", number, len(gates))
    return deficits, sum(b.size for b in runs)


def _joined(batches: Sequence[Batch]) -> list[Batch]:
    """The batches as one, when every input has the same shape past the batch axis in all of them."""
    if len(batches) < 2:
        return list(batches)
    first = batches[0].feeds
    if any({k: v.shape[1:] for k, v in b.feeds.items()} != {k: v.shape[1:] for k, v in first.items()} for b in batches):
        return list(batches)
    if any(len(v) != b.size for b in batches for v in b.feeds.values()):
        return list(batches)  # padded rows: keep them apart so `rows` can drop them
    feeds = {name: np.concatenate([b.feeds[name] for b in batches]) for name in first}
    return [Batch(feeds, None, sum(b.size for b in batches))]
