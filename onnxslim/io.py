"""Load, normalize, shape-infer, save and validate models: the one entry point every command uses.

Normalization gives later passes a single form without changing what the model computes:

* initializers are no longer listed as graph inputs (IR 3 exports list them; they are weights, not inputs);
* `Constant` nodes and subgraphs made only of constants (ConstantOfShape, Cast, Unsqueeze, Reshape,
  Identity ... of constants) are evaluated once and become initializers. Anything that depends on a graph
  input, including its shape (`Shape -> Gather -> Concat`), is left alone, so the saved model stays as
  dynamic as the input model. A constant subgraph that cannot be evaluated is an error, never skipped;
* the IR version is raised where the result needs it;
* unnamed (or duplicate-named) nodes get stable names: node names are the user's handle in `--exclude`,
  plans and reports.

Input shapes for analysis come from the model's static dims, from `--input-shapes name:1,3,224,224`, or
(batch only) default to 1; the saved model keeps symbolic dims unless asked to fix them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxslim.errors import (
    DataError,
    ModelLoadError,
    OutputError,
    UnsupportedModelError,
    UsageError,
    ValidationError,
    first_line,
)

__all__ = [
    "MIN_OPSET",
    "TensorInfo",
    "WeightStorage",
    "NormalizationReport",
    "LoadedModel",
    "read_model",
    "normalize_model",
    "load_model",
    "graph_inputs",
    "parse_input_shapes",
    "resolve_input_shapes",
    "fix_input_shapes",
    "infer_tensor_infos",
    "annotate_shapes",
    "index_limits",
    "random_inputs",
    "check_output_path",
    "OutputStage",
    "staged_outputs",
    "model_files",
    "loadable",
    "save_model",
    "save_text",
    "validate",
    "Validation",
    "original_fails_message",
    "write_validated",
]

logger = logging.getLogger(__name__)

MIN_OPSET = 7
_PROTOBUF_LIMIT = 2**31 - 1
_EXTERNAL_DATA_MARGIN = 64 * 2**20  # switch to external data well before protobuf's 2 GiB limit

# Ops that are never evaluated at load time even when all their inputs are constant: random ops (their
# value is not a constant) and quantization ops (folding them would dequantize the weights).
_NEVER_FOLD = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
    }
)


@dataclass(frozen=True)
class TensorInfo:
    """Static shape and element type of one tensor at the analysis input shapes."""

    shape: tuple[int, ...]
    elem_type: int

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type))


@dataclass(frozen=True)
class WeightStorage:
    """Where the model's constant tensors lived as loaded, before normalization (count, elements)."""

    initializers: tuple[int, int] = (0, 0)
    constant_nodes: tuple[int, int] = (0, 0)
    computed: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class NormalizationReport:
    """What normalization changed: weight storage as loaded, nodes folded and renamed, other notes."""

    storage: WeightStorage
    folded_nodes: int = 0
    renamed_nodes: int = 0
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoadedModel:
    """A model as every command sees it: normalized unless asked otherwise, with what that changed."""

    model: onnx.ModelProto
    path: Path
    size_bytes: int  # the model file plus the external data files it reads
    normalization: NormalizationReport
    source_ir_version: int  # the file's IR version (normalization may raise it)


# --------------------------------------------------------------------------------------------- reading


def read_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read a model file and its external data, refusing anything unsafe or malformed."""
    return _read_model_and_size(Path(path))[0]


def _read_model_and_size(path: Path) -> tuple[onnx.ModelProto, int]:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not an ONNX model file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: the file is empty")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise ModelLoadError(f"{path}: not a readable ONNX model (truncated or not protobuf): {e}") from e
    if not model.HasField("graph") or model.ir_version <= 0 or (not model.graph.node and not model.graph.output):
        raise ModelLoadError(f"{path}: does not look like an ONNX model (no graph or no IR version)")
    data_files = _load_external_data(model, path.parent.resolve(), path)
    _check_opsets(model, path)
    try:
        onnx.checker.check_model(str(path)) if _is_large(model) else onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ModelLoadError(f"{path}: the model is not valid ONNX: {first_line(e)}") from e
    return model, path.stat().st_size + sum(f.stat().st_size for f in data_files)


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in a graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_tensors(sub)


def _load_external_data(model: onnx.ModelProto, base_dir: Path, path: Path) -> set[Path]:
    """Read every external tensor into the model; return the data files read."""
    files: set[Path] = set()
    external = [t for t in _all_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = (base_dir / location).resolve()
        if not location or Path(location).is_absolute() or base_dir not in (target, *target.parents):
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} stores its data at {location!r}, outside the model's folder; "
                "refusing to read it"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} needs external data file {location!r}, which is missing "
                f"(expected at {target})"
            )
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
        size = target.stat().st_size
        if offset + (length or 0) > size:
            raise ModelLoadError(
                f"{path}: external data file {location!r} is too short for tensor {tensor.name!r} "
                "(truncated?)"
            )
        with open(target, "rb") as f:
            f.seek(offset)
            tensor.raw_data = f.read() if length is None else f.read(length)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
        files.add(target)
    return files


def _check_opsets(model: onnx.ModelProto, path: Path) -> None:
    opsets = {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}
    default = opsets.get("ai.onnx")
    newest = onnx.defs.onnx_opset_version()
    if default is None:
        raise UnsupportedModelError(f"{path}: the model imports no ai.onnx opset")
    if default < MIN_OPSET:
        raise UnsupportedModelError(
            f"{path}: opset {default} is too old; onnxslim supports ai.onnx opset {MIN_OPSET} to {newest}. "
            "Re-export the model with a newer opset, or convert it with onnx.version_converter."
        )
    if default > newest:
        raise UnsupportedModelError(
            f"{path}: opset {default} is newer than the installed onnx package supports ({newest}); "
            "upgrade onnx"
        )


# ----------------------------------------------------------------------------------------- normalizing


def normalize_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, NormalizationReport]:
    """Return a normalized copy of `model` (see the module docstring) and what was changed."""
    model = _copy(model)
    graph = model.graph
    origins = _constant_origins(graph)
    initializer_names = {t.name for t in graph.initializer}
    kept_inputs = [i for i in graph.input if i.name not in initializer_names]
    if len(kept_inputs) != len(graph.input):
        del graph.input[:]
        graph.input.extend(kept_inputs)
    renamed = _name_nodes(graph)
    folded = _fold_constants(model)
    _remove_unused_initializers(graph)
    storage = _weight_storage(origins, _initializer_sizes(graph))
    notes = []
    needed_ir = max(4, onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))
    if model.ir_version < needed_ir:
        notes.append(f"IR version raised from {model.ir_version} to {needed_ir}")
        model.ir_version = needed_ir
    return model, NormalizationReport(storage, folded, renamed, tuple(notes))


def load_model(path: str | os.PathLike[str], *, normalize: bool = True) -> LoadedModel:
    """Read and (by default) normalize a model. Every command starts here."""
    path = Path(path)
    model, size = _read_model_and_size(path)
    if not normalize:
        storage = _weight_storage(_constant_origins(model.graph), _initializer_sizes(model.graph))
        return LoadedModel(model, path, size, NormalizationReport(storage), model.ir_version)
    normalized, report = normalize_model(model)
    return LoadedModel(normalized, path, size, report, model.ir_version)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _name_nodes(graph: onnx.GraphProto) -> int:
    """Give every node a unique, stable name (op type and position); return how many were renamed."""
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or f"{node.op_type}_{index}"
        name, suffix = base, 1
        while name in seen:
            name, suffix = f"{base}_{suffix}", suffix + 1
        node.name = name
        seen.add(name)
        renamed += 1
    return renamed


def _subgraph_references(graph: onnx.GraphProto) -> set[str]:
    """Names that nodes inside subgraphs of `graph` read (possibly from the outer scope)."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                for inner in sub.node:
                    names.update(inner.input)
                names.update(o.name for o in sub.output)
                names |= _subgraph_references(sub)
    return names


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _is_foldable(node: onnx.NodeProto, constants: set[str], graph_outputs: set[str]) -> bool:
    return (
        node.domain in ("", "ai.onnx")
        and node.op_type not in _NEVER_FOLD
        and not _has_subgraph(node)
        and not any(o in graph_outputs for o in node.output)
        and all(i in constants for i in node.input if i)
    )


def _constant_subgraph(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes whose inputs are all constants, transitively (graph nodes are topologically sorted)."""
    constants = {t.name for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    foldable = []
    for node in graph.node:
        if _is_foldable(node, constants, graph_outputs):
            foldable.append(node)
            constants.update(o for o in node.output if o)
    return foldable


def _fold_constants(model: onnx.ModelProto) -> int:
    graph = model.graph
    foldable = _constant_subgraph(graph)
    if not foldable:
        return 0
    folded_ids = {id(n) for n in foldable}
    produced = {o for n in foldable for o in n.output if o}
    read_elsewhere = {i for n in graph.node if id(n) not in folded_ids for i in n.input}
    read_elsewhere |= _subgraph_references(graph)
    needed = [name for name in dict.fromkeys(o for n in foldable for o in n.output) if name in read_elsewhere]
    values = _evaluate(model, foldable, needed) if needed else {}
    kept = [n for n in graph.node if id(n) not in folded_ids]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(np.asarray(values[name]), name) for name in needed)
    # value_info entries of folded tensors now describe initializers; they are harmless but stale
    stale = [vi for vi in graph.value_info if vi.name in produced]
    for vi in stale:
        graph.value_info.remove(vi)
    return len(foldable)


def _evaluate(model: onnx.ModelProto, nodes: list[onnx.NodeProto], outputs: list[str]) -> dict[str, np.ndarray]:
    """Evaluate a constant subgraph with onnx's reference evaluator; fail loudly, naming the node."""
    read = {i for n in nodes for i in n.input if i}
    graph = onnx.helper.make_graph(
        list(nodes),
        "constant_subgraph",
        inputs=[],
        outputs=[onnx.helper.make_empty_tensor_value_info(name) for name in outputs],
        initializer=[t for t in model.graph.initializer if t.name in read],
    )
    sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        results = ReferenceEvaluator(sub).run(None, {})
    except Exception as e:  # noqa: BLE001 - the reference evaluator raises anything; we re-raise with context
        culprit = _first_failing_node(model, nodes)
        raise UnsupportedModelError(
            f"could not evaluate the constant subgraph feeding the model's weights"
            f"{culprit}: {type(e).__name__}: {first_line(e)}"
        ) from e
    return dict(zip(outputs, results, strict=True))


def _first_failing_node(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> str:
    """Re-run node by node to name the node that fails (only on the error path)."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in nodes:
        inputs = [onnx.helper.make_tensor_value_info(i, onnx.TensorProto.UNDEFINED, None) for i in node.input if i]
        sub_graph = onnx.helper.make_graph(
            [node], "one", inputs, [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o]
        )
        sub = onnx.helper.make_model(sub_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        try:
            results: list[Any] = ReferenceEvaluator(sub).run(None, {i: values[i] for i in node.input if i})  # type: ignore[assignment]
        except Exception:  # noqa: BLE001 - only used to locate the failure
            return f" (node {node.name!r}, {node.op_type})"
        values.update(zip([o for o in node.output if o], results, strict=False))
    return ""


def _remove_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output} | _subgraph_references(graph)
    kept = [t for t in graph.initializer if t.name in used]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


def _constant_origins(graph: onnx.GraphProto) -> dict[str, str]:
    """For each constant tensor a variable node reads: 'initializer', 'constant_node' or 'computed'."""
    foldable = _constant_subgraph(graph)
    folded_ids = {id(n) for n in foldable}
    read = {i for n in graph.node if id(n) not in folded_ids for i in n.input if i} | _subgraph_references(graph)
    origins = {t.name: "initializer" for t in graph.initializer if t.name in read}
    for node in foldable:
        kind = "constant_node" if node.op_type == "Constant" else "computed"
        origins.update({o: kind for o in node.output if o in read})
    return origins


def _weight_storage(origins: Mapping[str, str], sizes: Mapping[str, int]) -> WeightStorage:
    """Count and elements of the constant tensors by where they were stored."""

    def census(kind: str) -> tuple[int, int]:
        names = [name for name, origin in origins.items() if origin == kind]
        return len(names), sum(sizes.get(name, 0) for name in names)

    return WeightStorage(census("initializer"), census("constant_node"), census("computed"))


def _initializer_sizes(graph: onnx.GraphProto) -> dict[str, int]:
    return {t.name: int(np.prod(t.dims)) for t in graph.initializer}


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


# -------------------------------------------------------------------------------------------- saving


def _model_bytes(model: onnx.ModelProto) -> int:
    """Size of the model's tensors in bytes (ByteSize() is unusable past protobuf's limit)."""
    return sum(len(t.raw_data) or t.ByteSize() for t in _all_tensors(model.graph))


def _is_large(model: onnx.ModelProto) -> bool:
    """Too large to serialize in memory (protobuf's 2 GiB limit, with a margin)."""
    return _model_bytes(model) > _PROTOBUF_LIMIT - _EXTERNAL_DATA_MARGIN


@contextlib.contextmanager
def loadable(model: onnx.ModelProto) -> Iterator[bytes | str]:
    """What onnxruntime and onnx.checker can load: the serialized model, or, past protobuf's limit, the
    path of a temporary copy that keeps its weights in external data."""
    if not _is_large(model):
        yield model.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="onnxslim-") as scratch:
        path = Path(scratch) / "model.onnx"
        onnx.save_model(
            _copy(model), str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=1024
        )
        yield str(path)


def _check(model: onnx.ModelProto) -> None:
    """onnx.checker on a model of any size."""
    if not _is_large(model):
        onnx.checker.check_model(model)
        return
    with loadable(model) as path:
        onnx.checker.check_model(path)


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference (with data propagation) on a model of any size."""
    if not _is_large(model):
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    with loadable(model) as path, tempfile.TemporaryDirectory(prefix="onnxslim-") as scratch:
        inferred = Path(scratch) / "inferred.onnx"
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), check_type=False, strict_mode=False, data_prop=True)
        return onnx.load_model(str(inferred), load_external_data=False)


def model_files(source: str | os.PathLike[str]) -> list[Path]:
    """The model file and the external data files it reads, in that order (what makes up the model on disk)."""
    source = Path(source)
    files = [source]
    try:
        header = onnx.load_model(str(source), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError):
        return files
    for tensor in _all_tensors(header.graph):
        files += [source.parent / e.value for e in tensor.external_data if e.key == "location"]
    return list(dict.fromkeys(files))


def check_output_path(
    path: str | os.PathLike[str], *, sources: Iterable[str | os.PathLike[str]] = ()
) -> Path:
    """Refuse (OutputError, exit 2) an output path that would overwrite an input model or its external data,
    is a directory, lies in a folder that does not exist, or cannot be written (a file is created and removed
    beside it to find out: permission bits alone do not tell, e.g. for root or on a read-only mount).
    Commands call it for every output before any long work."""
    path = Path(path)
    for source in sources:
        for protected in model_files(source):  # no output may land on any of them
            if _same_file(path, protected):
                what = "the input model" if protected == Path(source) else f"the external data of the input model {source}"
                raise OutputError(f"refusing to overwrite {what} ({protected}); choose another output path")
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name for the output")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is a file, not a folder")
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {parent} does not exist")
    try:
        handle, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(handle)
        os.unlink(probe)
        if path.exists():
            with open(path, "ab"):
                pass
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
    return path


class OutputStage:
    """Outputs written beside their targets under temporary names, then renamed into place together by
    `commit`, so that a command with several outputs (a model and its plan) writes all of them or none."""

    def __init__(self) -> None:
        self._scratch = contextlib.ExitStack()
        self._moves: list[tuple[Path, Path]] = []  # (staged file, target), renamed in this order
        self._stale: list[Path] = []  # removed after the renames (an earlier model's external data)

    def _staging_dir(self, path: Path) -> Path:
        parent = path.parent if str(path.parent) else Path(".")
        try:
            return Path(self._scratch.enter_context(tempfile.TemporaryDirectory(dir=parent, prefix=f".{path.name}.")))
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from e

    def add_model(self, model: onnx.ModelProto, path: str | os.PathLike[str], *, source: str | os.PathLike[str] | None = None) -> Path:
        """Stage `model` for `path` (see `save_model`)."""
        path = check_output_path(path, sources=[source] if source is not None else [])
        parent = path.parent if str(path.parent) else Path(".")
        staging = self._staging_dir(path)
        staged = staging / path.name
        self._stale += parent.glob(f"{path.name}.*.data")  # an earlier output's weights: replaced or unused
        try:
            if _is_large(model):
                data_name = f"{path.name}.{uuid.uuid4().hex[:8]}.data"
                onnx.save_model(
                    _copy(model), str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024,
                )
                self._moves.append((staging / data_name, parent / data_name))
            else:
                with open(staged, "wb") as f:
                    f.write(model.SerializeToString())
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
        self._moves.append((staged, path))
        return path

    def add_text(self, text: str, path: str | os.PathLike[str], *, sources: Iterable[str | os.PathLike[str]] = ()) -> Path:
        """Stage a report or plan file for `path`."""
        path = check_output_path(path, sources=sources)
        staged = self._staging_dir(path) / path.name
        try:
            staged.write_text(text)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from e
        self._moves.append((staged, path))
        return path

    def commit(self) -> None:
        """Rename every staged file into place (renames within a folder are atomic), then drop stale data."""
        for staged, target in self._moves:
            try:
                os.replace(staged, target)
            except OSError as e:
                raise OutputError(f"cannot write {target}: {e.strerror or e}") from e
        self._moves.clear()
        for stale in self._stale:
            stale.unlink(missing_ok=True)

    def close(self) -> None:
        """Remove whatever was staged and not committed."""
        self._scratch.close()


@contextlib.contextmanager
def staged_outputs() -> Iterator[OutputStage]:
    """An `OutputStage` committed when the block succeeds; on any error nothing is written."""
    stage = OutputStage()
    try:
        yield stage
        stage.commit()
    finally:
        stage.close()


def save_model(
    model: onnx.ModelProto, path: str | os.PathLike[str], *, source: str | os.PathLike[str] | None = None
) -> Path:
    """Write `model` atomically; never onto `source` or its external data.

    Past ~2 GB the weights go to `<name>.<token>.data` beside the model: a fresh name each time, so the model
    and its data are replaced together by the model's rename (an earlier `<name>.*.data` is removed after).
    """
    with staged_outputs() as stage:
        return stage.add_model(model, path, source=source)


def write_validated(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    source: str | os.PathLike[str],
    input_shapes: Mapping[str, Sequence[int]],
    feeds: Mapping[str, np.ndarray] | None = None,
    stage: OutputStage | None = None,
    validated: Validation | None = None,
) -> Path:
    """Validate `model` against the input *file* as given (so normalization is checked too), then save it
    (or stage it in `stage`, to be written with a command's other outputs).

    The one way commands write models: a failure is a ValidationError (exit 4) and nothing is written.
    `feeds`: a batch of the user's data to validate on (else random inputs). `validated`: the record of a
    validation the library already ran (`PruneResult.validation`); when it covers this very model at these
    shapes and feeds, against a source whose I/O contract is the input file's, onnxruntime is not run again.
    """
    original = read_model(source)
    if validated is not None and validated.covers(model, original, input_shapes, feeds):
        logger.debug("%s: validated by the library already (same model, contract, shapes and inputs)", path)
    else:
        validate(model, original, input_shapes, feeds=feeds)
    if stage is not None:
        return stage.add_model(model, path, source=source)
    return save_model(model, path, source=source)


def save_text(text: str, path: str | os.PathLike[str], *, sources: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Write a report file atomically, with the same guards as models."""
    with staged_outputs() as stage:
        return stage.add_text(text, path, sources=sources)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


# ------------------------------------------------------------------------------------------ validation


def _contract(model: onnx.ModelProto) -> tuple[list[tuple[str, int]], list[tuple[str, int, tuple]]]:
    inputs = [(i.name, i.type.tensor_type.elem_type) for i in graph_inputs(model)]
    outputs = [
        (o.name, o.type.tensor_type.elem_type, tuple(_declared_dims(o) or ()))
        for o in model.graph.output
    ]
    return inputs, outputs


_Contract = tuple[list[tuple[str, int]], list[tuple[str, int, tuple]]]


def _feeds_signature(feeds: Mapping[str, np.ndarray] | None) -> tuple[tuple[str, str, tuple[int, ...]], ...] | None:
    if feeds is None:
        return None
    return tuple(sorted((name, str(np.asarray(a).dtype), tuple(np.shape(a))) for name, a in feeds.items()))


@dataclass(frozen=True)
class Validation:
    """What one `validate` call proved: this `model` object passed, against a source with this I/O
    `contract`, at these input shapes, on given feeds of this signature (None: random inputs). A model
    edited afterwards no longer matches (its serialized size is compared too); `write_validated` only skips
    a run that would check exactly the same thing."""

    model: onnx.ModelProto = field(repr=False, compare=False)
    size: int
    contract: _Contract
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    feeds: tuple[tuple[str, str, tuple[int, ...]], ...] | None

    def covers(
        self,
        model: onnx.ModelProto,
        source: onnx.ModelProto,
        input_shapes: Mapping[str, Sequence[int]],
        feeds: Mapping[str, np.ndarray] | None = None,
    ) -> bool:
        """Whether validating `model` against `source` at these shapes and feeds would repeat this check."""
        return (
            self.model is model
            and self.size == model.ByteSize()
            and self.contract == _contract(source)
            and self.input_shapes == _shapes_key(input_shapes)
            and self.feeds == _feeds_signature(feeds)
        )


def _shapes_key(input_shapes: Mapping[str, Sequence[int]]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(sorted((str(name), tuple(int(d) for d in dims)) for name, dims in input_shapes.items()))


def validate(
    candidate: onnx.ModelProto,
    source: onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]],
    *,
    feeds: Mapping[str, np.ndarray] | None = None,
    expected_shapes: Mapping[str, Sequence[int]] | None = None,
) -> Validation:
    """Check a model onnxslim produced: onnx.checker, an onnxruntime run, and the source's I/O contract.

    The run uses `feeds` (a batch of the user's data) when given, else `random_inputs`. Raises
    ValidationError (exit 4, nothing written) when the candidate fails, but DataError (exit 1) when the
    *source* does not run on those inputs either: then the inputs are at fault, not onnxslim.
    `expected_shapes` (output name → shape): the source's output shapes on these inputs when the caller
    already knows them (the pruner's shape analysis); the source is then run only when the candidate fails
    or disagrees, to tell whose fault it is, which saves one onnxruntime session (the costliest part on big
    graphs). Returns the record of what passed (`write_validated` accepts it instead of validating again).
    """
    import onnxruntime as ort

    try:
        _check(candidate)
    except onnx.checker.ValidationError as e:
        raise ValidationError(f"the optimized model fails onnx.checker: {first_line(e)}") from e
    want_inputs, want_outputs = _contract(source)
    got_inputs, got_outputs = _contract(candidate)
    if want_inputs != got_inputs:
        raise ValidationError(f"inputs changed from {want_inputs} to {got_inputs}")
    if want_outputs != got_outputs:
        raise ValidationError(f"outputs changed from {want_outputs} to {got_outputs}")
    given = feeds is not None
    signature = _feeds_signature(feeds)
    feeds = dict(feeds) if feeds is not None else random_inputs(source, input_shapes)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures are reported below, in one line, not as onnxruntime's log

    def run_source() -> list[Any]:
        try:
            with loadable(source) as loaded:
                return list(ort.InferenceSession(loaded, options, providers=["CPUExecutionProvider"]).run(None, feeds))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise DataError(original_fails_message(feeds, e, given=given)) from e

    names = [name for name, _, _ in want_outputs]
    known = expected_shapes is not None and all(name in expected_shapes for name in names)
    want_shapes = [tuple(expected_shapes[name]) for name in names] if expected_shapes is not None and known else None
    if want_shapes is None:
        want_shapes = [np.shape(a) for a in run_source()]
    try:
        with loadable(candidate) as loaded:
            got = ort.InferenceSession(loaded, options, providers=["CPUExecutionProvider"]).run(None, feeds)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        if known:
            run_source()  # a DataError when the inputs are at fault, not the candidate
        raise ValidationError(f"the optimized model does not run in onnxruntime: {first_line(e)}") from e
    if known and any(tuple(np.shape(b)) != tuple(a) for a, b in zip(want_shapes, got, strict=True)):
        want_shapes = [np.shape(a) for a in run_source()]  # the analysis may be wrong: ask the source itself
    for name, a, b in zip(names, want_shapes, got, strict=True):
        if tuple(a) != tuple(np.shape(b)):
            raise ValidationError(f"output {name!r} has shape {np.shape(b)}, the original {tuple(a)}")
    return Validation(
        candidate, candidate.ByteSize(), (want_inputs, want_outputs), _shapes_key(input_shapes), signature
    )


def original_fails_message(feeds: Mapping[str, np.ndarray], error: BaseException, *, given: bool) -> str:
    """Why a check could not run: the *original* model fails on the inputs it was given (one line)."""
    shapes = ", ".join(f"{name} {a.dtype} {list(a.shape)}" for name, a in feeds.items())
    if given:
        return f"the original model does not run on the data given ({shapes}): {first_line(error)}"
    integers = [name for name, a in feeds.items() if a.dtype.kind in "iu"]
    hint = (
        f" (integer inputs {', '.join(integers)} were drawn from a small range; token or class ids may need others)"
        if integers else ""
    )
    return (
        f"the original model does not run on random inputs ({shapes}){hint}: {first_line(error)}. "
        "Give real inputs: --calib DATA for quantize, --data DATA for bench (a .npz with one array per input)"
    )
