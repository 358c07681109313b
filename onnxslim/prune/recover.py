"""Retraining-free recovery: refit the layers that read pruned channels so the pruned model works without them.

Every Conv, Gemm and MatMul with constant weights downstream of a change (reading a channel group, pruned
or not, or past a blocker: it corrects error from upstream too), the depthwise convs that pass a pruned
group through, and the input projection of an LSTM, GRU or RNN op (W and Wb; R and Rb stay) is a *refit
node*. Refit nodes are visited in topological order. For each, its input is taken from the model *as
pruned and refit so far* and its target is the *original* model's output at that node (the kept output
channels of it; past the bias Add of a MatMul; for a recurrent op, the original's W x + Wb computed from
the original's input): sequential refits, measured to beat refits from the original's inputs
(docs/ARCHITECTURE.md, "Recovery"). A Gemm/MatMul whose output (past its bias Add) joins a skip path at a
residual Add is aimed at the original's sum instead, less the skip path as pruned and refit so far: the
residual stream of a transformer has no layer of its own to refit, so the error it carries from upstream is
made up for by the projections that write into it (`RecoverOptions.through_skips`). Activations are passed forward range by range
(`activations.StagedRunner`), so the whole model is run about once per model, not once per layer. Where the
staged runner cannot go on (its limit: a sequence kept between ranges, a range onnxruntime refuses alone),
each remaining layer's input and target come from runs of the whole model instead — slower, the same
numbers — with a warning, and the layers' notes say so.

**Shared weights.** A weight read by several nodes (an unrolled recurrence reads its weights at every time
step) is refit once: its readers are one *unit*, one least-squares problem whose rows are every reader's
samples, their inputs from one whole-model run of the model as refit so far (the staged runner stands at
the first reader), the result written once and read by all of them. The rewrite gives every reader of a
sliced shared weight a copy of its own: readers holding equal copies are one unit again (even when
nothing is refit, they are tied to one tensor); readers sliced differently stay apart; when a reader of
the weight is not refit at all, none is. A weight is never split into a copy per reader.

**Where the samples are.** Conv reads NCHW: samples on axis 0. Gemm, MatMul and recurrent ops may read a
time-major [T, N, C], a Reshape of it to [T·N, C], or with a batch of one a tensor without a batch axis;
one probe per model (the first batch run as it is and with sample 0 replaced by another: the entries that
change are sample 0's) finds each such tensor's sample axis, so every time step is a row and the held-out
rows are held-out samples. Token positions of a text model are rows too, except padding: when the model
has an input named `RecoverOptions.token_mask` ("attention_mask", [batch, tokens], 0 = padding), a
Gemm/MatMul over [batch, tokens, features] takes its rows from the tokens only.

The least-squares problem of a node is accumulated as Gram matrices over the calibration batches —
[AᵀA, Aᵀy] with A the node's input features plus a column of ones (its bias) — so memory is the square of
the node's input features, never the number of samples. k×k convs are unfolded into patches at output
positions sampled per sample (`positions_per_weight` rows per input feature in all, honouring pads,
strides, dilations and groups; a grouped conv is one problem per group). Methods:

- `none`: nothing changes (the masked-model oracle holds exactly).
- `bias`: the mean of the residual (original output − pruned output) goes into the bias; when nothing
  upstream changed, that is Σ_removed W[:, c]·E[x_c], exact for constant channels.
- `affine`: each output channel's mean and variance are matched to the original's (a scale folded into its
  weights, a shift into its bias).
- `lsq`: ridge least squares for the kept weights and bias. The ridge of each input feature is `ridge`
  times that feature's own energy (diag AᵀA: scale-invariant) and shrinks toward the *original* weights of
  the kept inputs rather than toward zero (docs/ARCHITECTURE.md, "Recovery": toward zero collapsed a real recognizer).

Guard: every fifth calibration sample (by index) is held out of the fit; a node whose refit is worse on
the held-out samples than leaving it alone falls back to `bias` (or to `none` when that is worse too),
and the report says so. Nodes without a bias slot (a MatMul not followed by a constant Add) are refit
without an intercept and cannot use `bias` or `affine`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxslim.activations import StagedRunner, with_outputs
from onnxslim.errors import DataError, StagedRunError, UsageError, ValidationError, first_line
from onnxslim.evaluate import HOLDOUT_EVERY  # sample i is held out of the fit when i % 5 == 4
from onnxslim.graph import ProtoIndex
from onnxslim.progress import Progress
from onnxslim.runtime import cpu_session, session_options

__all__ = [
    "RECOVERY_METHODS",
    "REFIT_OPS",
    "RecoverOptions",
    "NodeRecovery",
    "RecoveryReport",
    "recover_model",
    "unfold_patches",
]

logger = logging.getLogger(__name__)

RECOVERY_METHODS = ("none", "bias", "affine", "lsq")

UNCHANGED = 1e-6  # a layer whose relative error before recovery is below this is left alone
_CHUNK_ROWS = 4096  # sampled rows gathered across batches before they are added to the Gram matrices
_REBATCH_ROWS = 32  # with a free batch dim, calibration samples run through the stages 32 at a time
_PROBE_SAMPLES = 4  # with a free batch dim, where the samples lie is probed on the first 4
_RIDGE_FACTORS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)  # lsq tries these multiples of the ridge and keeps the best on held-out samples


@dataclass(frozen=True)
class RecoverOptions:
    """How recovery refits: the method, the ridge (relative to each input's energy), how many sampled rows
    per input feature, the memory the forward pass may hold before spilling to disk, and the seed."""

    method: str = "lsq"
    ridge: float = 3e-2
    positions_per_weight: int = 8
    memory_budget: int = 1 << 30
    seed: int = 0
    sequential: bool = True  # False: inputs from the original model (kept channels), for comparison only
    # a graph input [batch, tokens] whose zeros mark padding (as tokenizers name it): padded token positions
    # are not rows of a Gemm/MatMul refit over [batch, tokens, features]; ignored when the model has no such input
    token_mask: str | None = "attention_mask"
    # a Gemm/MatMul whose output joins a skip path at a residual Add is aimed at the sum (the original's),
    # so it makes up for the error the skip path carries from upstream too; False: at its own output
    through_skips: bool = True

    def __post_init__(self) -> None:
        if self.method not in RECOVERY_METHODS:
            raise UsageError(f"unknown recovery {self.method!r}; choose one of {', '.join(RECOVERY_METHODS)}")
        if not self.ridge >= 0:
            raise UsageError(f"--ridge must be at least 0, not {self.ridge}")
        if self.positions_per_weight < 1:
            raise UsageError(f"--positions-per-weight must be at least 1, not {self.positions_per_weight}")


@dataclass(frozen=True)
class NodeRecovery:
    """What recovery did to one node: the method used (and asked for), and the relative squared error of its
    output against the original's on held-out calibration samples before (pruned as is) and after."""

    node: str
    op_type: str
    method: str
    requested: str
    error_before: float
    error_after: float
    note: str = ""


@dataclass(frozen=True)
class RecoveryReport:
    """Recovery of a whole model: per node, plus the time it took and the data it used."""

    method: str
    nodes: tuple[NodeRecovery, ...]
    seconds: float
    samples: int
    held_out: int
    spilled_bytes: int = 0

    @property
    def fallbacks(self) -> int:
        return sum(node.method != node.requested for node in self.nodes)


# ------------------------------------------------------------------------------------------ unfolding


def _conv_geometry(conv: onnx.NodeProto, spatial: Sequence[int], kernel: Sequence[int]) -> tuple[list[int], list[int], list[int], list[int]]:
    """Pads (begin, end), strides and dilations of a Conv over input spatial dims `spatial`."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    rank = len(kernel)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
    elif auto_pad == "VALID":
        begin, end = [0] * rank, [0] * rank
    else:
        pads = list(attrs.get("pads", [0] * 2 * rank))
        begin, end = pads[:rank], pads[rank:]
    return begin, end, strides, dilations


def unfold_patches(
    x: np.ndarray,
    conv: onnx.NodeProto,
    kernel: Sequence[int],
    samples: np.ndarray,
    positions: np.ndarray,
) -> np.ndarray:
    """The input patches a Conv reads to compute output positions `positions` (flat indices into its output
    spatial dims) of samples `samples`: [rows, C_in, *kernel]. Zero padding, strides and dilations as the
    node's attributes (or auto_pad) say."""
    spatial = x.shape[2:]
    begin, end, strides, dilations = _conv_geometry(conv, spatial, kernel)
    padded = np.pad(x, [(0, 0), (0, 0), *zip(begin, end, strict=True)])
    out = [
        (padded.shape[2 + i] - ((kernel[i] - 1) * dilations[i] + 1)) // strides[i] + 1 for i in range(len(kernel))
    ]
    coordinates = np.unravel_index(positions, out)
    rank = len(kernel)
    index: list[np.ndarray] = [samples.reshape(-1, 1, *([1] * rank)), np.arange(x.shape[1]).reshape(1, -1, *([1] * rank))]
    for axis in range(rank):
        shape = [1] * rank
        shape[axis] = kernel[axis]
        taps = np.arange(kernel[axis]).reshape(shape) * dilations[axis]
        start = (coordinates[axis] * strides[axis]).reshape(-1, 1, *([1] * rank))
        index.append(start + taps.reshape(1, 1, *shape))
    return padded[tuple(index)]


# ----------------------------------------------------------------------------------- linear layers


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _Layer:
    """A refit node seen as G independent linear maps y_g = A_g W_g + b_g (one per conv group)."""

    def __init__(self, node: onnx.NodeProto, model: _ModelEditor) -> None:
        self.node = node
        self.model = model

    blocks: int = 1
    has_bias_slot: bool = True

    def rows(
        self, x: np.ndarray, y: np.ndarray, kept_out: np.ndarray | None, rng: np.random.Generator, per_sample: int,
        valid: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features [rows, G, K], targets [rows, G, O] and the sample index of every row (`valid`: the token
        mask [samples, tokens], read by the layers over token features)."""
        raise NotImplementedError

    def features(self) -> int:
        raise NotImplementedError

    def get(self) -> tuple[np.ndarray, np.ndarray]:
        """Current weights [G, K, O] and bias [G, O] (zeros when the node has none)."""
        raise NotImplementedError

    def set(self, weights: np.ndarray, bias: np.ndarray) -> None:
        raise NotImplementedError

    def target_node(self) -> onnx.NodeProto:
        """The node whose output (in the original) the refit reproduces: the one that adds the bias."""
        return self.node

    samples_first: bool = False  # the input's and output's first axis is the batch (NCHW), no probe needed

    def target_tensor(self, original: onnx.NodeProto) -> str:
        """The tensor of the original that the refit reproduces, given the original's `target_node()`."""
        return original.output[0]

    def aim(self, original: _ModelEditor) -> None:
        """Read what the targets need from the original model (a layer whose target is computed)."""

    def skip_join(self) -> tuple[onnx.NodeProto, str] | None:
        """The residual Add that alone reads this layer's target, and its other operand (the skip path, a
        computed tensor), or None. Recovery then aims at the sum: the skip path carries the upstream error
        that no layer on it can refit (a transformer's residual stream has none), and only the layer whose
        output joins it can make up for it."""
        output = self.target_node().output[0]
        readers = self.model.index.consumers(output)
        if len(readers) != 1 or readers[0].op_type != "Add" or output in self.model.outputs:
            return None
        join = readers[0]
        skip = join.input[1] if join.input[0] == output else join.input[0]
        if skip == output or self.model.constant(skip) is not None:
            return None
        return join, skip

    def bias_name(self) -> str:
        """The constant holding the bias ("" when there is none)."""
        return self.node.input[2] if len(self.node.input) > 2 else ""

    def layout(self) -> tuple[object, ...]:
        """What readers of one weight must agree on to be refit as one linear map."""
        return (self.node.op_type,)

    def same_constants(self, others: Sequence[_Layer]) -> bool:
        """Whether `others` hold the same weight and bias values as this layer."""
        weights, bias = self.get()
        return all(
            np.array_equal(weights, w) and np.array_equal(bias, b) for w, b in (other.get() for other in others)
        )

    def share_from(self, other: _Layer) -> None:
        """Read the weight and bias constants that `other` (a reader of the same weight) was just given."""
        while len(self.node.input) < len(other.node.input):
            self.node.input.append("")
        self.node.input[1:3] = other.node.input[1:3]


class _ModelEditor:
    """Reads and replaces constant inputs of nodes of a model being recovered."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.initializers = {t.name: t for t in model.graph.initializer}
        self._arrays: dict[str, np.ndarray | None] = {}
        self.index = ProtoIndex(model.graph)  # the topology never changes: refits only add constants
        self._names = itertools.count()
        self.outputs = {o.name for o in model.graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        """The initializer `name` as an array (converted once: `set_input` never changes one, it adds new)."""
        if name not in self._arrays:
            tensor = self.initializers.get(name)
            self._arrays[name] = None if tensor is None else numpy_helper.to_array(tensor)
        return self._arrays[name]

    def set_input(self, node: onnx.NodeProto, index: int, values: np.ndarray) -> None:
        """Give `node` a new constant as input `index` (never changes a constant other nodes read)."""
        base = node.input[index] if index < len(node.input) and node.input[index] else f"{node.name}_input{index}"
        name = f"{base}_recovered{next(self._names)}"
        tensor = numpy_helper.from_array(np.ascontiguousarray(values), name)
        self.model.graph.initializer.append(tensor)
        self.initializers[name] = tensor
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name

    def drop_unused(self) -> None:
        used = {name for node in self.model.graph.node for name in node.input}
        used |= {o.name for o in self.model.graph.output}
        keep = [t for t in self.model.graph.initializer if t.name in used]
        del self.model.graph.initializer[:]
        self.model.graph.initializer.extend(keep)


def _sample_positions(
    rng: np.random.Generator, samples: int, total: int, per_sample: int, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(sample index, flat position) pairs: `per_sample` distinct positions of each sample (all if fewer);
    with `valid` [samples, total], only among the valid positions (tokens that are not padding)."""
    if valid is not None:
        chosen = []
        for sample in range(samples):
            where = np.flatnonzero(valid[sample])
            chosen.append(where if per_sample >= len(where) else np.sort(rng.choice(where, per_sample, replace=False)))
        counts = [len(c) for c in chosen]
        return np.repeat(np.arange(samples), counts), np.concatenate(chosen).astype(np.int64)
    if per_sample >= total:
        return np.repeat(np.arange(samples), total), np.tile(np.arange(total), samples)
    positions = np.stack([rng.choice(total, per_sample, replace=False) for _ in range(samples)])
    return np.repeat(np.arange(samples), per_sample), positions.reshape(-1)


def _feature_rows(
    x: np.ndarray, y: np.ndarray, kept_out: np.ndarray | None, rng: np.random.Generator, per_sample: int,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a layer that reads features on the last axis, from x [N, ..., K] and y [N, ..., O] (samples
    first): `per_sample` sampled positions (time steps, tokens) of each sample; with `valid` [N, positions]
    (the token mask), only positions that are not padding."""
    if kept_out is not None:
        y = y[..., kept_out]
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    y3 = y.reshape(y.shape[0], -1, y.shape[-1])
    if valid is not None and valid.shape != x3.shape[:2]:
        valid = None
    samples, positions = _sample_positions(rng, x3.shape[0], x3.shape[1], per_sample, valid)
    return x3[samples, positions][:, None, :], y3[samples, positions][:, None, :], samples


class _Conv(_Layer):
    def __init__(self, node: onnx.NodeProto, model: _ModelEditor) -> None:
        super().__init__(node, model)
        weight = model.constant(node.input[1])
        assert weight is not None
        self.weight_shape = weight.shape
        self.blocks = int(_attrs(node).get("group", 1))  # type: ignore[call-overload]
        self.kernel = list(weight.shape[2:])

    samples_first = True

    def layout(self) -> tuple[object, ...]:
        return ("Conv", self.blocks)

    def features(self) -> int:
        return int(np.prod(self.weight_shape[1:]))

    def rows(self, x, y, kept_out, rng, per_sample, valid=None):
        out_shape = y.shape[2:]
        total = int(np.prod(out_shape))
        samples, positions = _sample_positions(rng, x.shape[0], total, per_sample)
        patches = unfold_patches(x, self.node, self.kernel, samples, positions)  # [rows, C_in, *k]
        rows = len(samples)
        features = patches.reshape(rows, self.blocks, -1)
        if kept_out is not None:
            y = y[:, kept_out]
        targets = y.reshape(y.shape[0], y.shape[1], -1)[samples, :, positions]  # [rows, C_out]
        return features, targets.reshape(rows, self.blocks, -1), samples

    def get(self) -> tuple[np.ndarray, np.ndarray]:
        weight = self.model.constant(self.node.input[1])
        assert weight is not None
        out = weight.shape[0] // self.blocks
        weights = weight.reshape(self.blocks, out, -1).transpose(0, 2, 1)
        bias = self.model.constant(self.node.input[2]) if len(self.node.input) > 2 and self.node.input[2] else None
        bias = np.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias
        return weights.astype(np.float64), bias.reshape(self.blocks, out).astype(np.float64)

    def set(self, weights: np.ndarray, bias: np.ndarray) -> None:
        dtype = np.float32
        weight = weights.transpose(0, 2, 1).reshape(self.weight_shape).astype(dtype)
        self.model.set_input(self.node, 1, weight)
        self.model.set_input(self.node, 2, bias.reshape(-1).astype(dtype))


class _Gemm(_Layer):
    def __init__(self, node: onnx.NodeProto, model: _ModelEditor) -> None:
        super().__init__(node, model)
        attrs = _attrs(node)
        self.trans_b = int(attrs.get("transB", 0))  # type: ignore[call-overload]
        self.alpha = float(attrs.get("alpha", 1.0))  # type: ignore[arg-type]
        self.beta = float(attrs.get("beta", 1.0))  # type: ignore[arg-type]

    def features(self) -> int:
        weight = self.model.constant(self.node.input[1])
        assert weight is not None
        return int(weight.shape[0 if not self.trans_b else 1])

    def layout(self) -> tuple[object, ...]:
        return ("Gemm", self.trans_b, self.alpha, self.beta)

    def rows(self, x, y, kept_out, rng, per_sample, valid=None):
        return _feature_rows(x, y, kept_out, rng, per_sample, valid)

    def share_from(self, other: _Layer) -> None:
        super().share_from(other)
        beta = next((a.f for a in other.node.attribute if a.name == "beta"), None)
        for attribute in self.node.attribute:
            if attribute.name == "beta" and beta is not None:  # set() makes a beta of 0 into 1 with the new bias
                attribute.f = beta

    def get(self) -> tuple[np.ndarray, np.ndarray]:
        weight = self.model.constant(self.node.input[1])
        assert weight is not None
        weights = (weight.T if self.trans_b else weight).astype(np.float64) * self.alpha
        bias = np.zeros(weights.shape[1])
        if len(self.node.input) > 2 and self.node.input[2]:
            constant = self.model.constant(self.node.input[2])
            assert constant is not None
            bias = np.broadcast_to(constant.astype(np.float64) * self.beta, (weights.shape[1],)).copy()
        return weights[None], bias[None]

    def set(self, weights: np.ndarray, bias: np.ndarray) -> None:
        weight = weights[0] / self.alpha
        self.model.set_input(self.node, 1, (weight.T if self.trans_b else weight).astype(np.float32))
        beta = self.beta if self.beta != 0 else 1.0
        if self.beta == 0:
            for attribute in self.node.attribute:
                if attribute.name == "beta":
                    attribute.f = 1.0
        self.model.set_input(self.node, 2, (bias[0] / beta).astype(np.float32))


class _MatMul(_Layer):
    def __init__(self, node: onnx.NodeProto, model: _ModelEditor) -> None:
        super().__init__(node, model)
        self.add, self.add_index = self._bias_add()
        self.has_bias_slot = self.add is not None

    def _bias_add(self) -> tuple[onnx.NodeProto | None, int]:
        """The Add after this MatMul whose other operand is a constant per output feature (its bias)."""
        output = self.node.output[0]
        readers = self.model.index.consumers(output)
        if len(readers) != 1 or readers[0].op_type != "Add" or output in self.model.outputs:
            return None, 0
        add = readers[0]
        other = 1 if add.input[0] == output else 0
        constant = self.model.constant(add.input[other])
        columns = self.features_out()
        if constant is None or constant.size != columns or constant.shape[-1] != columns:
            return None, 0
        return add, other

    def target_node(self) -> onnx.NodeProto:
        return self.add if self.add is not None else self.node  # the bias is fit: aim past its Add

    def features_out(self) -> int:
        weight = self.model.constant(self.node.input[1])
        assert weight is not None
        return int(weight.shape[1])

    def features(self) -> int:
        weight = self.model.constant(self.node.input[1])
        assert weight is not None
        return int(weight.shape[0])

    def rows(self, x, y, kept_out, rng, per_sample, valid=None):
        return _feature_rows(x, y, kept_out, rng, per_sample, valid)

    def bias_name(self) -> str:
        return self.add.input[self.add_index] if self.add is not None else ""

    def share_from(self, other: _Layer) -> None:
        assert isinstance(other, _MatMul)
        self.node.input[1] = other.node.input[1]
        if self.add is not None and other.add is not None:
            self.add.input[self.add_index] = other.add.input[other.add_index]

    def get(self) -> tuple[np.ndarray, np.ndarray]:
        weight = self.model.constant(self.node.input[1])
        assert weight is not None
        bias = np.zeros(weight.shape[1])
        if self.add is not None:
            constant = self.model.constant(self.add.input[self.add_index])
            assert constant is not None
            bias = constant.reshape(-1).astype(np.float64)
        return weight.astype(np.float64)[None], bias[None]

    def set(self, weights: np.ndarray, bias: np.ndarray) -> None:
        self.model.set_input(self.node, 1, weights[0].astype(np.float32))
        if self.add is not None:
            shape = self.model.constant(self.add.input[self.add_index]).shape  # type: ignore[union-attr]
            self.model.set_input(self.add, self.add_index, bias[0].reshape(shape).astype(np.float32))


class _Recurrent(_Layer):
    """The input projection of an LSTM, GRU or RNN: each direction's gates get W x_t + Wb at every step,
    a linear map refit with the time steps of every sample as rows. The target is the original's projection
    of the original's input (W and Wb of the original); the recurrent weights R and Rb stay as they are."""

    def __init__(self, node: onnx.NodeProto, model: _ModelEditor) -> None:
        super().__init__(node, model)
        weight = model.constant(node.input[1])
        assert weight is not None
        self.blocks = int(weight.shape[0])  # directions
        self.reference: tuple[np.ndarray, np.ndarray] | None = None

    def layout(self) -> tuple[object, ...]:
        return (self.node.op_type, tuple(sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in self.node.attribute)))

    def target_tensor(self, original: onnx.NodeProto) -> str:
        return original.input[0]  # the gates' input projection is computed from the original's input

    def skip_join(self) -> tuple[onnx.NodeProto, str] | None:
        return None  # the target is the gates' projection, which no Add reads

    def aim(self, original: _ModelEditor) -> None:
        aimed = refit_layer(original.index.nodes[self.node.name], original)
        assert aimed is not None
        self.reference = aimed.get()

    def features(self) -> int:
        weight = self.model.constant(self.node.input[1])
        assert weight is not None
        return int(weight.shape[2])

    def bias_name(self) -> str:
        return self.node.input[3] if len(self.node.input) > 3 else ""

    def rows(self, x, y, kept_out, rng, per_sample, valid=None):
        assert self.reference is not None
        features, inputs, samples = _feature_rows(x, y, None, rng, per_sample)  # y: the original's input
        weights, bias = self.reference  # [dirs, I, gates], [dirs, gates]
        targets = np.einsum("ri,gio->rgo", inputs[:, 0].astype(np.float64), weights) + bias[None]
        return np.broadcast_to(features, (len(features), self.blocks, features.shape[2])), targets, samples

    def get(self) -> tuple[np.ndarray, np.ndarray]:
        weight = self.model.constant(self.node.input[1])
        assert weight is not None
        gates = weight.shape[1]
        combined = self.model.constant(self.bias_name()) if self.bias_name() else None
        bias = np.zeros((self.blocks, gates)) if combined is None else combined[:, :gates].astype(np.float64)
        return weight.transpose(0, 2, 1).astype(np.float64), bias

    def set(self, weights: np.ndarray, bias: np.ndarray) -> None:
        gates = weights.shape[2]
        combined = self.model.constant(self.bias_name()) if self.bias_name() else None
        recurrent = np.zeros((self.blocks, gates), np.float32) if combined is None else combined[:, gates:]
        self.model.set_input(self.node, 1, weights.transpose(0, 2, 1).astype(np.float32))
        self.model.set_input(self.node, 3, np.concatenate([bias.astype(np.float32), recurrent], axis=1))

    def share_from(self, other: _Layer) -> None:
        while len(self.node.input) < len(other.node.input):
            self.node.input.append("")
        self.node.input[1], self.node.input[3] = other.node.input[1], other.node.input[3]


_RECURRENT_OPS = ("LSTM", "GRU", "RNN")
REFIT_OPS = frozenset({"Conv", "Gemm", "MatMul", *_RECURRENT_OPS})  # the ops `refit_layer` can see as linear maps


def refit_layer(node: onnx.NodeProto, model: _ModelEditor) -> _Layer | None:
    """The linear view of `node` if it can be refit: constant weights, a layout the refit understands."""
    if len(node.input) < 2 or model.constant(node.input[1]) is None:
        return None
    if node.op_type == "Conv":
        if len(node.input) > 2 and node.input[2] and model.constant(node.input[2]) is None:
            return None
        return _Conv(node, model)
    if node.op_type == "Gemm":
        attrs = _attrs(node)
        if int(attrs.get("transA", 0)) or (len(node.input) > 2 and node.input[2] and model.constant(node.input[2]) is None):  # type: ignore[call-overload]
            return None
        gemm = _Gemm(node, model)
        if len(node.input) > 2 and node.input[2]:
            bias = model.constant(node.input[2])
            assert bias is not None
            if bias.size not in (1, gemm.get()[0].shape[2]):
                return None
        return gemm
    if node.op_type == "MatMul" and model.constant(node.input[1]) is not None:
        if model.constant(node.input[1]).ndim != 2:  # type: ignore[union-attr]
            return None
        return _MatMul(node, model)
    if node.op_type in _RECURRENT_OPS and node.domain in ("", "ai.onnx"):
        constants = [model.constant(node.input[i]) if len(node.input) > i and node.input[i] else None for i in (1, 2, 3)]
        if constants[0] is None or constants[1] is None or (len(node.input) > 3 and node.input[3] and constants[2] is None):
            return None
        return _Recurrent(node, model)
    return None


# ------------------------------------------------------------------------------------ shared weights


@dataclass
class _Unit:
    """One weight refit once: its reader, or every node that reads it (an unrolled recurrence reads one weight
    at every time step), in graph order, refit jointly as one least-squares problem whose rows are all the
    readers' samples; or, when `alone` says why, left as it is. Never split into a copy per reader."""

    layers: list[_Layer]
    alone: str = ""

    @property
    def layer(self) -> _Layer:
        return self.layers[0]

    def set(self, weights: np.ndarray, bias: np.ndarray) -> None:
        self.layers[0].set(weights, bias)
        for other in self.layers[1:]:
            other.share_from(self.layers[0])

    def tie(self) -> None:
        """Readers holding equal copies of one weight and bias read one of them (exact): what the unit does
        when its weight stays as it is."""
        for part in _equal_copies(self.layers, {}) if len(self.layers) > 1 else ():
            for other in part[1:]:
                other.share_from(part[0])

    def describe(self) -> str:
        if len(self.layers) == 1:
            return ""
        return f"one weight read by {len(self.layers)} nodes ({self.layers[0].node.name} … {self.layers[-1].node.name})"


def _refit_units(
    layers: Mapping[str, _Layer], original: ProtoIndex, kept_outputs: Mapping[str, np.ndarray]
) -> list[_Unit]:
    """The refit layers (`layers`: in the graph order of the model being refit) grouped by the weight they
    read in the original, in the order of each unit's first reader.

    The rewrite gives each reader of a sliced shared weight a copy of its own, sliced as the reader's
    channel groups say (an unrolled recurrence whose first step leaves a gate unused keeps more of that
    step's outputs). Readers holding equal copies form one unit, refit jointly; readers sliced differently
    were parted by the rewrite and stay apart. When a reader of the weight is not refit at all, none is."""
    units: list[_Unit] = []
    claimed: set[str] = set()
    for name, layer in layers.items():
        if name in claimed:
            continue
        weight = original.nodes[name].input[1]
        readers = original.consumers(weight)
        if len(readers) <= 1:
            units.append(_Unit([layer]))
            continue
        sharing = [layers[r.name] for r in readers if r.name in layers and r.input[1] == weight]
        claimed |= {reader.node.name for reader in sharing}
        others = [reader.name for reader in readers if reader.name not in {layer.node.name for layer in sharing}]
        if others:
            more = f" and {len(others) - 1} more" if len(others) > 1 else ""
            alone = f"left alone: its weight {weight} is also read by {others[0]}{more}, which recovery does not refit"
            units.append(_Unit(sharing, alone))
            continue
        units.extend(_Unit(part) for part in _equal_copies(sharing, kept_outputs))
    position = {name: index for index, name in enumerate(layers)}  # graph order of the model being refit
    units.sort(key=lambda unit: position[unit.layer.node.name])
    return units


def _equal_copies(layers: Sequence[_Layer], kept_outputs: Mapping[str, np.ndarray]) -> list[list[_Layer]]:
    """`layers` (readers of one weight) parted into those holding equal weights and biases, of one kind."""
    def kept(layer: _Layer) -> tuple[int, ...] | None:
        channels = kept_outputs.get(layer.node.name)
        return None if channels is None else tuple(np.asarray(channels).tolist())

    parts: list[list[_Layer]] = []
    for layer in layers:
        key = (layer.layout(), layer.has_bias_slot, kept(layer))
        for part in parts:
            if (part[0].layout(), part[0].has_bias_slot, kept(part[0])) == key and part[0].same_constants([layer]):
                part.append(layer)
                break
        else:
            parts.append([layer])
    return parts


# ------------------------------------------------------------------------------------------ samples


@dataclass(frozen=True)
class _SampleAxis:
    """Where a batch's samples lie in one tensor (`_probe_sample_axes`): on `axis` ("axis": 0 for [N, C],
    1 for a time-major [T, N, C]); on axis 0 in blocks of rows per sample ("major": [N·k, …]) or interleaved
    ("minor": [k·N, …], step after step, as a Reshape of [T, N, C] to [T·N, C] gives); or "whole": a batch
    of one sample and a tensor without a batch axis of 1 ([T, C])."""

    kind: str = "axis"
    axis: int = 0

    def samples_first(self, x: np.ndarray, fed: int) -> np.ndarray:
        """`x` with the batch's `fed` samples (padding included) on axis 0."""
        if self.kind == "whole":
            return x[None]
        if self.kind == "major":
            return x.reshape(fed, -1, *x.shape[1:])
        if self.kind == "minor":
            return np.moveaxis(x.reshape(-1, fed, *x.shape[1:]), 1, 0)
        return np.moveaxis(x, self.axis, 0) if self.axis else x


def _locate_samples(changed: np.ndarray, fed: int) -> _SampleAxis | None:
    """The layout whose sample 0 covers exactly the `changed` entries (None: no change, or none fits)."""
    if changed.ndim == 0 or not changed.any():
        return None
    for axis, length in enumerate(changed.shape):
        if length == fed:
            hit = np.flatnonzero(changed.any(axis=tuple(a for a in range(changed.ndim) if a != axis)))
            if hit.tolist() == [0]:
                return _SampleAxis("axis", axis)
    if changed.shape[0] > fed and changed.shape[0] % fed == 0:
        rows = np.flatnonzero(changed.reshape(changed.shape[0], -1).any(axis=1))
        if np.all(rows % fed == 0):
            return _SampleAxis("minor")
        if np.all(rows < changed.shape[0] // fed):
            return _SampleAxis("major")
    return None


def _probe_sample_axes(
    model: onnx.ModelProto, names: Sequence[str], batch: Mapping[str, np.ndarray], size: int
) -> dict[str, _SampleAxis]:
    """Where the samples lie in each of the tensors `names` of `model`: run one batch (`size` real samples)
    as it is and with sample 0 replaced by another sample; the entries that change are sample 0's. A
    tensor left out was not located (recovery then takes its axis 0, as for NCHW)."""
    fed = len(next(iter(batch.values())))
    if fed == 1:  # one sample: its axis of size 1, or the whole tensor
        shapes = next(_whole_model_values(model, names, [batch], "original"))
        found = {}
        for name, value in zip(names, shapes, strict=True):
            ones = [axis for axis, length in enumerate(np.shape(value)) if length == 1]
            found[name] = _SampleAxis("axis", ones[0]) if ones else _SampleAxis("whole")
        return found
    other = next((j for j in range(1, size) if any(not np.array_equal(v[0], v[j]) for v in batch.values())), None)
    if other is None:
        return {}
    swapped = {name: np.array(value, copy=True) for name, value in batch.items()}
    for value in swapped.values():
        value[0] = value[other]
    runs = _whole_model_values(model, names, [batch, swapped], "original")
    base, changed = next(runs), next(runs)
    found = {}
    for name, a, b in zip(names, base, changed, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        located = _locate_samples(a != b, fed) if a.shape == b.shape else None
        if located is not None:
            found[name] = located
        else:
            logger.debug("recovery: the samples of %s were not located; taking its axis 0", name)
    return found


# ------------------------------------------------------------------------------------------ solving


class _Normal:
    """Running sums of one node's least-squares problem, per group: AᵀA, Aᵀy, Σy, Σy² (A with a ones column)."""

    def __init__(self, blocks: int, features: int, outputs: int) -> None:
        self.gram = np.zeros((blocks, features + 1, features + 1))
        self.cross = np.zeros((blocks, features + 1, outputs))
        self.y_sum = np.zeros((blocks, outputs))
        self.y_square = np.zeros((blocks, outputs))
        self.rows = 0

    def add(self, features: np.ndarray, targets: np.ndarray) -> None:
        if not len(features):
            return
        # products in float64 through BLAS, one group at a time (an einsum over groups does not reach BLAS);
        # float32 overflowed on a real model's large activations
        a = np.concatenate([features, np.ones((*features.shape[:2], 1), features.dtype)], axis=2).astype(np.float64)
        t = targets.astype(np.float64)
        if a.shape[1] == 1:
            self.gram[0] += a[:, 0].T @ a[:, 0]
            self.cross[0] += a[:, 0].T @ t[:, 0]
        else:
            a_by_group, t_by_group = a.transpose(1, 2, 0), t.transpose(1, 0, 2)  # [G, K, rows], [G, rows, O]
            self.gram += np.matmul(a_by_group, a_by_group.transpose(0, 2, 1))
            self.cross += np.matmul(a_by_group, t_by_group)
        t64 = t.astype(np.float64)
        self.y_sum += t64.sum(axis=0)
        self.y_square += np.square(t64).sum(axis=0)
        self.rows += len(features)

    def merged(self, other: _Normal) -> _Normal:
        both = _Normal(self.gram.shape[0], self.gram.shape[1] - 1, self.cross.shape[2])
        for name in ("gram", "cross", "y_sum", "y_square"):
            setattr(both, name, getattr(self, name) + getattr(other, name))
        both.rows = self.rows + other.rows
        return both

    def error(self, weights: np.ndarray, bias: np.ndarray) -> float:
        """Σ‖A θ − y‖² over the rows added, θ = [weights; bias]."""
        theta = np.concatenate([weights, bias[:, None, :]], axis=1)
        quadratic = np.einsum("gko,gkl,glo->", theta, self.gram, theta, optimize=True)
        linear = np.einsum("gko,gko->", theta, self.cross)
        return max(float(quadratic - 2 * linear + self.y_square.sum()), 0.0)  # ≥ 0 up to rounding

    def variance(self) -> float:
        """Σ over outputs of Σ(y − ȳ)²: what a relative error is relative to."""
        if not self.rows:
            return 0.0
        return float(np.sum(self.y_square - np.square(self.y_sum) / self.rows))


def _solve_lsq(normal: _Normal, weights: np.ndarray, ridge: float, intercept: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares, each input's penalty `ridge` × its energy, shrinking toward `weights`."""
    blocks, features = weights.shape[0], weights.shape[1]
    new_weights, new_bias = np.empty_like(weights), np.zeros((blocks, weights.shape[2]))
    for g in range(blocks):
        gram, cross = normal.gram[g], normal.cross[g]
        energy = np.diag(gram)[:features].copy()
        floor = 1e-6 * float(energy.mean()) if energy.size and energy.mean() > 0 else 1e-12
        penalty = ridge * np.maximum(energy, floor)
        size = features + 1 if intercept else features
        system = gram[:size, :size].copy()
        system[np.arange(features), np.arange(features)] += penalty
        rhs = cross[:size].copy()
        rhs[:features] += penalty[:, None] * weights[g]
        try:
            solution = np.linalg.solve(system, rhs)
        except np.linalg.LinAlgError:
            solution = np.linalg.lstsq(system, rhs, rcond=None)[0]
        new_weights[g] = solution[:features]
        if intercept:
            new_bias[g] = solution[features]
    return new_weights, new_bias


def _means(normal: _Normal) -> tuple[np.ndarray, np.ndarray]:
    rows = max(normal.rows, 1)
    features = normal.gram.shape[1] - 1
    return normal.gram[:, features, :features] / rows, normal.y_sum / rows  # E[a] [G, K], E[y] [G, O]


def _solve_bias(normal: _Normal, weights: np.ndarray) -> np.ndarray:
    mean_a, mean_y = _means(normal)
    return mean_y - np.einsum("gk,gko->go", mean_a, weights)


def _solve_affine(normal: _Normal, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = max(normal.rows, 1)
    features = weights.shape[1]
    mean_a, mean_y = _means(normal)
    covariance = normal.gram[:, :features, :features] / rows - np.einsum("gk,gl->gkl", mean_a, mean_a)
    variance_z = np.einsum("gko,gkl,glo->go", weights, covariance, weights)
    variance_y = np.maximum(normal.y_square / rows - mean_y**2, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(variance_z > 1e-12, np.sqrt(variance_y / variance_z), 1.0)
    new_weights = weights * scale[:, None, :]
    new_bias = mean_y - np.einsum("gk,gko->go", mean_a, new_weights)
    return new_weights, new_bias


# --------------------------------------------------------------------------------------------- driver


def _rebatched(
    batches: Iterable[tuple[Mapping[str, np.ndarray], int]], rows: int, fixed: bool, sizes: list[int],
    fed: list[int] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches as given (a fixed batch dim), or padding dropped and consecutive batches joined into about
    `rows` samples (a free one); the real samples of each are appended to `sizes`, the samples fed (padding
    too) to `fed`. Streams."""
    pending: list[Mapping[str, np.ndarray]] = []
    count = 0
    fed = [] if fed is None else fed
    for feeds, size in batches:
        if fixed:
            sizes.append(size)
            fed.append(len(next(iter(feeds.values()))) if feeds else size)
            yield dict(feeds)
            continue
        pending.append({name: array[:size] for name, array in feeds.items()})
        count += size
        if count >= rows:
            sizes.append(count)
            fed.append(count)
            yield {name: np.concatenate([p[name] for p in pending]) for name in pending[0]}
            pending, count = [], 0
    if pending:
        sizes.append(count)
        fed.append(count)
        yield {name: np.concatenate([p[name] for p in pending]) for name in pending[0]}


def _whole_model_values(
    model: onnx.ModelProto, names: Sequence[str], feeds: Iterable[Mapping[str, np.ndarray]], which: str
) -> Iterator[list[np.ndarray]]:
    """The tensors `names` of `model` per batch of `feeds`, each batch one run of the whole model (what
    recovery falls back to past the staged runner's limit). `which`: "original" or "pruned", for errors."""
    failure: type[DataError] | type[ValidationError] = DataError if which == "original" else ValidationError
    fed = {value.name for value in model.graph.input}
    exposed = list(dict.fromkeys(name for name in names if name not in fed))  # a graph input comes from the feeds
    try:
        session = cpu_session(with_outputs(model, exposed), session_options(opt_level="basic"))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise failure(f"onnxruntime cannot run the {which} model with {names[0]!r} exposed: {first_line(e)}") from e
    for batch in feeds:
        try:
            values = dict(zip(exposed, session.run(exposed, dict(batch)), strict=True)) if exposed else {}
        except Exception as e:  # noqa: BLE001
            raise failure(f"the {which} model fails on the calibration data: {first_line(e)}") from e
        yield [batch[name] if name in fed else values[name] for name in names]


def recover_model(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    refit_nodes: Sequence[str],
    kept_outputs: Mapping[str, np.ndarray],
    batches: Callable[[], Iterable[tuple[Mapping[str, np.ndarray], int]]] | Sequence[Mapping[str, np.ndarray]],
    options: RecoverOptions,
    *,
    fixed_batch: bool = False,
    kept_inputs: Mapping[str, np.ndarray] | None = None,
    progress: Progress | None = None,
) -> tuple[onnx.ModelProto, RecoveryReport]:
    """Refit `refit_nodes` of `pruned` (a copy is returned) to reproduce `original` on calibration data.

    `batches` gives (feeds, real samples) per batch each time it is called, streamed (padding rows past the
    real samples of a fixed batch are ignored); a plain list of feeds will do for small data.
    `kept_outputs`: node → the output channels of the original that the pruned node still produces (absent:
    all).
    `kept_inputs` (node → input channels it still reads) is needed only when `options.sequential` is off.
    """
    start = time.perf_counter()
    recovered = onnx.ModelProto()
    recovered.CopyFrom(pruned)
    if options.method == "none" or not refit_nodes:
        return recovered, RecoveryReport(options.method, (), 0.0, 0, 0)
    if not callable(batches):
        given = list(batches)
        batches = lambda: ((feeds, len(next(iter(feeds.values())))) for feeds in given)  # noqa: E731
    stream = batches
    sizes: list[int] = []
    fed_sizes: list[int] = []
    editor = _ModelEditor(recovered)
    nodes = {node.name: node for node in recovered.graph.node}
    original_nodes = {node.name: node for node in original.graph.node}
    wanted = set(refit_nodes)
    rng = np.random.default_rng(options.seed)
    layers = {
        node.name: layer for node in recovered.graph.node
        if node.name in wanted and node.name in original_nodes and (layer := refit_layer(node, editor)) is not None
        and layer.target_node().name in original_nodes
    }
    units = _refit_units(layers, ProtoIndex(original.graph), kept_outputs)
    target_of = {name: layer.target_tensor(original_nodes[layer.target_node().name]) for name, layer in layers.items()}
    aim_of = {name: layer.target_node().name for name, layer in layers.items()}  # the original's node making the target
    skip_of = _skip_paths(units, recovered, original_nodes, options) if options.sequential else {}
    for name, (join, _) in skip_of.items():
        target_of[name], aim_of[name] = original_nodes[join].output[0], join
    reference = _ModelEditor(original)
    for layer in layers.values():
        layer.aim(reference)
    # x: a node's input, from the model as pruned and refit so far (or the original's, kept channels);
    # y: the original's output there (past the bias Add of a MatMul)
    input_of = {name: nodes[name].input[0] if options.sequential else original_nodes[name].input[0] for name in layers}
    targets = list(target_of.values())
    if not options.sequential:
        targets += list(input_of.values())
    rows = _REBATCH_ROWS

    def feeds() -> Iterator[dict[str, np.ndarray]]:
        return _rebatched(stream(), rows, fixed_batch, [])

    masked = options.token_mask is not None and any(i.name == options.token_mask for i in original.graph.input)

    def token_masks() -> Iterator[np.ndarray | None]:
        """The token mask of each batch (True: a token, not padding), or None throughout."""
        if not masked:
            return itertools.repeat(None)
        return (np.asarray(batch[str(options.token_mask)]) != 0 for batch in feeds())

    runner_original = StagedRunner(
        original, _rebatched(batches(), rows, fixed_batch, sizes, fed_sizes),
        memory_budget=options.memory_budget // 2, protect=targets,
    )
    runner_pruned = StagedRunner(recovered, feeds(), memory_budget=options.memory_budget // 2)
    staged_limit = ""  # why the staged runner stopped, once it has: whole-model runs from then on
    samples = sum(sizes)
    held_out = sum(1 for i in range(samples) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1)
    train_samples = max(samples - held_out, 1)
    results: list[NodeRecovery] = []
    spilled = 0
    try:
        # where each batch's samples lie in the tensors of the layers that do not read NCHW ([T, N, C], …)
        probed = sorted({name for layer in layers.values() if not layer.samples_first
                         for name in (original_nodes[layer.node.name].input[0], target_of[layer.node.name])}
                        | {skip for _, skip in skip_of.values()})
        axes: dict[str, _SampleAxis] = {}
        if probed and sizes:
            probe, size = next(feeds()), sizes[0]
            if not fixed_batch:  # a free batch dim: a few samples show the layout as well as many
                probe, size = {name: value[:_PROBE_SAMPLES] for name, value in probe.items()}, min(size, _PROBE_SAMPLES)
            axes = _probe_sample_axes(original, probed, probe, size)
        for done, unit in enumerate(units, start=1):
            # a unit left alone reports its first reader's error (its readers may differ in shape)
            gathered = unit.layers[:1] if unit.alone else unit.layers
            names = [layer.node.name for layer in gathered]
            if not staged_limit:
                try:
                    runner_pruned.run_to(runner_pruned.position_of(names[0]))
                    runner_original.run_to(max(runner_original.position_of(aim_of[layer.node.name]) for layer in gathered) + 1)
                except StagedRunError as e:
                    staged_limit = first_line(e)
                    logger.warning(
                        "recovery: the staged runner cannot go on at %s (%s); running the whole model for this and "
                        "each later layer instead (slower, the same result)", names[0], staged_limit,
                    )
                    spilled = runner_original.spilled_bytes + runner_pruned.spilled_bytes
                    runner_original.close()
                    runner_pruned.close()
            x_names, y_names = [input_of[name] for name in names], [target_of[name] for name in names]
            values: Iterable[list[tuple[np.ndarray, np.ndarray]]]
            if not staged_limit and len(names) == 1:
                x_runner = runner_pruned if options.sequential else runner_original
                values = ([(x_runner.get(b, x_names[0]), runner_original.get(b, y_names[0]))] for b in range(len(sizes)))
            else:
                # a weight read by several nodes: every reader's input from one run of the model as refit so far
                # (the staged runner is at the first reader; the others are further on)
                x_model, which = (recovered, "pruned") if options.sequential else (original, "original")
                xs = _whole_model_values(x_model, x_names, feeds(), which)
                ys: Iterable[list[np.ndarray]] = (
                    _whole_model_values(original, y_names, feeds(), "original") if staged_limit
                    else ([runner_original.get(b, name) for name in y_names] for b in range(len(sizes)))
                )
                values = (list(zip(x, y, strict=True)) for x, y in zip(xs, ys, strict=True))
            # the skip path's value in the model as refit so far, for a layer aimed at a residual sum
            skip = skip_of[names[0]][1] if len(names) == 1 and names[0] in skip_of else ""
            skips: Iterable[np.ndarray | None] = (
                itertools.repeat(None) if not skip
                else (runner_pruned.get(b, skip) for b in range(len(sizes))) if not staged_limit
                else (value[0] for value in _whole_model_values(recovered, [skip], feeds(), "pruned"))
            )
            weights, bias = unit.layer.get()
            per_sample = max(4, math.ceil(
                options.positions_per_weight * (unit.layer.features() + 1) / (train_samples * len(names))
            ))
            fit = _Normal(unit.layer.blocks, weights.shape[1], weights.shape[2])
            check = _Normal(unit.layer.blocks, weights.shape[1], weights.shape[2])
            first = 0
            pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
            batches_of = zip(values, sizes, fed_sizes, token_masks(), skips, strict=False)
            for batch, (pairs, size, fed, tokens, skip_value) in enumerate(batches_of):
                valid = tokens[:size] if tokens is not None and tokens.ndim == 2 else None
                for layer, (x, y) in zip(gathered, pairs, strict=True):
                    name = layer.node.name
                    if not layer.samples_first:  # samples on axis 0, as rows() expects
                        x = axes.get(original_nodes[name].input[0], _SampleAxis()).samples_first(np.asarray(x), fed)
                        y = axes.get(target_of[name], _SampleAxis()).samples_first(np.asarray(y), fed)
                    x, y = np.asarray(x)[:size], np.asarray(y)[:size]
                    if skip_value is not None:  # the sum's target less what the skip path brings
                        skip_value = axes.get(skip, _SampleAxis()).samples_first(np.asarray(skip_value), fed)[:size]
                        y = _less_skip(y, skip_value, kept_outputs.get(name), name)
                    if not options.sequential and kept_inputs is not None and name in kept_inputs:
                        # the original's kept input channels (a Conv's axis 1, the last axis of the others)
                        x = np.take(x, kept_inputs[name], axis=1 if layer.samples_first else -1)
                    features, target, sample = layer.rows(x, y, kept_outputs.get(name), rng, per_sample, valid)
                    pending.append((features, target, (first + sample) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1))
                first += size
                if sum(len(p[0]) for p in pending) >= _CHUNK_ROWS or batch == len(sizes) - 1:
                    features, target, held = (np.concatenate(parts) for parts in zip(*pending, strict=True))
                    fit.add(features[~held], target[~held])
                    check.add(features[held], target[held])
                    pending = []
            result = _refit(unit, fit, check if check.rows else fit, weights, bias, options)
            if skip:
                note = f"aimed at the residual sum {skip_of[names[0]][0]} (errors: of the sum)"
                result = dataclasses.replace(result, note="; ".join(filter(None, [result.note, note])))
            if staged_limit:
                note = f"input and target from whole-model runs (the staged runner's limit: {staged_limit})"
                result = dataclasses.replace(result, note="; ".join(filter(None, [result.note, note])))
            results.append(result)
            if not staged_limit:
                for name in y_names:
                    runner_original.release(name)
                runner_pruned.update(recovered)
            if progress is not None:
                progress("recovery", done, len(units))
        if not staged_limit:
            spilled = runner_original.spilled_bytes + runner_pruned.spilled_bytes
    finally:
        runner_original.close()
        runner_pruned.close()
    editor.drop_unused()
    report = RecoveryReport(options.method, tuple(results), time.perf_counter() - start, samples, held_out, spilled)
    return recovered, report


def _skip_paths(
    units: Sequence[_Unit], model: onnx.ModelProto, original_nodes: Mapping[str, onnx.NodeProto],
    options: RecoverOptions,
) -> dict[str, tuple[str, str]]:
    """Layer → (its residual Add, the skip operand) for the Gemm/MatMul refit alone whose target joins a
    skip path computed before the layer (`_Layer.skip_join`): those are aimed at the original's sum."""
    if not options.through_skips:
        return {}
    position = {node.name: index for index, node in enumerate(model.graph.node)}  # ONNX lists nodes in order
    producer = {output: node.name for node in model.graph.node for output in node.output}
    fed = {value.name for value in model.graph.input}
    found = {}
    for unit in units:
        layer = unit.layer
        if len(unit.layers) != 1 or unit.alone or layer.samples_first or not isinstance(layer, (_Gemm, _MatMul)):
            continue
        joined = layer.skip_join()
        if joined is None or joined[0].name not in original_nodes:
            continue
        join, skip = joined
        made_by = producer.get(skip)
        if made_by is None and skip not in fed or made_by is not None and position[made_by] >= position[layer.node.name]:
            continue  # the skip path is not there yet when the layer's input is
        found[layer.node.name] = (join.name, skip)
    return found


def _less_skip(target: np.ndarray, skip: np.ndarray, kept_out: np.ndarray | None, name: str) -> np.ndarray:
    """A residual sum's target [N, ..., O] less the skip path's value [N, ..., O kept] in its kept channels."""
    kept = slice(None) if kept_out is None else np.asarray(kept_out)
    part = target[..., kept]
    if part.shape != skip.shape:
        raise ValidationError(f"recovery: the residual Add after {name} joins {skip.shape} to {part.shape}")
    target = np.array(target, dtype=np.float64, copy=True)
    target[..., kept] -= skip
    return target


def _refit(
    unit: _Unit, fit: _Normal, check: _Normal, weights: np.ndarray, bias: np.ndarray, options: RecoverOptions
) -> NodeRecovery:
    """Choose and write the node's new weights by held-out error (module docstring): the method asked for,
    unless leaving the layer (or moving the mean into its bias) does better on the held-out samples. lsq is
    solved with each of `_RIDGE_FACTORS` times the ridge and the one best on the held-out samples is kept: a layer with
    few rows per weight (MiniLM's FFN down-projections: every token of 160 sentences, 1.6 rows per weight)
    overfits at 1× even where 1× already beats the fallback, so stopping at the first that beats it kept a
    worse refit."""
    layer = unit.layer
    intercept = layer.has_bias_slot
    candidates: dict[str, tuple[np.ndarray, np.ndarray]] = {"none": (weights, bias)}
    if intercept:
        candidates["bias"] = (weights, _solve_bias(fit, weights))
    if options.method == "affine" and intercept:
        candidates["affine"] = _solve_affine(fit, weights)
    scale = check.variance() or float(check.y_square.sum()) or 1.0

    def error(values: tuple[np.ndarray, np.ndarray]) -> float:
        if not (np.all(np.isfinite(values[0])) and np.all(np.isfinite(values[1]))):
            return math.inf  # a solve that broke down is never chosen
        value = check.error(*values) / scale
        return value if math.isfinite(value) else math.inf

    errors = {method: error(values) for method, values in candidates.items()}
    node = layer.node
    if unit.alone:
        unit.tie()
        note = f"{unit.describe()}, {unit.alone}" if len(unit.layers) > 1 else unit.alone
        return NodeRecovery(node.name, node.op_type, "none", "none", errors["none"], errors["none"], note)
    if errors["none"] < UNCHANGED:  # its output is still the original's: nothing to recover
        unit.tie()
        note = "; ".join(filter(None, ["output unchanged", unit.describe()]))
        return NodeRecovery(node.name, node.op_type, "none", "none", errors["none"], errors["none"], note)
    ridge = options.ridge
    fallback = min((m for m in ("none", "bias") if m in errors), key=lambda m: errors[m])
    if options.method == "lsq":  # the ridge that does best on the held-out samples, not the first that beats the fallback
        for factor in _RIDGE_FACTORS if options.ridge > 0 else (1.0,):
            trial = _solve_lsq(fit, weights, options.ridge * factor, intercept)
            trial_error = error(trial)
            if "lsq" not in errors or trial_error < errors["lsq"]:
                candidates["lsq"], errors["lsq"], ridge = trial, trial_error, options.ridge * factor
    requested = options.method
    method, note = requested, ""
    if requested not in candidates:
        method, note = fallback, "no bias slot (a MatMul not followed by a constant Add)"
    elif requested != "none" and errors[requested] > errors[fallback] * (1 + 1e-6) + 1e-12:
        method = fallback
        note = f"{requested} was worse on held-out samples ({errors[requested]:.3g} vs {errors[fallback]:.3g})"
    elif method == "lsq" and ridge != options.ridge:
        note = f"ridge {ridge:g} (held-out samples preferred it to {options.ridge:g})"
    if method == "none":
        unit.tie()
    else:  # the guard has decided; the weights are fit on every sample, held-out ones too
        every = fit.merged(check) if check is not fit else fit
        final = {
            "bias": lambda: (weights, _solve_bias(every, weights)),
            "affine": lambda: _solve_affine(every, weights),
            "lsq": lambda: _solve_lsq(every, weights, ridge, intercept),
        }[method]()
        unit.set(*final)
    if len(unit.layers) > 1:
        note = "; ".join(filter(None, [note, f"{unit.describe()}, refit jointly" if method != "none" else unit.describe()]))
    return NodeRecovery(node.name, node.op_type, method, requested, errors["none"], errors[method], note)
