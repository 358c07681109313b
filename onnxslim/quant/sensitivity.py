"""Which roundings int8 hurts most: the accuracy guard's measure (guard.py ranks by it).

A *gate* is one place where int8 rounds: an activation tensor's QuantizeLinear/DequantizeLinear pair, or
one node's constant inputs (weights, bias). `gated_model` turns the int8 (QDQ) model into one model with a
scalar switch per gate -- all off is the fp32 model, one on rounds at that one place only, any set on rounds
at those places -- so a single onnxruntime session measures any gate or group of gates: the *deficit* is 1
minus the fidelity score the budget reads (mean cosine and worst channel, worst output), on a few
calibration samples -- on a sequence output (a CTC recognizer's) the per-frame top-1 agreement and cosine
rather than the strings the budget reads, which few samples resolve too coarsely (`Fidelity.closeness`).

Measured, not inferred: a relative error at a tensor says nothing of what the rest of the network makes of
it (a residual stream's outlier features, a Softmax's logits, a LayerNorm's input), and charging a node
for the error it adds misses the tensor that carries it in. A gate's deficit is what keeping it float
buys, to first order; the guard then keeps the gates that cost most in fp32 -- their *touchers*, every
quantizable node that makes or reads them (onnxruntime rounds a tensor when any of them is int8).

Two measures, the same runs:

* `measure_hierarchically` (the guard's): group testing. Every gate on, then the largest group split in
  halves, each half measured with its gates on together, down to single gates, as long as a group's
  deficit is at least a resolution (a fraction of the deficit the budget allows). Deficits add to first
  order, so a gate that matters sits in a group that matters and is found; a gate it measures alone has
  exactly its one-at-a-time deficit. About 2k log2(gates) runs for the k gates that matter: it does not
  grow as gates x model time (a 629-gate detector measured one gate at a time needed about 90 minutes).
* `measure_gate_deficits`: one run per gate, every gate alone -- the reference the group measure is
  checked against (tests/test_quantize.py on built models, benchmarks/int8_placement.py on a real one).

Samples: up to `SENSITIVITY_SAMPLES` (as one batch when the batch dim is symbolic), as many as the
expected runs allow in about `SENSITIVITY_SECONDS`, never fewer than `MIN_SAMPLES`. A switch is a `Where`
on a boolean scalar (one pass over the tensor, and exact either way, even on an attention mask's -inf);
every weight is dequantized once up front.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxslim.calib import Batch
from onnxslim.errors import UnsupportedModelError, first_line
from onnxslim.graph import ProtoIndex, subgraph_references
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
    "FEW_GATES",
    "GateMeasure",
    "gated_model",
    "measure_gate_deficits",
    "measure_hierarchically",
    "expected_group_runs",
    "GroupSplit",
    "split_groups",
]

GATE_PREFIX = "onnxslim_gate/"
SENSITIVITY_SAMPLES = 16  # calibration samples each gate is measured on, at most ...
SENSITIVITY_SECONDS = 60.0  # ... as many as measuring every gate on them within about this allows ...
MIN_SAMPLES = 4  # ... but never fewer (one sample ranked a recognizer's gates by 40 decisions) ...
CHANNEL_VALUES = 8  # ... and enough for each output channel's cosine to span this many values
FEW_GATES = 8  # the gates that matter, as `expected_group_runs` budgets samples for them


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
    used = {name for node in graph.node for name in node.input} | subgraph_references(graph)  # If branches too
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


@dataclass(frozen=True)
class GateMeasure:
    """The deficits the fallback ranks by, and what measuring them cost.

    `deficits[g]` is gate g's deficit measured alone when g is in `alone` (the one-gate-at-a-time measure,
    exactly); otherwise its even share of a group of gates measured together below `resolution`, which no
    gate alone can then exceed (to first order: deficits add). `runs` counts gated-model runs over the
    `samples` (one per gate or group measured), `whole` is the deficit with every gate on (the int8 model
    on these samples). `complete` is False when the time ran out before every group above `resolution`
    was split."""

    deficits: Mapping[str, float]
    alone: frozenset[str]
    gates: int
    runs: int
    samples: int
    seconds: float
    whole: float
    resolution: float = 0.0
    complete: bool = True

    @property
    def hierarchical(self) -> bool:
        return len(self.alone) < self.gates


class _GateRunner:
    """One session of the gated model and the samples every gate is measured on, with fp32's outputs there:
    `deficit(gates)` is 1 - the fidelity score with those gates on and every other off."""

    def __init__(
        self,
        gated: onnx.ModelProto,
        gates: Sequence[Gate],
        batches: Iterator[Batch],
        outputs: Sequence[str],
        layouts: Sequence[OutputLayout],
        rows: Callable[[Sequence[np.ndarray], Batch], list[np.ndarray]],
        *,
        threads: int,
        seconds: float,
        expected_runs: int,
    ) -> None:
        try:
            self.session = open_session(gated, threads, opt_level="all")
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types (InvalidGraph, Fail)
            # seen on silero-vad, whose If branches read weights from the outer graph
            raise UnsupportedModelError(f"onnxruntime cannot load the gated int8 model ({first_line(e)})") from e
        self.outputs, self.layouts, self.rows = outputs, layouts, rows
        self.off = {g.input: np.array(False) for g in gates}
        self.runs: list[Batch] = []
        self.references: list[list[np.ndarray]] = []
        self.count = 0
        source = iter(batches)
        first = next(source, None)
        if first is None or not gates:
            return
        feeds = {**first.feeds, **self.off}
        self.session.run(outputs, feeds)  # a session's first run is slow: not a measure of the others
        started = time.perf_counter()
        produced = rows(self.session.run(outputs, feeds), first)
        per_sample = (time.perf_counter() - started) / max(1, first.size)
        needed = max(
            (math.ceil(CHANNEL_VALUES * first.size * array.shape[layout.channel_axis] / max(1, array.size))
             for array, layout in zip(produced, layouts, strict=True) if layout.channel_axis is not None and array.size),
            default=MIN_SAMPLES,
        )
        affordable = int(seconds / max(per_sample * max(1, expected_runs), 1e-9))
        wanted = max(MIN_SAMPLES, needed, min(SENSITIVITY_SAMPLES, affordable))
        chosen = [first]
        for batch in source:
            if sum(b.size for b in chosen) >= wanted:
                break
            chosen.append(batch)
        self.runs = _joined(chosen) if batch_is_symbolic(gated, first.feeds) else chosen
        self.references = [rows(self.session.run(outputs, {**batch.feeds, **self.off}), batch) for batch in self.runs]

    @property
    def samples(self) -> int:
        return sum(b.size for b in self.runs)

    def deficit(self, gates: Iterable[Gate]) -> float:
        """1 - the fidelity score (worst output) with `gates` on; 2 when an output is not finite."""
        on = {g.input: np.array(True) for g in gates}
        meters = [FidelityMeter(layout) for layout in self.layouts]
        for batch, wants in zip(self.runs, self.references, strict=True):
            feeds = {**batch.feeds, **self.off, **on}
            for meter, want, got in zip(meters, wants, self.rows(self.session.run(self.outputs, feeds), batch), strict=True):
                meter.update(want, got)
        self.count += 1
        score = min(meter.result().closeness for meter in meters)
        return 1.0 - score if np.isfinite(score) else 2.0


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
) -> GateMeasure:
    """Each gate's deficit alone, one run per gate: 1 - the fidelity score (the worst of `outputs`, laid out
    as `layouts`, as the budget reads it) of the gated model with only that gate on, against all gates off
    (fp32), on the first calibration samples. The reference `measure_hierarchically` is checked against
    (its cost grows as gates x model time).

    How many samples: as many as measuring every gate within about `seconds` allows, at most
    `SENSITIVITY_SAMPLES`, at least `MIN_SAMPLES`, and enough for every output channel to hold
    `CHANNEL_VALUES` values (a [N, C] embedding needs that many samples). Batches are joined into one run
    when the inputs' batch dim is symbolic and shapes agree. `rows(arrays, batch)` keeps a batch's real
    samples."""
    started = time.perf_counter()
    runner = _GateRunner(gated, gates, batches, outputs, layouts, rows, threads=threads, seconds=seconds,
                         expected_runs=len(gates))
    if not runner.runs:
        return GateMeasure({}, frozenset(), len(gates), 0, 0, time.perf_counter() - started, 0.0)
    deficits = {}
    for number, gate in enumerate(gates, start=1):
        deficits[gate.name] = runner.deficit([gate])
        if progress is not None:
            progress("measuring", number, len(gates))
    return GateMeasure(
        deficits, frozenset(deficits), len(gates), runner.count, runner.samples, time.perf_counter() - started,
        whole=max(deficits.values(), default=0.0),
    )


def expected_group_runs(gates: int) -> int:
    """About how many runs `measure_hierarchically` makes over `gates` gates when a few of them matter:
    two per split on the way down to each of `FEW_GATES` gates (samples are chosen to fit it in time)."""
    return min(2 * gates - 1, 1 + 2 * FEW_GATES * max(1, math.ceil(math.log2(max(2, gates)))))


def measure_hierarchically(
    gated: onnx.ModelProto,
    gates: Sequence[Gate],
    batches: Iterator[Batch],
    outputs: Sequence[str],
    layouts: Sequence[OutputLayout],
    rows: Callable[[Sequence[np.ndarray], Batch], list[np.ndarray]],
    *,
    resolution: float,
    threads: int,
    progress: Progress | None = None,
    seconds: float = SENSITIVITY_SECONDS,
    limit: float | None = None,
) -> GateMeasure:
    """The gates' deficits by group testing: whole blocks first, inside only the blocks that matter.

    `gates` in graph order. Every gate on first (the whole model), then, largest deficit first, a group is
    split into its two halves (contiguous in `gates`: the blocks of the network), each measured with its
    gates on together, until every group left is below `resolution` or a single gate. A gate measured on
    its own this way has exactly its one-gate-at-a-time deficit (same session, same samples, same measure);
    one whose group stayed below `resolution` gets an even share of it. Deficits add to first order
    (independent roundings add as variances), so no gate alone exceeds the group it is in: every gate at or
    above `resolution` is found and measured alone. Cost: two runs per split, about 2k log2(gates) for k
    gates above `resolution` -- it grows with the gates that matter, not with all of them.

    Samples as `measure_gate_deficits` chooses them for `expected_group_runs` runs; `limit` (seconds): past
    it the groups left are not split (`complete` False)."""
    started = time.perf_counter()
    expected = expected_group_runs(len(gates))
    runner = _GateRunner(gated, gates, batches, outputs, layouts, rows, threads=threads, seconds=seconds,
                         expected_runs=expected)
    if not runner.runs:
        return GateMeasure({}, frozenset(), len(gates), 0, 0, time.perf_counter() - started, 0.0, resolution)
    split = split_groups(
        gates, runner.deficit, resolution, limit=limit,
        on_run=None if progress is None else lambda runs: progress("measuring", runs, max(runs, expected)),
    )
    return GateMeasure(
        split.deficits, split.alone, len(gates), runner.count, runner.samples, time.perf_counter() - started,
        split.whole, resolution, split.complete,
    )


@dataclass(frozen=True)
class GroupSplit:
    """What `split_groups` found: each gate's deficit (alone, or its share of a group), those measured alone,
    the deficit with every gate on, and whether every group above the resolution was split in time."""

    deficits: dict[str, float]
    alone: frozenset[str]
    whole: float
    complete: bool


def split_groups(
    gates: Sequence[Gate],
    deficit: Callable[[Sequence[Gate]], float],
    resolution: float,
    *,
    limit: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
    on_run: Callable[[int], None] | None = None,
) -> GroupSplit:
    """Pure: group testing over `gates` (in graph order) with `deficit(group)`, the deficit with that group's
    gates on together (`measure_hierarchically`): all of them first, then the group with the largest deficit
    split in its two contiguous halves, each measured, until every group left is a single gate or below
    `resolution`, or `limit` seconds have passed. A group not split gives each gate an even share."""
    started = clock()
    runs = 0

    def measured(group: tuple[Gate, ...]) -> float:
        nonlocal runs
        value = deficit(group)
        runs += 1
        if on_run is not None:
            on_run(runs)
        return value

    everything = tuple(gates)
    if not everything:
        return GroupSplit({}, frozenset(), 0.0, True)
    whole = measured(everything)
    deficits: dict[str, float] = {}
    alone: set[str] = set()
    pending: list[tuple[float, int, tuple[Gate, ...]]] = [(-whole, 0, everything)]
    complete = True
    order = 1
    while pending:
        negative, _, group = heapq.heappop(pending)
        value = -negative
        if len(group) == 1:
            deficits[group[0].name] = value
            alone.add(group[0].name)
            continue
        out_of_time = limit is not None and clock() - started > limit
        if value < resolution or out_of_time:
            complete = complete and not out_of_time
            for gate in group:
                deficits[gate.name] = value / len(group)
            continue
        middle = len(group) // 2
        for half in (group[:middle], group[middle:]):
            heapq.heappush(pending, (-measured(half), order, half))
            order += 1
    return GroupSplit(deficits, frozenset(alone), whole, complete)


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
