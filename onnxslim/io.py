"""Load, normalize, shape-infer, save and validate models: the one entry point every command uses.

This module reads and writes (external data, atomic staged writes, output paths) and re-exports the rest,
which lives by concern: `normalize.py` (the passes below), `shapes.py` (input shapes, shape inference,
random inputs), `validation.py` (`validate`, `Validation`), `serialize.py` (models past protobuf's 2 GiB).

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from onnxslim.errors import (
    ModelLoadError,
    OutputError,
    UnsupportedModelError,
    first_line,
)
from onnxslim.normalize import (
    NormalizationReport,
    WeightStorage,
    _constant_origins,
    _initializer_sizes,
    _weight_storage,
    normalize_model,
)
from onnxslim.serialize import _all_tensors, _copy, _is_large, loadable
from onnxslim.shapes import (
    TensorInfo,
    annotate_shapes,
    fix_input_shapes,
    graph_inputs,
    index_limits,
    infer_tensor_infos,
    parse_input_shapes,
    random_inputs,
    resolve_input_shapes,
)
from onnxslim.validation import Validation, original_fails_message, validate

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


def load_model(path: str | os.PathLike[str], *, normalize: bool = True) -> LoadedModel:
    """Read and (by default) normalize a model. Every command starts here."""
    path = Path(path)
    model, size = _read_model_and_size(path)
    if not normalize:
        storage = _weight_storage(_constant_origins(model.graph), _initializer_sizes(model.graph))
        return LoadedModel(model, path, size, NormalizationReport(storage), model.ir_version)
    normalized, report = normalize_model(model)
    return LoadedModel(normalized, path, size, report, model.ir_version)


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
        return self.add_bytes(text.encode(), path, sources=sources)

    def add_bytes(self, data: bytes, path: str | os.PathLike[str], *, sources: Iterable[str | os.PathLike[str]] = ()) -> Path:
        """Stage a file (a report, a plan, a plot) for `path`."""
        path = check_output_path(path, sources=sources)
        staged = self._staging_dir(path) / path.name
        try:
            staged.write_bytes(data)
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


def save_bytes(data: bytes, path: str | os.PathLike[str], *, sources: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Write a binary report file (a plot) atomically, with the same guards as models."""
    with staged_outputs() as stage:
        return stage.add_bytes(data, path, sources=sources)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()
