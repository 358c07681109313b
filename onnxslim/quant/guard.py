"""The accuracy guard of `quantize`: a budget, which nodes int8 hurts most, and a bounded search that keeps the
cheapest of them in fp32 until the budget holds.

* **Budget.** `max_drop` (points of top-1 against labels) and/or `min_fidelity` (against fp32 on held-out
  data, no labels needed): the lower of the mean per-sample cosine and the *worst channel's* cosine (see
  `metrics`), so a collapsed slice of an output (class scores concatenated with box coordinates) fails it;
  on an output whose channels are classes, top-1 agreement instead of the worst channel; on a sequence of
  classes (a CTC recognizer), the share of greedy-decoded strings unchanged (`Fidelity.score`, checked at its
  lower confidence bound by `evaluate.check_budget`). Default: `min_fidelity` 0.99 -- see
  `DEFAULT_MIN_FIDELITY`.
* **Ranges first.** A Concat whose inputs' calibrated ranges differ by more than `RANGE_RATIO` (100x) would
  share one int8 scale and round the small input to a few levels (a YOLO head's scores, 0-1 beside box
  pixels 0-320, all became 0): it is joined in float per input before anything is measured -- each input
  keeps its own scale, and the element-wise ops whose output only it reads are not rounded at all.
* **Which roundings hurt (measured, `sensitivity.py`).** Every place int8 rounds -- an activation's
  QuantizeLinear/DequantizeLinear pair, a node's weights -- is a *gate*, switched on in a gated copy of the
  int8 model on a few calibration samples, by groups and then alone where a group matters (group testing,
  down to `RESOLUTION` of the deficit the budget allows): its deficit is 1 - the fidelity score the budget
  reads. What
  keeping a gate float buys is then known, not inferred from where error shows up (a residual stream's
  outlier features, a GELU output read by a MatMul, a Softmax's logits: the tensor carries the damage, the
  node reading it does not make it).
* **Blocks.** A gate stays float only when every quantizable node that makes or reads it is fp32
  (onnxruntime rounds a tensor for all its readers when any of them is int8): that set is its block.
  Decomposed LayerNorm/RMSNorm (ReduceMean ... Div [Mul Add]) is kept in fp32 whole or not at all. A block
  that would leave nothing int8 is dropped (that is the fp32 model).
* **Search.** Blocks ranked by deficit per cost -- the MACs of their nodes (`analysis/cost.py`), or the
  elements a node without MACs writes -- are kept in fp32 greedily: the fallback spends the least int8
  time for the fidelity it buys, not the fewest blocks. The deficits of the gates still rounding
  add up (to first order) to the model's: the search starts at the fewest top blocks whose summed deficit is
  within the budget's (1 - min_fidelity; for a top-1 budget, the plain int8 deficit scaled by how far the
  drop is over), then doubles while the budget fails, then bisects between the largest count that failed
  and the smallest that held, while the blocks between them cost more than `CLOSE_ENOUGH` (2 %) of the
  model's MACs -- every count measured, all within `max_trials` trial quantizations (a
  requantization from the shared ranges plus one evaluation on the held-out data; no new calibration).
  Before that, when the requested calibration method misses the budget, the other methods (percentile at
  99.999 %, entropy) are tried, one trial each, and the best kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import onnx

from onnxslim.analysis.cost import LayerCost
from onnxslim.evaluate import AccuracyBudget, BudgetCheck
from onnxslim.graph import ProtoIndex

__all__ = [
    "RANGE_RATIO",
    "RESOLUTION",
    "CLOSE_ENOUGH",
    "MAX_TRIALS",
    "NodeError",
    "Block",
    "ExclusionTrial",
    "ExclusionSearch",
    "concat_range_offenders",
    "nonfinite_offenders",
    "layer_norm_blocks",
    "Gate",
    "rank_gates",
    "node_costs",
    "predicted_deficits",
    "first_count_within",
    "target_deficit",
    "search_exclusions",
]

logger = logging.getLogger(__name__)

RANGE_RATIO = 100.0
MAX_TRIALS = 12
RESOLUTION = 0.125  # the measure splits a group of roundings while it costs this much of the deficit allowed
CLOSE_ENOUGH = 0.02  # the search stops bisecting when the blocks left between fail and hold cost this share of the MACs
MIN_COST = 1.0  # a block's cost is at least this (one MAC), so a free block ranks by its deficit


@dataclass(frozen=True)
class NodeError:
    """A node kept in fp32 and why: its measured error, or the rule that kept it."""

    name: str
    op_type: str
    error: float | None  # deficit (1 - fidelity) of the rounding it was kept for, measured alone (None: a rule)
    reason: str


@dataclass(frozen=True)
class Block:
    """Nodes kept in fp32 together so that one gate (`rank_gates`) stays float, ranked by its deficit per
    cost."""

    nodes: tuple[str, ...]
    error: float  # the gate's deficit measured alone: 1 - fidelity with only it rounding
    gate: str = ""
    cost: float = 0.0  # what its nodes cost in fp32: their MACs and elements written (`node_costs`)


def nonfinite_offenders(model: onnx.ModelProto, tensors: Sequence[str]) -> list[NodeError]:
    """The nodes that make or read a tensor whose calibrated range is infinite: all of them stay fp32, so
    no QuantizeLinear lands on it (excluding only the producer would still quantize it for its readers)."""
    wanted = set(tensors)
    offenders: dict[str, NodeError] = {}
    for node in model.graph.node:
        made = wanted.intersection(node.output)
        read = wanted.intersection(node.input)
        for tensor in sorted(made | read):
            if node.name not in offenders:
                offenders[node.name] = NodeError(
                    node.name, node.op_type, None,
                    f"{'makes' if tensor in made else 'reads'} {tensor!r}, whose calibrated range is infinite "
                    "(e.g. an attention mask of float32-min)",
                )
    return list(offenders.values())


# ops that only move data: a tensor passed through them to a float Concat is still read by nobody in int8
_MOVERS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


def concat_range_offenders(
    model: onnx.ModelProto, ranges: Mapping[str, tuple[float, float]], ratio: float = RANGE_RATIO,
    compute_ops: Iterable[str] = (),
) -> list[NodeError]:
    """Concat nodes whose inputs' calibrated ranges (largest |value|) differ by more than `ratio`: each is
    joined in float, per input -- every input keeps the scale of its own range (the int8 producer before it
    rounds it alone), the output gets no shared scale. With it, the element-wise producers (not
    `compute_ops`) whose output only that Concat reads, through data-movement ops: rounding there would
    serve no int8 reader and cost the small input its fidelity (a YOLOv8 head's class probabilities, ≤ 1,
    rounded to 1/255 of their largest value beside box pixels: the absent classes all become 0)."""
    index = ProtoIndex(model.graph)
    compute = frozenset(compute_ops)
    found: dict[str, NodeError] = {}
    for node in model.graph.node:
        if node.op_type != "Concat":
            continue
        spans = [max(abs(ranges[i][0]), abs(ranges[i][1])) for i in node.input if i in ranges]
        spans = [s for s in spans if s > 0]
        if len(spans) >= 2 and max(spans) / min(spans) > ratio:
            found[node.name] = NodeError(
                node.name, node.op_type, None,
                f"joined in float per input: its inputs' calibrated ranges differ {max(spans) / min(spans):.0f}x "
                f"(max |x| {min(spans):.3g} vs {max(spans):.3g}), one int8 scale would round the small one away",
            )
            for tensor in node.input:
                for producer in _only_read_by(index, tensor, compute):
                    found.setdefault(producer.name, NodeError(
                        producer.name, producer.op_type, None,
                        f"its output is read only by {node.name}, joined in float per input: int8 there would "
                        "round for no int8 reader",
                    ))
    return list(found.values())


def _only_read_by(index: ProtoIndex, tensor: str, compute: frozenset[str]) -> list[onnx.NodeProto]:
    """The producers up from `tensor` (through data movement) whose output nothing else reads, up to and
    including the first that is no mover, unless that one is a compute op."""
    chain: list[onnx.NodeProto] = []
    while True:
        producer = index.producer(tensor)
        if producer is None or producer.op_type in compute or len(index.consumers(tensor)) != 1:
            return chain
        if tensor in index.outputs:
            return chain
        chain.append(producer)
        if producer.op_type not in _MOVERS or not producer.input:
            return chain
        tensor = producer.input[0]


_STATISTICS = frozenset({"Sqrt", "Add", "ReduceMean", "Pow", "Mul", "Reciprocal"})


def layer_norm_blocks(model: onnx.ModelProto) -> list[tuple[str, ...]]:
    """Decomposed LayerNorm / RMSNorm, each as a tuple of node names: a Div(x', sqrt(mean(x'^2) + eps)) --
    x' = x - mean(x) for LayerNorm, x for RMSNorm -- with the statistics behind the denominator, the Sub and
    ReduceMean that centre x, and the scale Mul / shift Add by constants right after."""
    index = ProtoIndex(model.graph)
    producers = index.producers
    constants = {t.name for t in model.graph.initializer}
    blocks = []
    for divide in model.graph.node:
        if divide.op_type != "Div" or len(divide.input) != 2 or divide.input[1] in constants:
            continue
        numerator = divide.input[0]
        statistics: list[onnx.NodeProto] = []
        stack, reaches_numerator, reduces = [divide.input[1]], False, False
        while stack and len(statistics) < 12:
            producer = producers.get(stack.pop())
            if producer is None or producer.op_type not in _STATISTICS:
                continue
            statistics.append(producer)
            reduces |= producer.op_type == "ReduceMean"
            for name in producer.input:
                if name == numerator:
                    reaches_numerator = True
                elif name not in constants:
                    stack.append(name)
        if not (reaches_numerator and reduces):
            continue
        members = [n.name for n in statistics]
        centre = producers.get(numerator)
        if centre is not None and centre.op_type == "Sub":
            mean = producers.get(centre.input[1])
            if mean is not None and mean.op_type == "ReduceMean" and mean.input[0] == centre.input[0]:
                members += [mean.name, centre.name]
        members.append(divide.name)
        tail = divide
        for _ in range(2):
            users = index.consumers(tail.output[0])
            if len(users) == 1 and users[0].op_type in ("Mul", "Add") and set(users[0].input) & constants:
                tail = users[0]
                members.append(tail.name)
            else:
                break
        blocks.append(tuple(dict.fromkeys(members)))
    return blocks


@dataclass(frozen=True)
class Gate:
    """One place where int8 rounds: an activation tensor's QuantizeLinear/DequantizeLinear pair, or a node's
    weights (with its bias). It stays float only when every node in `touchers` is kept in fp32: onnxruntime
    puts the pair on a tensor when its producer or any of its readers is quantized, and every reader then
    reads the rounded value."""

    name: str  # the float tensor (activation), or the node whose weights these are
    kind: str  # "activation" or "weights"
    touchers: tuple[str, ...]
    input: str  # the gated model's input that switches it: 1 rounds, 0 keeps it float


def rank_gates(
    deficits: Mapping[str, float],
    gates: Sequence[Gate],
    norms: Sequence[Sequence[str]],
    quantizable: Iterable[str] = (),
    minimum: float = 1e-6,
    costs: Mapping[str, float] | None = None,
) -> list[Block]:
    """What to keep in fp32, best buy first: for each gate, the nodes that must be fp32 for it to stay float,
    less those already taken; a block touching a decomposed LayerNorm takes it whole. With `costs` (node ->
    what it costs to run in fp32 rather than int8: `node_costs`), gates come by deficit per cost of their
    nodes -- the fallback keeps the fewest MACs fp32, not the fewest blocks; without, by deficit. Gates that
    cost less than `minimum` (1 - fidelity, measured alone), or that no node can switch off, are left out,
    and so is a block that would leave none of `quantizable` in int8 (that is the fp32 model, which the
    guard writes anyway when nothing meets the budget)."""
    norm_of = {name: tuple(block) for block in norms for name in block}
    every = set(quantizable)

    def members(gate: Gate) -> list[str]:
        found = list(gate.touchers)
        for member in list(found):
            found += norm_of.get(member, ())
        return list(dict.fromkeys(found))

    def cost(nodes: Iterable[str]) -> float:
        return 0.0 if costs is None else float(sum(costs.get(n, 0.0) for n in nodes))

    def priority(gate: Gate) -> tuple[float, str]:
        deficit = deficits.get(gate.name, 0.0)
        if costs is None:
            return (-deficit, gate.name)
        return (-deficit / max(cost(members(gate)), MIN_COST), gate.name)

    taken: set[str] = set()
    ranked = []
    for gate in sorted(gates, key=priority):
        deficit = deficits.get(gate.name, 0.0)
        if deficit < minimum or not gate.touchers:
            continue
        new = [m for m in members(gate) if m not in taken]
        if not new or (every and every <= taken.union(new)):
            continue
        taken.update(new)
        ranked.append(Block(tuple(new), deficit, gate.name, cost(new)))
    return ranked


def node_costs(layers: Iterable[LayerCost]) -> dict[str, float]:
    """What each node costs to run: its MACs, or for a node without MACs the elements it writes (one MAC
    each: a memory-bound op is cheap beside a convolution, but not free)."""
    return {layer.name: float(layer.macs or layer.elementwise) for layer in layers}


def predicted_deficits(ranked: Sequence[Block], gates: Sequence[Gate], deficits: Mapping[str, float]) -> list[float]:
    """Pure: the deficit (1 - fidelity) predicted with the top k blocks fp32, for k = 0 .. len(ranked): the
    sum of the deficits measured alone of the gates still rounding (independent errors add as variances,
    and 1 - cosine grows as the variance for small errors). Used to start the search near the answer; every
    count it suggests is then measured."""
    excluded: set[str] = set()
    predictions = []
    for count in range(len(ranked) + 1):
        if count:
            excluded.update(ranked[count - 1].nodes)
        predictions.append(
            sum(deficits.get(g.name, 0.0) for g in gates if not g.touchers or not set(g.touchers) <= excluded)
        )
    return predictions


def first_count_within(predictions: Sequence[float], target: float) -> int:
    """The fewest top blocks (at least 1) whose predicted deficit is within `target`; all of them if none is."""
    for count, predicted in enumerate(predictions):
        if count and predicted <= target:
            return count
    return max(1, len(predictions) - 1)


def target_deficit(budget: AccuracyBudget, plain: BudgetCheck) -> float | None:
    """The deficit (1 - fidelity) the search aims for: 1 - min_fidelity; for a top-1 budget, the plain int8
    model's deficit scaled by how far its drop is over (the drop taken as growing with the deficit). None
    when there is nothing to scale by."""
    budget = budget.resolved
    targets = []
    if budget.min_fidelity is not None:
        targets.append(1.0 - budget.min_fidelity)
    if budget.max_drop is not None and plain.drop is not None and plain.drop > 0:
        targets.append((1.0 - plain.score) * budget.max_drop / plain.drop)
    return min(targets) if targets else None


# ------------------------------------------------------------------------------------------- search


@dataclass(frozen=True)
class ExclusionTrial:
    """One trial: the top `blocks` blocks kept in fp32 (`nodes` nodes costing `cost`: `Block.cost`), and how
    it did."""

    blocks: int
    nodes: int
    check: BudgetCheck
    cost: float = 0.0


@dataclass(frozen=True)
class ExclusionSearch:
    """The outcome: the fewest top blocks that met the budget (None: no count tried met it)."""

    blocks: int | None
    trials: tuple[ExclusionTrial, ...]


def search_exclusions(
    ranked: Sequence[Block],
    evaluate: Callable[[Sequence[str]], BudgetCheck],
    max_trials: int,
    start: int = 1,
    close_enough: float = 0.0,
) -> ExclusionSearch:
    """Pure: keep the top `start` blocks in fp32, then twice as many ... until `evaluate(nodes)` meets the
    budget (the last step is every block), then bisect between the largest count that failed (0 at first:
    the caller tried none) and the smallest that held, at most `max_trials` evaluations in all, and only
    while the blocks between them cost more than `close_enough` (`Block.cost`: a trial that could save
    less time than that is not worth its evaluation)."""
    trials: list[ExclusionTrial] = []
    tried: dict[int, BudgetCheck] = {}

    def attempt(count: int) -> bool:
        nodes = list(dict.fromkeys(n for block in ranked[:count] for n in block.nodes))
        check = evaluate(nodes)
        tried[count] = check
        trials.append(ExclusionTrial(count, len(nodes), check, sum(block.cost for block in ranked[:count])))
        return check.met

    if not ranked or max_trials < 1:
        return ExclusionSearch(None, ())
    failed, held = 0, None
    count = min(max(1, start), len(ranked))
    while len(trials) < max_trials:
        if attempt(count):
            held = count
            break
        failed = count
        if count == len(ranked):
            break
        count = min(2 * count, len(ranked))
    def gap(low: int, high: int) -> float:
        return sum(block.cost for block in ranked[low:high])

    while (held is not None and held - failed > 1 and len(trials) < max_trials
           and (close_enough <= 0 or gap(failed, held) > close_enough)):
        middle = (failed + held) // 2
        if attempt(middle):
            held = middle
        else:
            failed = middle
    return ExclusionSearch(held, tuple(trials))
