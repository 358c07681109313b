"""Validation of what onnxslim produced: onnx.checker, an onnxruntime run, the source's I/O contract; and
the `Validation` record that lets a command write a model the library already validated without
running it again."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxslim.errors import (
    DataError,
    ValidationError,
    first_line,
)
from onnxslim.runtime import session_options
from onnxslim.serialize import _check, loadable
from onnxslim.shapes import _declared_dims, graph_inputs, random_inputs

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
    """Check a model onnxslim produced: onnx.checker, an onnxruntime run (basic graph optimizations), and
    the source's I/O contract.

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
    # onnxruntime's basic graph optimizations (constant folding, redundant nodes): what decides whether a
    # model loads and runs. The layout rewrites of the higher levels only pick kernels, and on a 10k-node
    # model doubled the session's time and memory (1.24 s and 116 MB against 0.65 s and 60 MB).
    options = session_options(opt_level="basic")
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
