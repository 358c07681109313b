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
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxslim.calib import Batch, Dataset
from onnxslim.errors import DataError, first_line
from onnxslim.progress import Progress
from onnxslim.runtime import cpu_session, session_options

__all__ = ["ChannelStats", "channel_statistics", "StagedRunner", "Progress", "with_outputs"]

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


class _Store:
    """Arrays per (batch, tensor): in memory up to a budget, then in `.npy` files read back memory-mapped."""

    def __init__(self, memory_budget: int) -> None:
        self._budget = memory_budget
        self._in_memory = 0
        self._arrays: dict[tuple[int, str], np.ndarray] = {}
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self._files = 0
        self.spilled = 0  # bytes written to disk, for the report

    def put(self, batch: int, name: str, array: np.ndarray) -> None:
        self.drop(batch, name)
        array = np.ascontiguousarray(array)
        if self._in_memory + array.nbytes <= self._budget:
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
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing graph."""
    names: set[str] = set()
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for graph in graphs:
            inner = {t.name for t in graph.input} | {t.name for t in graph.initializer}
            for inner_node in graph.node:
                names |= {n for n in inner_node.input if n and n not in inner}
                names |= _subgraph_inputs(inner_node)
                inner |= set(inner_node.output)
    return names


def _node_inputs(node: onnx.NodeProto) -> set[str]:
    return {name for name in node.input if name} | _subgraph_inputs(node)


class StagedRunner:
    """Runs `model`'s nodes in `order` over every batch of `feeds`, one range at a time (module docstring).

    `protect`: tensors kept until `release`d even when no later node reads them (outputs a caller reads).
    The model may be replaced (`update`) between ranges, with the same node names and tensors.
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
        self._graph_outputs = {o.name for o in model.graph.output}
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

    def run_to(self, end: int) -> None:
        """Run nodes [position, end) on every batch; afterwards only tensors still needed are kept."""
        if end <= self.position:
            return
        nodes = self._nodes[self.position : end]
        produced: set[str] = set()
        needed: list[str] = []
        for node in nodes:
            for name in sorted(_node_inputs(node)):
                if name not in produced and name not in self._initializers and name not in needed:
                    needed.append(name)
            produced |= {name for name in node.output if name}
        outputs = [
            name for name in sorted(produced)
            if self._last_reader.get(name, -1) >= end or name in self._graph_outputs or name in self._protected
        ]
        inputs = [name for name in needed if self._store.has(0, name)]
        missing = [name for name in needed if name not in inputs and name not in produced]
        if missing:
            raise DataError(f"staged run: tensors {missing[:3]} are needed but were not computed")
        if outputs:
            graph = onnx.helper.make_graph(
                nodes,
                "stage",
                [onnx.helper.make_tensor_value_info(
                    name, onnx.helper.np_dtype_to_tensor_dtype(self._store.get(0, name).dtype), None
                ) for name in inputs],
                [onnx.ValueInfoProto(name=name) for name in outputs],
                initializer=[self._initializers[name] for name in sorted(self._needed_constants(nodes))],
            )
            stage = onnx.helper.make_model(graph, opset_imports=self._model.opset_import, ir_version=self._model.ir_version)
            try:
                session = cpu_session(stage, session_options(opt_level="basic"))
            except Exception as e:  # noqa: BLE001
                raise DataError(f"staged run: onnxruntime cannot run nodes {nodes[0].name}…{nodes[-1].name}: {first_line(e)}") from e
            for batch in range(self._batches):
                values = session.run(outputs, {name: np.asarray(self._store.get(batch, name)) for name in inputs})
                for name, value in zip(outputs, values, strict=True):
                    self._store.put(batch, name, value)
        self.position = end
        for name in [*inputs, *outputs]:
            if self._last_reader.get(name, -1) < end and name not in self._graph_outputs and name not in self._protected:
                for batch in range(self._batches):
                    self._store.drop(batch, name)

    def _needed_constants(self, nodes: Sequence[onnx.NodeProto]) -> set[str]:
        return {name for node in nodes for name in _node_inputs(node) if name in self._initializers}

    @property
    def spilled_bytes(self) -> int:
        return self._store.spilled

    def close(self) -> None:
        self._store.close()
