"""Recovery on recurrent readers (prune/recover.py): a weight read at every step of an unrolled recurrence is
refit once, jointly over its readers, never split into a copy per reader; samples found on the axis they lie
on ([T, N, C], [T·N, C], a batch of one)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from builders import ModelBuilder, crnn_lstm_model, crnn_model, unrolled_rnn_model
from onnx import numpy_helper
from oracle import run_model

from onnxslim.analysis.groups import build_channel_groups
from onnxslim.calib import Dataset, open_dataset
from onnxslim.io import infer_tensor_infos, normalize_model
from onnxslim.prune import prune_model
from onnxslim.prune.plan import PrunePlan
from onnxslim.prune.recover import RecoverOptions, _probe_sample_axes, _SampleAxis, recover_model
from onnxslim.prune.rewrite import apply_plan, kept_output_channels


def _inputs(model: onnx.ModelProto, samples: int, seed: int) -> np.ndarray:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return np.random.default_rng(seed).standard_normal((samples, *shape)).astype(np.float32)


def _batches(x: np.ndarray, name: str = "input", batch: int = 16) -> list[dict[str, np.ndarray]]:
    return [{name: x[i : i + batch]} for i in range(0, len(x), batch)]


def _error(model: onnx.ModelProto, reference: onnx.ModelProto, x: np.ndarray) -> float:
    feeds = {model.graph.input[0].name: x}
    return float(np.mean((run_model(model, feeds)[0] - run_model(reference, feeds)[0]) ** 2))


def _initializer_values(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def _hidden_sliced(model: onnx.ModelProto, keep: int):  # type: ignore[no-untyped-def]
    """The normalized model, its groups and plan, and the model sliced to `keep` hidden units."""
    normalized = normalize_model(model)[0]
    shapes = {i.name: (2, *[d.dim_value for d in i.type.tensor_type.shape.dim[1:]]) for i in normalized.graph.input}
    infos = infer_tensor_infos(normalized, shapes)
    groups = build_channel_groups(gs.import_onnx(normalized), {n: i.shape for n, i in infos.items()})
    hidden = next(g for g in groups if g.prunable and any(s.op_type == "Gemm" for s in g.sources))
    plan = PrunePlan({hidden.id: tuple(range(keep))})
    return normalized, groups, plan, apply_plan(normalized, groups, plan)


def _shared_weight_readers(model: onnx.ModelProto, op_type: str) -> tuple[str, list[onnx.NodeProto]]:
    """The weight of `op_type` nodes read by the most of them, and those nodes."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type == op_type:
            readers.setdefault(node.input[1], []).append(node)
    weight = max(readers, key=lambda name: len(readers[name]))
    return weight, readers[weight]


def test_a_weight_read_at_every_step_is_refit_once_jointly() -> None:
    """The RNN's recurrent MatMul weight and its Add bias are read by 7 steps: the refit is one least-squares
    problem over every step's rows, written once and read by all 7 (it was a copy per step, 7 problems of
    one step's rows each), and on held-out data it is no worse than the model as sliced."""
    normalized, groups, plan, pruned = _hidden_sliced(unrolled_rnn_model(), keep=10)
    weight, readers = _shared_weight_readers(normalized, "MatMul")
    assert len(readers) == 7
    names = [n.name for n in readers]
    x = _inputs(normalized, 240, seed=0)
    recovered, report = recover_model(
        normalized, pruned, names, kept_output_channels(groups, plan), _batches(x), RecoverOptions(),
    )
    onnx.checker.check_model(recovered)
    nodes = {n.name: n for n in recovered.graph.node}
    assert len({nodes[name].input[1] for name in names}) == 1  # one weight, read by every step
    biases = {add.input[1] for add in recovered.graph.node if add.op_type == "Add" and add.input[0] in
              {nodes[name].output[0] for name in names}}
    assert len(biases) == 1  # and one bias
    shared = next(t for t in recovered.graph.initializer if t.name == nodes[names[0]].input[1])
    assert list(shared.dims) == [10, 10]
    assert _initializer_values(recovered) <= _initializer_values(pruned)  # one tensor, as the rewrite sliced it
    assert len(report.nodes) == 1 and report.nodes[0].method == "lsq"
    assert "one weight read by 7 nodes" in report.nodes[0].note and "refit jointly" in report.nodes[0].note
    assert report.nodes[0].error_after < report.nodes[0].error_before
    held = _inputs(normalized, 200, seed=9)
    sliced, refit = _error(pruned, normalized, held), _error(recovered, normalized, held)
    assert refit <= sliced, (refit, sliced)
    assert run_model(recovered, {"input": held})[0].shape == run_model(normalized, {"input": held})[0].shape


def test_a_shared_weight_sliced_alike_stays_one_tensor_through_rewrite_and_recovery() -> None:
    """The RNN's input projection is read by 8 Gemms, all sliced alike: the rewrite makes one sliced tensor
    they all read (it made a copy per reader), and recovery keeps it one."""
    normalized, groups, plan, pruned = _hidden_sliced(unrolled_rnn_model(), keep=10)
    weight, readers = _shared_weight_readers(normalized, "Gemm")
    names = [n.name for n in readers]
    assert len(names) == 8 and len({n.input[1] for n in pruned.graph.node if n.name in names}) == 1
    recovered, report = recover_model(
        normalized, pruned, names, kept_output_channels(groups, plan), _batches(_inputs(normalized, 80, seed=1)),
        RecoverOptions(),
    )
    onnx.checker.check_model(recovered)
    assert len({n.input[1] for n in recovered.graph.node if n.name in names}) == 1
    assert len({n.input[2] for n in recovered.graph.node if n.name in names}) == 1
    assert _initializer_values(recovered) <= _initializer_values(pruned)
    x = {"input": _inputs(normalized, 8, seed=2)}
    np.testing.assert_array_equal(run_model(recovered, x)[0], run_model(pruned, x)[0])  # their output was exact
    assert [n.method for n in report.nodes] == ["none"]


def _calibration(model: onnx.ModelProto, tmp_path, samples: int = 200) -> Dataset:  # type: ignore[no-untyped-def]
    path = tmp_path / "calib.npz"
    np.savez(path, input=_inputs(model, samples, seed=3))
    return open_dataset(path, normalize_model(model)[0])


def test_prune_keeps_the_crnns_recurrence_shared(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The whole prune with calibration on the CRNN (dense CNN, bidirectional LSTM unrolled with weights
    shared by every step, CTC output [T, N, C]): one recurrent weight per direction after recovery, fewer
    parameters than the original, and the output closer to the original's than as sliced."""
    model = crnn_model()
    calib = _calibration(model, tmp_path)
    result = prune_model(model, ratio=0.4, round_to=1, calib=calib)
    assert result.recovery is not None and result.evaluation is not None
    normalized = normalize_model(model)[0]
    recurrent = {}
    for direction_weight, readers in _readers_by_weight(normalized, "Gemm").items():
        if len(readers) == 7:  # W_hh of one direction (h₀ = 0: the first step has none)
            recurrent[direction_weight] = readers
    assert len(recurrent) == 2
    pruned_nodes = {n.name: n for n in result.model.graph.node}
    for readers in recurrent.values():
        assert len({pruned_nodes[name].input[1] for name in readers}) == 1
        assert len({pruned_nodes[name].input[2] for name in readers}) == 1
    assert result.params_after < result.params_before
    joint = [n for n in result.recovery.nodes if "refit jointly" in n.note]
    assert len(joint) >= 2
    output = result.evaluation.outputs[0]
    assert output.cosine_after >= output.cosine_before
    assert output.agreement_after is not None and output.agreement_before is not None
    assert output.agreement_after >= output.agreement_before


def test_an_lstm_ops_input_projection_is_refit_over_every_time_step() -> None:
    """An ONNX LSTM reading a damaged sequence (its CNN lost channels): its input weights W and their bias
    Wb are refit, per direction, with every time step of every sample as a row, toward the original's
    projection of the original's input; R and Rb stay. On held-out data the model is closer to the original
    than with the same refits but the LSTM left as it is."""
    model = normalize_model(crnn_lstm_model())[0]
    shapes = {"input": (2, 1, 8, 32)}
    infos = infer_tensor_infos(model, shapes)
    groups = build_channel_groups(gs.import_onnx(model), {n: i.shape for n, i in infos.items()})
    first = next(g for g in groups if g.prunable)
    plan = PrunePlan({first.id: (0, 1, 2, 3)})
    pruned = apply_plan(model, groups, plan)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"][1:]
    lstm = next(n for n in model.graph.node if n.op_type == "LSTM")
    classifier = next(n.name for n in model.graph.node if n.op_type == "MatMul")
    batches = _batches(_inputs(model, 240, seed=0))
    kept = kept_output_channels(groups, plan)
    without, _ = recover_model(model, pruned, [*convs, classifier], kept, batches, RecoverOptions())
    recovered, report = recover_model(model, pruned, [*convs, lstm.name, classifier], kept, batches, RecoverOptions())
    onnx.checker.check_model(recovered)
    refit = next(n for n in report.nodes if n.node == lstm.name)
    assert refit.method == "lsq" and refit.error_after < refit.error_before
    node = next(n for n in recovered.graph.node if n.name == lstm.name)
    arrays = {t.name: numpy_helper.to_array(t) for t in recovered.graph.initializer}
    originals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert node.input[2] == lstm.input[2]  # R as it was
    assert arrays[node.input[1]].shape == originals[lstm.input[1]].shape
    np.testing.assert_array_equal(arrays[node.input[3]][:, 48:], originals[lstm.input[3]][:, 48:])  # Rb (after 4·12 gates) as it was
    held = _inputs(model, 200, seed=9)
    assert _error(recovered, model, held) < _error(without, model, held) < _error(pruned, model, held)


def _readers_by_weight(model: onnx.ModelProto, op_type: str) -> dict[str, list[str]]:
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type == op_type:
            readers.setdefault(node.input[1], []).append(node.name)
    return readers


# ------------------------------------------------------------------------------------ sample axes


def _time_major_model(*, batch: int | str, steps: int = 10, flatten: bool = False) -> onnx.ModelProto:
    """x [N, T, 4] → Transpose → [T, N, 4] → MatMul (6 features; 4 and 5 combinations of 0–3) → Relu →
    MatMul + Add (3) on [T, N, 6], or with `flatten` Reshape to [T·N, 6] → Gemm (3)."""
    b = ModelBuilder((steps, 4), seed=5, input_name="x", batch=batch)  # type: ignore[arg-type]
    b.channels[b.input] = 4
    sequence = b.op("Transpose", [b.input], perm=[1, 0, 2])
    weight = b.random(4, 6)
    weight[:, 4], weight[:, 5] = 0.5 * weight[:, 0] - weight[:, 2], weight[:, 1] + 2 * weight[:, 3]
    hidden = b.op("MatMul", [sequence, b.const(weight)], channels=6)
    if flatten:
        rows = b.op("Reshape", [hidden, b.const(np.array([-1, 6], np.int64), prefix="shape")])
        return b.build(b.gemm(rows, 3))
    return b.build(b.matmul(hidden, 3))


@pytest.mark.parametrize(
    ("batch", "flatten", "expected"),
    [("N", False, _SampleAxis("axis", 1)), ("N", True, _SampleAxis("minor")), (1, False, _SampleAxis("axis", 1)),
     (1, True, _SampleAxis("whole"))],
)
def test_the_samples_of_a_time_major_tensor_are_found(batch, flatten, expected) -> None:  # type: ignore[no-untyped-def]
    model = normalize_model(_time_major_model(batch=batch, flatten=flatten))[0]
    sink = next(n for n in model.graph.node if n.op_type in ("Gemm", "MatMul") and n.input[0] != "transpose_0")
    samples = 1 if batch == 1 else 8
    batch_feeds = {"x": np.random.default_rng(0).standard_normal((samples, 10, 4)).astype(np.float32)}
    found = _probe_sample_axes(model, [sink.input[0], sink.output[0]], batch_feeds, samples)
    assert found == {sink.input[0]: expected, sink.output[0]: expected}
    x = np.asarray(run_model(onnx.shape_inference.infer_shapes(model), batch_feeds)[0])
    assert expected.samples_first(x, samples).shape[0] == samples


@pytest.mark.parametrize("flatten", [False, True])
def test_a_refit_on_time_major_rows_uses_every_step_of_a_batch_of_one(flatten: bool) -> None:
    """A fixed batch of one sample, read [T, 1, C] (or [T, C]): every time step is a row of the refit. The
    first step is blank (a text line's margin), as real captchas are: taken as the sample axis, axis 0
    gave the first step alone, and the refit saw nothing but the blank."""
    model = normalize_model(_time_major_model(batch=1, flatten=flatten))[0]
    first = next(n for n in model.graph.node if n.op_type == "MatMul")
    sink = next(n for n in model.graph.node if n.op_type in ("Gemm", "MatMul") and n is not first)
    shapes = {"x": (1, 10, 4)}
    infos = infer_tensor_infos(model, shapes)
    groups = build_channel_groups(gs.import_onnx(model), {n: i.shape for n, i in infos.items()})
    group = next(g for g in groups if any(s.node == first.name for s in g.sources))
    plan = PrunePlan({group.id: (0, 1, 2, 3)})
    pruned = apply_plan(model, groups, plan)
    x = np.random.default_rng(0).standard_normal((60, 1, 10, 4)).astype(np.float32)
    x[:, :, 0] = 0.0  # the blank first step
    recovered, report = recover_model(
        model, pruned, [sink.name], kept_output_channels(groups, plan), [{"x": sample} for sample in x],
        RecoverOptions(ridge=0.0), fixed_batch=True,
    )
    onnx.checker.check_model(recovered)
    test = {"x": np.random.default_rng(4).standard_normal((1, 10, 4)).astype(np.float32)}
    want = run_model(model, test)[0]
    assert np.abs(run_model(pruned, test)[0] - want).max() > 0.1
    np.testing.assert_allclose(run_model(recovered, test)[0], want, rtol=1e-4, atol=1e-4)
    assert report.nodes[0].method == "lsq" and report.nodes[0].error_after < 1e-6
