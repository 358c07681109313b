"""Intermediate tensors of a model on calibration data: streaming per-channel statistics, and a staged runner.

`channel_statistics` runs the model once over the data with the requested tensors exposed and keeps, per
channel of each (tensor, axis), the running sums of x, x² and |x| — memory is the channel counts, never
the number of samples. Sessions run at onnxruntime's *basic* optimization level: at `all`, fusions make
some intermediate tensors impossible to expose.

`StagedRunner` runs a model's nodes in order, one contiguous range at a time, over every calibration
batch, keeping (per batch) only the tensors later ranges still read. It is how recovery passes activations
forward instead of re-running the whole model once per refit layer: each range is a small model of its
own, built from the model *as it is now*, so weights changed between ranges are used downstream. What it
keeps is held in memory up to `memory_budget` bytes and spilled to `.npy` files in a temporary folder
(read back memory-mapped) past it, so its memory does not grow with the number of samples; its disk use does.
It keeps tensors exactly as onnxruntime gave them (a shape-[] scalar stays shape []); a value that is no
tensor (a sequence) or a range onnxruntime refuses on its own raises `StagedRunError`, which recovery meets by
running the whole model. `check_staged_runner` is its proof: every range's outputs against one run of the
whole model exposing them, bit for bit (the tests run it over many graphs, benchmarks/staged_runner_check.py
over real exports).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxslim.calib import Batch, Dataset
from onnxslim.errors import DataError, StagedRunError, first_line
from onnxslim.io import infer_tensor_infos
from onnxslim.progress import Progress
from onnxslim.runtime import cpu_session, session_options

__all__ = [
    "ChannelStats",
    "TensorStats",
    "tensor_statistics",
    "StageMismatch",
    "StagedCheck",
    "StagedRunner",
    "channel_statistics",
    "check_staged_runner",
    "stage_ends",
    "with_outputs",
]

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics of one tensor along one axis over the calibration samples."""

    mean: np.ndarray
    mean_square: np.ndarray
    mean_abs: np.ndarray
    count: int  # values per channel that went into the means

    @property
    def variance(self) -> np.ndarray:
        return np.maximum(self.mean_square - self.mean**2, 0.0)


class _Accumulator:
    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.square: np.ndarray | None = None
        self.absolute: np.ndarray | None = None
        self.count = 0

    def add(self, array: np.ndarray, axis: int) -> None:
        moved = np.moveaxis(np.asarray(array, dtype=np.float64), axis, -1)
        flat = moved.reshape(-1, moved.shape[-1])
        sums = (flat.sum(axis=0), np.square(flat).sum(axis=0), np.abs(flat).sum(axis=0))
        if self.total is None:
            self.total, self.square, self.absolute = sums
        else:
            if sums[0].shape != self.total.shape:
                raise DataError(f"a tensor changed its channel count between batches ({self.total.shape} vs {sums[0].shape})")
            self.total += sums[0]
            self.square += sums[1]
            self.absolute += sums[2]
        self.count += flat.shape[0]

    def result(self) -> ChannelStats:
        assert self.total is not None and self.square is not None and self.absolute is not None
        n = max(self.count, 1)
        return ChannelStats(self.total / n, self.square / n, self.absolute / n, self.count)


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the tensors `names` (types left to onnxruntime)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in present:
            exposed.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return exposed


def channel_statistics(
    model: onnx.ModelProto,
    data: Dataset,
    requests: Mapping[str, int],
    *,
    batches: Callable[[], Iterable[Batch]] | None = None,
    progress: Progress | None = None,
) -> dict[str, ChannelStats]:
    """Per-channel mean, mean square and mean |x| of each requested tensor (name → channel axis).

    One streaming pass; padding rows of a fixed-batch model's last batch are ignored.
    """
    if not requests:
        return {}
    names = sorted(requests)
    probe = with_outputs(model, names)
    try:
        session = cpu_session(probe, session_options(opt_level="basic"))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise DataError(f"onnxruntime cannot run the model with its intermediate tensors exposed: {first_line(e)}") from e
    accumulators = {name: _Accumulator() for name in names}
    total = data.num_batches
    for done, batch in enumerate(batches() if batches is not None else data.batches(), start=1):
        try:
            values = session.run(names, batch.feeds)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"the model fails on the calibration data: {first_line(e)}") from e
        for name, value in zip(names, values, strict=True):
            value = np.asarray(value)
            if value.ndim and value.shape[0] > batch.size and value.shape[0] == len(next(iter(batch.feeds.values()))):
                value = value[: batch.size]
            accumulators[name].add(value, requests[name])
        if progress is not None:
            progress("statistics", done, total)
    return {name: acc.result() for name, acc in accumulators.items() if acc.total is not None}


@dataclass(frozen=True)
class TensorStats:
    """One tensor over the data: its range, moments, and what makes it hard to quantize.

    `outlier_ratio` is max |x| over the standard deviation: int8 spends its 255 steps on the range, so a
    tensor whose range is hundreds of standard deviations wide rounds most of its values to a few levels
    (a transformer's residual stream, an unnormalized head). `zeros` is the share of exact zeros (after a
    Relu, the dead share)."""

    name: str
    op_type: str  # of the node that writes it
    shape: tuple[int, ...]  # of one batch, as run
    minimum: float
    maximum: float
    mean: float
    std: float
    zeros: float
    nonfinite: int  # NaN and infinite values seen
    values: int

    @property
    def outlier_ratio(self) -> float:
        peak = max(abs(self.minimum), abs(self.maximum))
        return peak / self.std if self.std > 0 else (0.0 if peak == 0 else float("inf"))


class _Moments:
    def __init__(self) -> None:
        self.low, self.high = np.inf, -np.inf
        self.total = self.square = 0.0
        self.zeros = self.nonfinite = self.count = 0
        self.shape: tuple[int, ...] = ()

    def add(self, array: np.ndarray) -> None:
        values = np.asarray(array, dtype=np.float64)
        self.shape = tuple(array.shape)
        finite = np.isfinite(values)
        self.nonfinite += int(values.size - np.count_nonzero(finite))
        kept = values[finite] if self.nonfinite else values.ravel()
        if kept.size:
            self.low, self.high = min(self.low, float(kept.min())), max(self.high, float(kept.max()))
            self.total += float(kept.sum())
            self.square += float(np.square(kept).sum())
            self.zeros += int(kept.size - np.count_nonzero(kept))
            self.count += int(kept.size)

    def result(self, name: str, op_type: str) -> TensorStats:
        n = max(self.count, 1)
        mean = self.total / n
        std = float(np.sqrt(max(self.square / n - mean * mean, 0.0)))
        low = self.low if self.count else float("nan")
        high = self.high if self.count else float("nan")
        return TensorStats(name, op_type, self.shape, low, high, mean, std, self.zeros / n, self.nonfinite, self.count)


def tensor_statistics(
    model: onnx.ModelProto, data: Dataset, *, progress: Progress | None = None
) -> list[TensorStats]:
    """Every float tensor a node writes, over all of `data` in one streaming pass (memory: a few numbers per
    tensor, and one batch's activations at a time), in the order the nodes run."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    infos = infer_tensor_infos(model, data.input_shapes)
    writers = {output: node.op_type for node in model.graph.node for output in node.output if output}
    names = [name for name in writers if name in infos and infos[name].elem_type in floats]
    if not names:
        return []
    try:
        session = cpu_session(with_outputs(model, names), session_options(opt_level="basic"))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise DataError(f"onnxruntime cannot run the model with its intermediate tensors exposed: {first_line(e)}") from e
    moments = {name: _Moments() for name in names}
    for done, batch in enumerate(data.batches(), start=1):
        try:
            values = session.run(names, batch.feeds)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"the model fails on the data: {first_line(e)}") from e
        fed = len(next(iter(batch.feeds.values())))
        for name, value in zip(names, values, strict=True):
            value = np.asarray(value)
            if value.ndim and fed > batch.size and value.shape[0] == fed:
                value = value[: batch.size]  # padding rows of a fixed batch
            moments[name].add(value)
        if progress is not None:
            progress("statistics", done, data.num_batches)
    return [moments[name].result(name, writers[name]) for name in names]


class _Store:
    """Arrays per (batch, tensor): in memory up to a budget, then in `.npy` files read back memory-mapped."""

    def __init__(self, memory_budget: int) -> None:
        self._budget = memory_budget
        self._in_memory = 0
        self._arrays: dict[tuple[int, str], np.ndarray] = {}
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self._files = 0
        self.spilled = 0  # bytes written to disk, for the report

    def put(self, batch: int, name: str, value: object) -> None:
        """Keep `value` (a tensor: onnxruntime gives lists for sequences, None for empty optionals) as is."""
        if not isinstance(value, np.ndarray):
            raise StagedRunError(
                f"{name!r} is a {type(value).__name__}, not a tensor: the staged runner keeps only tensors between ranges"
            )
        self.drop(batch, name)
        # np.asarray, never np.ascontiguousarray: that one turns a 0-d tensor into a 1-d one, and the shape-[]
        # scalars of shapes computed at run time (Shape → Gather → Mul) then broke a Concat downstream on rank
        array = np.asarray(value, order="C")
        # strings (object arrays) stay in memory: .npy would have to pickle them
        if array.dtype == object or self._in_memory + array.nbytes <= self._budget:
            self._arrays[(batch, name)] = array
            self._in_memory += array.nbytes
            return
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="onnxslim-activations-")
        path = Path(self._folder.name) / f"{self._files}.npy"
        self._files += 1
        np.save(path, array)
        self.spilled += array.nbytes
        self._arrays[(batch, name)] = np.load(path, mmap_mode="r")

    def get(self, batch: int, name: str) -> np.ndarray:
        return self._arrays[(batch, name)]

    def has(self, batch: int, name: str) -> bool:
        return (batch, name) in self._arrays

    def drop(self, batch: int, name: str) -> None:
        array = self._arrays.pop((batch, name), None)
        if array is not None and not isinstance(array, np.memmap):
            self._in_memory -= array.nbytes

    def close(self) -> None:
        self._arrays.clear()
        self._in_memory = 0
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies, nested ones too) read from the enclosing graph."""
    names: set[str] = set()
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for graph in graphs:
            inner = {t.name for t in graph.input} | {t.name for t in graph.initializer}
            inner |= {t.values.name for t in graph.sparse_initializer}
            for inner_node in graph.node:
                names |= _node_inputs(inner_node) - inner
                inner |= set(inner_node.output)
    return names


def _node_inputs(node: onnx.NodeProto) -> set[str]:
    return {name for name in node.input if name} | _subgraph_inputs(node)


# ops whose output differs from run to run even on constant inputs: never treated as constants
_NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                               "Bernoulli"})


def _constant_derived(model: onnx.ModelProto) -> set[str]:
    """Tensors computed from constants alone (Constant nodes, Reshape of a constant, …): the same in every
    batch. onnxruntime folds them in the whole model; a range that reads one gets it as a constant too, or it
    would fuse differently (a BatchNormalization whose scale came in as an input stayed unfused) and round
    differently from the whole model."""
    graph_inputs = {value.name for value in model.graph.input}
    fixed = {t.name for t in model.graph.initializer} | {t.values.name for t in model.graph.sparse_initializer}
    fixed -= graph_inputs  # a feed may override the initializer of a graph input
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type not in _NONDETERMINISTIC and _node_inputs(node) <= fixed:
            fixed |= {name for name in node.output if name}
    return fixed


def _stage_input(name: str, array: np.ndarray) -> onnx.ValueInfoProto:
    """A stage's graph input for `array`: its element type, any shape (one stage serves every batch)."""
    try:
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)  # object arrays (strings): STRING
    except (KeyError, TypeError, ValueError) as e:
        raise StagedRunError(f"{name!r} has an element type ({array.dtype}) the staged runner cannot declare") from e
    return onnx.helper.make_tensor_value_info(name, elem_type, None)


class StagedRunner:
    """Runs `model`'s nodes in `order` over every batch of `feeds`, one range at a time (module docstring).

    `protect`: tensors kept until `release`d even when no later node reads them (outputs a caller reads).
    The model may be replaced (`update`) between ranges, with the same node names and tensors.
    A range is a model of its own: its nodes, the constants they read (a fed graph input overrides its
    initializer, as in the whole model) and the kept tensors computed from constants alone, the model's
    opsets and local functions, and the other kept tensors it reads as inputs of any shape. What it cannot do raises StagedRunError (`check_staged_runner` checks
    the rest: every range's outputs are those of the whole model, bit for bit).
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        feeds: Iterable[Mapping[str, np.ndarray]],
        *,
        memory_budget: int = 1 << 30,
        protect: Iterable[str] = (),
    ) -> None:
        self._store = _Store(memory_budget)
        self._protected = set(protect)
        self.position = 0
        self.update(model)
        self._batches = 0
        for index, batch in enumerate(feeds):  # streamed into the store, which spills past its budget
            for name, array in batch.items():
                self._store.put(index, name, array)
            self._batches = index + 1

    def update(self, model: onnx.ModelProto) -> None:
        """Use `model` for the ranges still to run (same node names; e.g. refit weights)."""
        self._model = model
        self._nodes = list(model.graph.node)
        self._positions = {node.name: position for position, node in enumerate(self._nodes)}
        self._initializers = {t.name: t for t in model.graph.initializer}
        self._sparse_initializers = {t.values.name: t for t in model.graph.sparse_initializer}
        self._graph_outputs = {o.name for o in model.graph.output}
        self._from_constants = _constant_derived(model)
        self._last_reader: dict[str, int] = {}
        for position, node in enumerate(self._nodes):
            for name in _node_inputs(node):
                self._last_reader[name] = position

    def position_of(self, node_name: str) -> int:
        try:
            return self._positions[node_name]
        except KeyError:
            raise KeyError(f"no node named {node_name!r}") from None

    @property
    def batches(self) -> int:
        return self._batches

    def get(self, batch: int, name: str) -> np.ndarray:
        return self._store.get(batch, name)

    def release(self, name: str) -> None:
        """Stop protecting `name`; it goes once no later node reads it."""
        self._protected.discard(name)
        if self._last_reader.get(name, -1) < self.position and name not in self._graph_outputs:
            for batch in range(self._batches):
                self._store.drop(batch, name)

    def _is_constant(self, name: str) -> bool:
        """An initializer that is not fed (a graph input's feed overrides its initializer)."""
        return (name in self._initializers or name in self._sparse_initializers) and not self._store.has(0, name)

    def run_to(self, end: int) -> list[str]:
        """Run nodes [position, end) on every batch; return the tensors computed and kept (those later nodes
        read, graph outputs, protected ones). Afterwards only tensors still needed are kept.

        StagedRunError when the range cannot run on its own; the runner then stays at its position.
        """
        if end <= self.position:
            return []
        nodes = self._nodes[self.position : end]
        produced: set[str] = set()
        needed: list[str] = []
        for node in nodes:
            for name in sorted(_node_inputs(node)):
                if name not in produced and name not in needed and not self._is_constant(name):
                    needed.append(name)
            produced |= {name for name in node.output if name}
        outputs = [
            name for name in sorted(produced)
            if self._last_reader.get(name, -1) >= end or name in self._graph_outputs or name in self._protected
        ]
        kept = [name for name in needed if self._store.has(0, name)]
        inputs = [name for name in kept if name not in self._from_constants]
        computed_constants = [name for name in kept if name in self._from_constants]  # the same in every batch
        missing = [name for name in needed if name not in kept and name not in produced]
        span = f"nodes {nodes[0].name or nodes[0].op_type}…{nodes[-1].name or nodes[-1].op_type}"
        if missing and self._batches:
            raise StagedRunError(f"staged run of {span}: tensors {missing[:3]} are needed but were not computed")
        if outputs and self._batches:
            constants = self._needed_constants(nodes)
            graph = onnx.helper.make_graph(
                nodes,
                "stage",
                [_stage_input(name, self._store.get(0, name)) for name in inputs],
                [onnx.ValueInfoProto(name=name) for name in outputs],
                initializer=[
                    *(self._initializers[name] for name in sorted(constants & self._initializers.keys())),
                    *(numpy_helper.from_array(np.asarray(self._store.get(0, name)), name) for name in computed_constants),
                ],
                sparse_initializer=[
                    self._sparse_initializers[name] for name in sorted(constants & self._sparse_initializers.keys())
                ],
            )
            stage = onnx.helper.make_model(
                graph, opset_imports=self._model.opset_import, ir_version=self._model.ir_version,
                functions=self._model.functions,
            )
            try:
                session = cpu_session(stage, session_options(opt_level="basic"))
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise StagedRunError(f"onnxruntime cannot run {span} on their own: {first_line(e)}") from e
            for batch in range(self._batches):
                try:
                    values = session.run(outputs, {name: np.asarray(self._store.get(batch, name)) for name in inputs})
                except Exception as e:  # noqa: BLE001
                    raise StagedRunError(f"onnxruntime fails on {span} run on their own: {first_line(e)}") from e
                for name, value in zip(outputs, values, strict=True):
                    self._store.put(batch, name, value)
        self.position = end
        for name in [*kept, *outputs]:
            if self._last_reader.get(name, -1) < end and name not in self._graph_outputs and name not in self._protected:
                for batch in range(self._batches):
                    self._store.drop(batch, name)
        return outputs

    def _needed_constants(self, nodes: Sequence[onnx.NodeProto]) -> set[str]:
        return {name for node in nodes for name in _node_inputs(node) if self._is_constant(name)}

    @property
    def spilled_bytes(self) -> int:
        return self._store.spilled

    def close(self) -> None:
        self._store.close()


# ------------------------------------------------------------------------------------------ self-check


@dataclass(frozen=True)
class StageMismatch:
    """A tensor a range computed that differs from the whole model's (or that the whole model lacks)."""

    stage: int
    nodes: str  # first…last node of the range
    tensor: str
    batch: int
    detail: str


@dataclass(frozen=True)
class StagedCheck:
    """`check_staged_runner`'s result: ranges run, tensors compared (per batch) and the mismatches."""

    stages: int
    compared: int
    mismatches: tuple[StageMismatch, ...]

    @property
    def passed(self) -> bool:
        return not self.mismatches


def stage_ends(node_count: int, longest: int, seed: int = 0) -> list[int]:
    """Ends of ranges of seeded random lengths 1…`longest` covering `node_count` nodes."""
    rng = np.random.default_rng(seed)
    ends, position = [], 0
    while position < node_count:
        position = min(node_count, position + int(rng.integers(1, longest + 1)))
        ends.append(position)
    return ends


def _digest(array: np.ndarray) -> tuple[str, tuple[int, ...], str]:
    """(dtype, shape, hash of the bytes): equal exactly when the tensors are identical bit for bit."""
    array = np.asarray(array)
    payload = repr(array.tolist()).encode() if array.dtype == object else np.ascontiguousarray(array).tobytes()
    return array.dtype.str, array.shape, hashlib.sha1(payload).hexdigest()


def check_staged_runner(
    model: onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    ends: Sequence[int],
    *,
    memory_budget: int = 1 << 30,
) -> StagedCheck:
    """Run `model` with `StagedRunner` in the ranges ending at `ends`, and compare every range's outputs with
    one whole-model run (per batch) exposing all of them: they must be identical, bit for bit.

    Why: recovery trusts the staged runner to give the whole model's activations; a range that is not a
    faithful model of its own (a scalar that lost its rank, an initializer a feed should override) shows
    here. Only digests of the staged tensors are kept, so memory does not grow with the model.
    """
    runner = StagedRunner(model, feeds, memory_budget=memory_budget)
    staged: dict[str, tuple[int, str, list[tuple[str, tuple[int, ...], str]]]] = {}
    mismatches: list[StageMismatch] = []
    try:
        for stage, end in enumerate(ends):
            first = runner.position
            span = f"{model.graph.node[first].name}…{model.graph.node[end - 1].name}" if end > first else ""
            try:
                kept = runner.run_to(end)
            except StagedRunError as e:  # the range failed: what ran before it is still compared
                mismatches.append(StageMismatch(stage, span, "", -1, str(e)))
                break
            for name in kept:
                staged[name] = (stage, span, [_digest(runner.get(batch, name)) for batch in range(runner.batches)])
    finally:
        runner.close()
    names = sorted(staged)
    session = cpu_session(with_outputs(model, names), session_options(opt_level="basic"))
    for batch, batch_feeds in enumerate(feeds):
        values = session.run(names, dict(batch_feeds)) if names else []
        for name, value in zip(names, values, strict=True):
            stage, span, digests = staged[name]
            want = _digest(value)
            if digests[batch] != want:
                got = digests[batch]
                detail = (f"{got[0]}{list(got[1])} vs the whole model's {want[0]}{list(want[1])}"
                          if got[:2] != want[:2] else "values differ")
                mismatches.append(StageMismatch(stage, span, name, batch, detail))
    return StagedCheck(len(ends), len(names) * len(feeds), tuple(mismatches))
