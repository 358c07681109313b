"""Recovery (prune/recover.py) and calibration statistics (activations.py): the maths, not the benchmarks."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import ModelBuilder
from onnx import TensorProto, helper, numpy_helper
from oracle import assert_outputs_close, check_prune, run_model

from onnxslim.activations import StagedRunner, channel_statistics
from onnxslim.analysis.groups import build_channel_groups
from onnxslim.calib import open_dataset
from onnxslim.io import infer_tensor_infos, normalize_model, random_inputs
from onnxslim.prune import PruneOptions, prune_model
from onnxslim.prune.plan import PrunePlan
from onnxslim.prune.recover import RecoverOptions, recover_model, unfold_patches
from onnxslim.prune.rewrite import apply_plan, kept_input_channels, kept_output_channels


def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    graph = helper.make_graph(nodes, "recover", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _redundant_chain(*, constant_channel: bool = False) -> onnx.ModelProto:
    """x [N,3,8,8] → Conv 1×1 (6 channels) → Conv 3×3 pad 1 (4) → y. Channels 4 and 5 of the first conv are
    linear combinations of channels 0–3 (weights and bias alike), or with `constant_channel` channel 5 is a
    constant (zero filter, bias 2)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 3, 1, 1)).astype(np.float32)
    b1 = rng.standard_normal(6).astype(np.float32)
    w1[4], b1[4] = 0.5 * w1[0] - w1[2], 0.5 * b1[0] - b1[2]
    w1[5], b1[5] = w1[1] + 2 * w1[3], b1[1] + 2 * b1[3]
    if constant_channel:
        w1[5], b1[5] = 0.0, 2.0
    w2 = rng.standard_normal((4, 6, 3, 3)).astype(np.float32)
    b2 = rng.standard_normal(4).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1"),
        helper.make_node("Conv", ["h", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    inits = [numpy_helper.from_array(v, n) for n, v in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))]
    return _model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits,
    )


def _pruned(model: onnx.ModelProto, kept: dict[str, tuple[int, ...]]):  # type: ignore[no-untyped-def]
    """The normalized model, its groups, the plan and the model sliced by it (no validation, no folding)."""
    normalized = normalize_model(model)[0]
    shapes = {i.name: (2, *[d.dim_value for d in i.type.tensor_type.shape.dim[1:]]) for i in normalized.graph.input}
    infos = infer_tensor_infos(normalized, shapes)
    import onnx_graphsurgeon as gs

    groups = build_channel_groups(gs.import_onnx(normalized), {n: i.shape for n, i in infos.items()})
    plan = PrunePlan(kept)
    return normalized, groups, plan, apply_plan(normalized, groups, plan)


def _feeds(model: onnx.ModelProto, samples: int, seed: int = 0, batch: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    data = rng.standard_normal((samples, *shape)).astype(np.float32)
    return [{"x": data[i : i + batch]} for i in range(0, samples, batch)]


def _recover(model, kept, method, samples=64, **options):  # type: ignore[no-untyped-def]
    normalized, groups, plan, pruned = _pruned(model, kept)
    refit = [n.name for n in normalized.graph.node if n.name == "conv2"]
    recovered, report = recover_model(
        normalized, pruned, refit, kept_output_channels(groups, plan), _feeds(normalized, samples),
        RecoverOptions(method=method, **options), kept_inputs=kept_input_channels(groups, plan),
    )
    onnx.checker.check_model(recovered)
    return normalized, pruned, recovered, report


def test_lsq_restores_a_layer_whose_removed_inputs_are_combinations_of_kept_ones() -> None:
    model = _redundant_chain()
    normalized, pruned, recovered, report = _recover(model, {"conv1": (0, 1, 2, 3)}, "lsq", ridge=0.0)
    feeds = _feeds(normalized, 8, seed=9)[0]
    want = run_model(normalized, feeds)
    assert np.abs(run_model(pruned, feeds)[0] - want[0]).max() > 1.0  # the sliced model alone is far off
    assert_outputs_close(run_model(recovered, feeds), want, rel=1e-4)
    assert [n.method for n in report.nodes] == ["lsq"] and report.nodes[0].error_after < 1e-6
    assert numpy_helper.to_array(_initializer(recovered, "conv2", 1)).shape == (4, 4, 3, 3)


def _initializer(model: onnx.ModelProto, node_name: str, index: int) -> onnx.TensorProto:
    node = next(n for n in model.graph.node if n.name == node_name)
    return next(t for t in model.graph.initializer if t.name == node.input[index])


def test_bias_is_exact_for_a_constant_channel() -> None:
    # conv2 as 1×1 without padding so a constant input channel is a constant at every output position
    model = _redundant_chain(constant_channel=True)
    conv2 = model.graph.node[1]
    del conv2.attribute[:]
    w2 = np.random.default_rng(1).standard_normal((4, 6, 1, 1)).astype(np.float32)
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(w2, "w2"))
    normalized, pruned, recovered, report = _recover(model, {"conv1": (0, 1, 2, 3, 4)}, "bias")
    feeds = _feeds(normalized, 8, seed=3)[0]
    assert np.abs(run_model(pruned, feeds)[0] - run_model(normalized, feeds)[0]).max() > 0.1
    assert_outputs_close(run_model(recovered, feeds), run_model(normalized, feeds), rel=1e-5)
    assert report.nodes[0].method == "bias"


def _two_layer_mlp() -> onnx.ModelProto:
    b = ModelBuilder((12,), seed=3, input_name="x")
    y = b.relu(b.gemm(b.input, 16))
    y = b.relu(b.gemm(y, 16))
    return b.build(b.gemm(y, 5))


def test_sequential_refit_beats_refitting_from_the_original_inputs() -> None:
    """Only the first hidden layer loses channels; the second is refit alike either way. The last reads an
    unpruned group, so from the original's inputs its refit changes nothing, while the sequential refit sees
    the second layer's remaining error through the Relu and corrects it."""
    model = normalize_model(_two_layer_mlp())[0]
    gemms = [n.name for n in model.graph.node if n.op_type == "Gemm"]
    kept = {gemms[0]: (0, 3, 6, 9, 12)}
    normalized, groups, plan, pruned = _pruned(model, kept)
    feeds, held = _feeds(normalized, 1024, batch=64), _feeds(normalized, 512, seed=5, batch=512)[0]
    errors = {}
    for sequential in (True, False):
        recovered, _ = recover_model(
            normalized, pruned, gemms[1:], kept_output_channels(groups, plan), feeds,
            RecoverOptions(sequential=sequential, ridge=1e-3), kept_inputs=kept_input_channels(groups, plan),
        )
        errors[sequential] = float(np.mean((run_model(recovered, held)[0] - run_model(normalized, held)[0]) ** 2))
    sliced = float(np.mean((run_model(pruned, held)[0] - run_model(normalized, held)[0]) ** 2))
    assert errors[True] < errors[False] < sliced


@pytest.mark.parametrize(
    ("attrs", "group", "channels"),
    [
        ({"pads": [1, 1, 1, 1]}, 1, 3),
        ({"pads": [0, 2, 1, 0], "strides": [2, 1]}, 1, 3),
        ({"pads": [2, 2, 2, 2], "dilations": [2, 2]}, 1, 3),
        ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 1, 3),
        ({"pads": [1, 1, 1, 1]}, 2, 4),
        ({"pads": [1, 1, 1, 1], "strides": [2, 2]}, 4, 4),  # depthwise
    ],
)
def test_unfolded_patches_times_the_weights_are_the_conv_output(attrs: dict, group: int, channels: int) -> None:
    rng = np.random.default_rng(0)
    out = 4
    weight = rng.standard_normal((out, channels // group, 3, 3)).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=group, **attrs)
    model = _model(
        [conv], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, channels, 9, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "w")],
    )
    x = rng.standard_normal((2, channels, 9, 7)).astype(np.float32)
    y = run_model(model, {"x": x})[0]
    positions = np.arange(int(np.prod(y.shape[2:])))
    samples = np.repeat(np.arange(2), len(positions))
    patches = unfold_patches(x, conv, [3, 3], samples, np.tile(positions, 2))  # [rows, C_in, 3, 3]
    rows = len(samples)
    per_group = patches.reshape(rows, group, -1)
    w = weight.reshape(group, out // group, -1)
    got = np.einsum("rgk,gok->rgo", per_group, w).reshape(rows, out)
    want = y.reshape(2, out, -1).transpose(0, 2, 1).reshape(rows, out)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_recover_none_keeps_the_masked_oracle_exact(tmp_path: Path) -> None:
    b = ModelBuilder((3, 8, 8), seed=2)
    y = b.relu(b.bn(b.conv(b.input, 8, k=3)))
    y = b.silu(b.conv(y, 8, k=3))
    model = b.build(b.conv(y, 4))
    data = tmp_path / "calib.npz"
    np.savez(data, input=np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    calib = open_dataset(data, normalize_model(model)[0])
    result = check_prune(model, 0.5, criterion="activation", calib=calib, recover="none")
    assert result.recovery is None and result.evaluation is not None
    assert result.evaluation.outputs[0].cosine_before == result.evaluation.outputs[0].cosine_after


def test_activation_criterion_sees_a_scale_after_the_activation(tmp_path: Path) -> None:
    """Channels with big weights but a per-channel scale of ~0 after the Relu are useless: l1 keeps them,
    activation removes them first."""
    b = ModelBuilder((3, 8, 8), seed=4)
    h = b.relu(b.conv(b.input, 8, k=3))
    scale = np.ones((1, 8, 1, 1), np.float32)
    scale[0, :4] = 1e-4
    weight = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    weight[:4] *= 10  # the useless channels have the largest filters
    b.initializers[0].CopyFrom(numpy_helper.from_array(weight, b.initializers[0].name))
    h = b.op("Mul", [h, b.const(scale)], channels=8)
    model = b.build(b.conv(h, 4))
    data = tmp_path / "calib.npz"
    np.savez(data, input=np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32))
    calib = open_dataset(data, normalize_model(model)[0])
    by_activation = prune_model(model, ratio=0.5, criterion="activation", calib=calib, recover="none")
    by_l1 = prune_model(model, ratio=0.5, criterion="l1")
    first = next(g for g in by_activation.groups if by_activation.plan.changes(g))
    assert by_activation.plan.kept[first.id] == (4, 5, 6, 7)
    assert by_l1.plan.kept[first.id] != (4, 5, 6, 7)


def test_statistics_match_numpy(tmp_path: Path) -> None:
    model = normalize_model(_redundant_chain())[0]
    data = tmp_path / "calib.npz"
    x = np.random.default_rng(0).standard_normal((20, 3, 8, 8)).astype(np.float32)
    np.savez(data, x=x)
    stats = channel_statistics(model, open_dataset(data, model), {"h": 1})["h"]
    session_h = StagedRunner(model, [{"x": x}], protect=["h"])
    session_h.run_to(1)
    h = np.asarray(session_h.get(0, "h"), dtype=np.float64)
    np.testing.assert_allclose(stats.mean, h.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.mean_square, (h**2).mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(stats.mean_abs, np.abs(h).mean(axis=(0, 2, 3)), rtol=1e-6)
    assert stats.count == 20 * 64


def _peak_bytes(function) -> int:  # type: ignore[no-untyped-def]
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_statistics_and_refit_memory_do_not_grow_with_the_number_of_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What recovery holds is one stage's batch, the rows gathered before they go into the Gram matrices
    (at most _CHUNK_ROWS, made small here so both runs exceed it) and the Gram matrices; activations past the
    memory budget go to disk."""
    from onnxslim.prune import recover

    monkeypatch.setattr(recover, "_CHUNK_ROWS", 128)
    model = _redundant_chain()
    normalized, groups, plan, pruned = _pruned(model, {"conv1": (0, 1, 2, 3)})
    peaks = {}
    for samples in (128, 1024):
        data = tmp_path / f"calib{samples}.npz"
        np.savez(data, x=np.random.default_rng(0).standard_normal((samples, 3, 8, 8)).astype(np.float32))
        dataset = open_dataset(data, normalized)

        def run(dataset=dataset) -> None:  # type: ignore[no-untyped-def]
            channel_statistics(normalized, dataset, {"h": 1, "y": 1})
            recover_model(  # batches streamed into the runners' stores
                normalized, pruned, ["conv2"], kept_output_channels(groups, plan),
                lambda: ((b.feeds, b.size) for b in dataset.batches()),
                RecoverOptions(memory_budget=64 << 10),  # past 64 KiB, activations go to disk
            )

        peaks[samples] = _peak_bytes(run)
    assert peaks[1024] < 1.5 * peaks[128], peaks


def test_prune_with_calibration_recovers_the_trained_mnist_resnet() -> None:
    """The README's claim in small: at half the MACs, l1 alone breaks the model and lsq recovers it."""
    root = Path(__file__).resolve().parent.parent / "models"
    from onnxslim.io import load_model

    loaded = load_model(root / "mnist_resnet.onnx")
    calib = open_dataset(root / "mnist_calib.npz", loaded.model)
    options = PruneOptions(target_macs=0.5, round_to=8, protect_first=True, protect_last=True)
    result = prune_model(loaded, options, criterion="activation", calib=calib)
    assert result.recover == "lsq" and result.evaluation is not None
    evaluation = result.evaluation
    assert evaluation.accuracy_before is not None and evaluation.accuracy_after is not None
    assert evaluation.accuracy_before < 0.6 < 0.95 < evaluation.accuracy_after
    assert evaluation.outputs[0].cosine_after > 0.95 and not evaluation.collapsed
    assert result.macs_after <= 0.51 * result.macs_before
    feeds = random_inputs(loaded.model, result.analysis_shapes, seed=0)
    assert run_model(result.model, feeds)[0].shape == run_model(loaded.model, feeds)[0].shape


def _sequence_model() -> onnx.ModelProto:
    """A recognizer-shaped model: convs, a mean over the height, Transpose to [T, N, C], Softmax over C."""
    rng = np.random.default_rng(3)
    weights = {
        "w1": rng.standard_normal((16, 3, 3, 3)).astype(np.float32) / 3,
        "w2": rng.standard_normal((16, 16, 3, 3)).astype(np.float32) / 6,
        "w3": rng.standard_normal((10, 16, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="conv3"),
        helper.make_node("ReduceMean", ["c3"], ["m"], name="mean", axes=[2], keepdims=0),
        helper.make_node("Transpose", ["m"], ["t"], name="transpose", perm=[2, 0, 1]),
        helper.make_node("Softmax", ["t"], ["probs"], name="softmax", axis=2),
    ]
    return _model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 16])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [16, "N", 10])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )


def test_a_sequence_first_output_is_compared_at_every_time_step(tmp_path: Path) -> None:
    """[T, N, C] outputs: the batch axis is found (not taken as 0) and top-1 agreement counts every step."""
    model = _sequence_model()
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((40, 3, 4, 16)).astype(np.float32))
    calib = open_dataset(data, normalize_model(model)[0])
    result = prune_model(model, ratio=0.75, criterion="l1", calib=calib, recover="none")
    assert result.evaluation is not None and result.evaluation.samples == 8
    output = result.evaluation.outputs[0]
    assert output.agreement_after is not None and output.agreement_after < 1.0
    feeds = {"x": np.random.default_rng(0).standard_normal((40, 3, 4, 16)).astype(np.float32)}
    want, got = run_model(normalize_model(model)[0], feeds)[0], run_model(result.model, feeds)[0]
    held = np.arange(40) % 5 == 4  # the samples measure held out, on the batch axis (1)
    expected = float(np.mean(want[:, held].argmax(-1) == got[:, held].argmax(-1)))
    assert output.agreement_after == pytest.approx(expected)


def test_huge_activations_do_not_break_the_refit() -> None:
    """Inputs of 1e18 (as a real export's unnormalized activations reached): the Gram sums pass float32's
    range, and the refit must still restore the layer, never write NaN."""
    model = _redundant_chain()
    normalized, groups, plan, pruned = _pruned(model, {"conv1": (0, 1, 2, 3)})
    feeds = [{"x": f["x"] * np.float32(1e18)} for f in _feeds(normalized, 64)]
    recovered, report = recover_model(
        normalized, pruned, ["conv2"], kept_output_channels(groups, plan), feeds, RecoverOptions(ridge=0.0),
    )
    test = {"x": _feeds(normalized, 8, seed=9)[0]["x"] * np.float32(1e18)}
    got, want = run_model(recovered, test)[0], run_model(normalized, test)[0]
    assert np.all(np.isfinite(got)) and report.nodes[0].method == "lsq"
    assert_outputs_close([got], [want], rel=1e-3)


def test_a_matmul_refit_aims_past_its_bias_add() -> None:
    """A MatMul's bias lives in the Add after it: the refit fits weights and that bias together, so its target
    is the Add's output. Aimed at the MatMul's own output, the fit wrote a bias of ≈ 0 into the Add (an
    unchanged layer came back shifted by its whole bias)."""
    b = ModelBuilder((6, 12), seed=1, input_name="x")
    b.channels[b.input] = 12  # tokens [N, 6, 12]: the MatMul reads the last axis
    model = normalize_model(b.build(b.matmul(b.relu(b.matmul(b.input, 16)), 10)))[0]
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((8, 6, 12)).astype(np.float32)} for _ in range(8)]
    # nothing changed: every layer is left as it is
    recovered, report = recover_model(model, model, matmuls, {}, feeds, RecoverOptions())
    assert [n.method for n in report.nodes] == ["none", "none"] and max(n.error_before for n in report.nodes) < 1e-6
    # hidden features 0-3 dropped: the second MatMul and its bias are refit toward the Add's output
    _, groups, plan, pruned = _pruned(model, {matmuls[0]: tuple(range(4, 16))})
    recovered, report = recover_model(model, pruned, matmuls[1:], kept_output_channels(groups, plan), feeds, RecoverOptions())
    onnx.checker.check_model(recovered)
    test = {"x": np.random.default_rng(9).standard_normal((16, 6, 12)).astype(np.float32)}
    want = run_model(model, test)[0]
    sliced, refit = (float(np.mean((run_model(m, test)[0] - want) ** 2)) for m in (pruned, recovered))
    assert report.nodes[0].method == "lsq" and refit < 0.5 * sliced


def test_recovery_of_pruned_heads_and_neurons_improves_the_held_out_error(tmp_path: Path) -> None:
    """An encoder pruned to 60% of its MACs (heads and FFN neurons): refitting the output projections and
    the FFN down-projections (token positions as samples) brings the held-out outputs closer to the original's."""
    from builders import encoder_model

    model = encoder_model(layers=2, heads=4, head_size=4, ffn=24, seed=5)
    rng = np.random.default_rng(0)
    mask = np.ones((60, 6), np.float32)
    mask[::3, 4:] = 0.0
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((60, 6, 16)).astype(np.float32), attention_mask=mask)
    calib = open_dataset(data, normalize_model(model)[0])
    results = {
        method: prune_model(model, ratio=None, target_macs=0.6, criterion="activation", calib=calib, recover=method,
                            input_shapes={"x": [1, 6, 16], "attention_mask": [1, 6]},
                            protect_first=False)
        for method in ("none", "lsq")
    }
    for result in results.values():
        assert any(g.width == 4 and result.plan.changes(g) for g in result.groups)
    assert results["lsq"].recovery is not None
    refit = {r.node for r in results["lsq"].recovery.nodes if r.method == "lsq"}
    assert any("MatMul" in name for name in refit)
    before, after = (results[m].evaluation.outputs[0].cosine_after for m in ("none", "lsq"))  # type: ignore[union-attr]
    assert after > before, (before, after)


def test_padded_token_positions_are_no_rows_of_a_refit() -> None:
    """With the token mask, rows come only from tokens (each sample's padding is skipped), at most
    per_sample of them per sample; without it, from every position."""
    from onnxslim.prune.recover import _feature_rows

    x = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    y = -x
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], bool)
    features, target, samples = _feature_rows(x, y, None, np.random.default_rng(0), 8, valid)
    assert samples.tolist() == [0, 0, 0, 1, 1]
    np.testing.assert_array_equal(features[:, 0], x[valid])
    np.testing.assert_array_equal(target[:, 0], y[valid])
    few, _, few_samples = _feature_rows(x, y, None, np.random.default_rng(0), 2, valid)
    assert few_samples.tolist() == [0, 0, 1, 1]
    assert all(any((row == token).all() for token in x[0, :3]) for row in few[:2, 0])
    every, _, _ = _feature_rows(x, y, None, np.random.default_rng(0), 8)
    assert len(every) == 10


def test_a_projection_joining_the_residual_stream_is_aimed_at_the_sum() -> None:
    """FFN neurons of an encoder's first layer pruned: the error they leave rides the residual stream, which
    no layer on it can refit. Aimed at its own output, each later projection only reproduces its own part;
    aimed at the original's residual sum (less the skip path as pruned), the output and FFN down-projections
    make up for the stream's error too, and the pruned model comes closer to the original on fresh data."""
    from builders import transformer_encoder

    model = transformer_encoder(tokens=8, dim=16, heads=4, ffn=32, layers=2, seed=21)
    name = model.graph.input[0].name
    constants = {i.name for i in model.graph.initializer}
    linear = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in constants]
    # per layer: Q, K, V, output projection, FFN up, FFN down; keep 8 of layer 0's 32 FFN neurons
    normalized, groups, plan, pruned = _pruned(model, {linear[4]: tuple(range(0, 32, 4))})
    rng = np.random.default_rng(0)
    feeds = [{name: rng.standard_normal((16, 8, 16)).astype(np.float32)} for _ in range(8)]
    test = {name: np.random.default_rng(9).standard_normal((64, 8, 16)).astype(np.float32)}
    want = run_model(normalized, test)[0]
    errors, reports = {}, {}
    for through in (False, True):
        recovered, reports[through] = recover_model(
            normalized, pruned, linear[5:], kept_output_channels(groups, plan), feeds, RecoverOptions(through_skips=through)
        )
        onnx.checker.check_model(recovered)
        down = next(n for n in recovered.graph.node if n.name == linear[5])
        assert [list(t.dims) for t in recovered.graph.initializer if t.name == down.input[1]] == [[8, 16]]
        errors[through] = float(np.mean((run_model(recovered, test)[0] - want) ** 2))
    aimed = {r.node for r in reports[True].nodes if "residual sum" in r.note}
    assert {linear[5], linear[11]} <= aimed and not any("residual sum" in r.note for r in reports[False].nodes)
    assert linear[6] not in aimed  # Q reads the stream; its output joins none
    assert errors[True] < 0.9 * errors[False], errors
