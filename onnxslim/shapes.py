"""Input shapes and tensor shapes: the model's inputs, `--input-shapes`, the analysis shapes (static dims,
batch 1), shape inference (onnx, then onnxruntime for what it leaves), and random inputs at given shapes."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxslim.errors import (
    UsageError,
    first_line,
)
from onnxslim.serialize import _copy, _infer_shapes, loadable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorInfo:
    """Static shape and element type of one tensor at the analysis input shapes."""

    shape: tuple[int, ...]
    elem_type: int

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type))


# ------------------------------------------------------------------------------------------ input shapes


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The model's real inputs: graph inputs that are not initializers."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _declared_dims(value: onnx.ValueInfoProto) -> list[int | str] | None:
    """Declared dims of an input: ints where static, the symbol (or '?') where not (dims <= 0 included);
    None if rank unknown."""
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    # a dim_value <= 0 is symbolic too: paddle2onnx writes a dynamic dim as dim_value -1
    return [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
        for d in tensor_type.shape.dim
    ]


def parse_input_shapes(specs: Sequence[str]) -> dict[str | None, tuple[int, ...]]:
    """Parse repeated `name:1,3,224,224` specs. A spec without a name applies to a single-input model."""
    shapes: dict[str | None, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims_text = spec.rpartition(":")
        key = name if sep else None
        try:
            dims = tuple(int(d) for d in dims_text.replace("x", ",").split(","))
        except ValueError as e:
            raise UsageError(
                f"--input-shapes {spec!r}: expected NAME:D1,D2,... with whole numbers, e.g. images:1,3,224,224"
            ) from e
        if any(d <= 0 for d in dims):
            raise UsageError(f"--input-shapes {spec!r}: every dimension must be a positive whole number")
        if key in shapes:
            raise UsageError(f"--input-shapes names {key or 'the input'!r} twice")
        shapes[key] = dims
    return shapes


def resolve_input_shapes(
    model: onnx.ModelProto, overrides: Mapping[str | None, Sequence[int]] | None = None
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every model input: overrides, else static dims, else batch 1 if only it is symbolic."""
    overrides = dict(overrides or {})
    inputs = graph_inputs(model)
    names = [i.name for i in inputs]
    if None in overrides:
        if len(inputs) != 1:
            raise UsageError(
                f"--input-shapes without a name works only for single-input models; this one has {names}: "
                "write NAME:D1,D2,..."
            )
        overrides[names[0]] = overrides.pop(None)
    unknown = [n for n in overrides if n not in names]
    if unknown:
        raise UsageError(f"--input-shapes names {unknown[0]!r}, which is not an input of the model; inputs: {names}")
    shapes: dict[str, tuple[int, ...]] = {}
    for value in inputs:
        declared = _declared_dims(value)
        if value.name in overrides:
            given = tuple(int(d) for d in overrides[value.name])
            if declared is not None and len(declared) != len(given):
                raise UsageError(
                    f"--input-shapes {value.name}: rank {len(given)} given, but the input has rank "
                    f"{len(declared)} ({_dims_text(declared)})"
                )
            for axis, (want, got) in enumerate(zip(declared or [], given, strict=False)):
                if isinstance(want, int) and want != got:
                    raise UsageError(
                        f"--input-shapes {value.name}: axis {axis} is fixed to {want} in the model, not {got}"
                    )
            shapes[value.name] = given
            continue
        if declared is None:
            raise UsageError(f"input {value.name!r} has no declared shape; give it with --input-shapes {value.name}:...")
        symbolic = [axis for axis, d in enumerate(declared) if not isinstance(d, int) or d <= 0]
        if symbolic and symbolic != [0]:
            raise UsageError(
                f"input {value.name!r} has symbolic dims ({_dims_text(declared)}); give concrete ones with "
                f"--input-shapes {value.name}:{','.join(str(d) if isinstance(d, int) and d > 0 else f'<{d}>' for d in declared)}"
            )
        shapes[value.name] = tuple(1 if axis in symbolic else int(d) for axis, d in enumerate(declared))
    return shapes


def _dims_text(dims: Sequence[int | str]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def fix_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy of `model` whose inputs have the given static shapes (used for analysis and --fix-shapes)."""
    model = _copy(model)
    for value in model.graph.input:
        if value.name in shapes:
            shape = value.type.tensor_type.shape
            del shape.dim[:]
            for d in shapes[value.name]:
                shape.dim.add().dim_value = int(d)
    return model


# ------------------------------------------------------------------------------------------ shape infos


def _static_info(value: onnx.ValueInfoProto) -> TensorInfo | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.elem_type or not tensor_type.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
    if any(d < 0 for d in dims):
        return None
    return TensorInfo(tuple(dims), tensor_type.elem_type)


def infer_tensor_infos(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, TensorInfo]:
    """Static shape and type of every tensor at `input_shapes`.

    onnx's shape inference first (with data propagation); where it leaves a tensor without a static shape
    (custom ops, shapes computed at run time), onnxruntime runs the model once on random inputs with those
    tensors exposed. Tensors neither can resolve are simply absent (analysis treats them as unknown).
    """
    fixed = fix_input_shapes(model, input_shapes)
    try:
        inferred = _infer_shapes(fixed)
    except Exception as e:  # noqa: BLE001 - onnx raises several types; the fallback below covers it
        logger.warning("onnx shape inference failed (%s); falling back to onnxruntime", first_line(e))
        inferred = fixed
    infos: dict[str, TensorInfo] = {}
    graph = inferred.graph
    for tensor in graph.initializer:
        infos[tensor.name] = TensorInfo(tuple(tensor.dims), tensor.data_type)
    for value in [*graph.input, *graph.value_info, *graph.output]:
        info = _static_info(value)
        if info is not None:
            infos.setdefault(value.name, info)
    missing = [o for n in graph.node for o in n.output if o and o not in infos]
    if missing:
        infos.update(_infos_from_onnxruntime(fixed, missing, input_shapes))
    return infos


def _infos_from_onnxruntime(
    model: onnx.ModelProto, names: list[str], input_shapes: Mapping[str, Sequence[int]]
) -> dict[str, TensorInfo]:
    import onnxruntime as ort

    probe = _copy(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in existing)
    try:
        with loadable(probe) as source:
            session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
        feeds = random_inputs(model, input_shapes)
        outputs = session.run(names, feeds)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        logger.warning("could not infer %d tensor shapes with onnxruntime either: %s", len(names), first_line(e))
        return {}
    infos = {}
    for name, value in zip(names, outputs, strict=True):
        if not isinstance(value, np.ndarray):  # a sequence (a list), a map or an empty optional: no tensor
            continue
        array = np.asarray(value)
        if array.dtype == object:
            continue
        infos[name] = TensorInfo(tuple(array.shape), onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
    return infos


def annotate_shapes(model: onnx.ModelProto, infos: Mapping[str, TensorInfo]) -> onnx.ModelProto:
    """A copy of `model` whose value_info holds the given static shapes (for graph-level analysis)."""
    model = _copy(model)
    graph = model.graph
    declared = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    del graph.value_info[:]
    for name, info in infos.items():
        if name not in declared:
            graph.value_info.append(onnx.helper.make_tensor_value_info(name, info.elem_type, list(info.shape)))
    return model


_RANDOM_INT_LIMIT = 4  # random integer inputs are drawn from [0, 4) unless they index a table (see below)
# Ops an integer input can go through and still be read as the same indices (token ids → Cast → Gather).
_INDEX_PRESERVING = frozenset({"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand"})


def index_limits(model: onnx.ModelProto) -> dict[str, int]:
    """Integer input → the size of the smallest constant table it indexes (a Gather's data along its axis).

    Token ids, token-type ids and position ids reach an embedding `Gather` directly or through a Cast or an
    Unsqueeze; random values past the table's size make onnxruntime fail, so `random_inputs` stays below it.
    """
    tables = {t.name: tuple(t.dims) for t in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    limits: dict[str, int] = {}
    for value in graph_inputs(model):
        if onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).kind not in "iu":
            continue
        found: list[int] = []
        frontier, seen = [value.name], {value.name}
        while frontier:
            tensor = frontier.pop()
            for node in readers.get(tensor, []):
                if node.op_type in ("Gather", "GatherElements") and list(node.input).index(tensor) == 1:
                    data = tables.get(node.input[0])
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    if data is not None and -len(data) <= axis < len(data) and data[axis] > 0:
                        found.append(int(data[axis]))
                elif node.op_type in _INDEX_PRESERVING and node.input[0] == tensor:
                    frontier += [o for o in node.output[:1] if o not in seen]
                    seen.update(node.output[:1])
        if found:
            limits[value.name] = min(found)
    return limits


def random_inputs(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]], seed: int = 0
) -> dict[str, np.ndarray]:
    """Random feeds for every model input at the given shapes: floats ~ N(0,1), bools random, integers in
    [0, 4) or, for an input that indexes a constant table (token ids), in [0, table size)."""
    rng = np.random.default_rng(seed)
    limits = index_limits(model)
    feeds = {}
    for value in graph_inputs(model):
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
        shape = tuple(input_shapes[value.name])
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[value.name] = rng.integers(0, limits.get(value.name, _RANDOM_INT_LIMIT), shape).astype(dtype)
    return feeds
