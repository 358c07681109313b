"""`quantize --mode static|dynamic|auto` (the `modes`, `dynamic` and `mode` steps of quant/quantizer.py) and
optimize's `--quant-mode`, on a small transformer encoder built in code (tests/builders.py).

Every test that reaches a speed guard injects its timings (the timer sees each model's QuantConfig, whose
`mode` says static or dynamic); speed itself is measured in benchmarks/transformers.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import transformer_encoder
from click.testing import CliRunner

import onnxslim.quant.quantizer as quantize_module
from onnxslim.calib import DataOptions, open_dataset
from onnxslim.cli import cli
from onnxslim.errors import UnsupportedModelError
from onnxslim.evaluate import AccuracyBudget
from onnxslim.optimizer import OptimizeOptions
from onnxslim.optimizer import optimize as run_optimize
from onnxslim.quant import QuantConfig, QuantizeOptions, quantize_model
from onnxslim.quant.config import InterleavedTiming, TimingBudget, dynamic_config
from onnxslim.quant.speed import alternatives
from onnxslim.report.quantize import render_quantize

INTEGER_OPS = {"DynamicQuantizeLinear", "MatMulInteger"}


def mode_timer(static_ms: float, dynamic_ms: float, fp32_ms: float = 10.0):
    """Reports fp32, static and dynamic latencies by each model's config; records every run's configs."""
    calls: list[list[QuantConfig | None]] = []

    def timer(entries: Sequence[tuple[QuantConfig | None, onnx.ModelProto]], feeds, budget: TimingBudget):
        calls.append([config for config, _ in entries])
        return [InterleavedTiming(fp32_ms if c is None else dynamic_ms if c.mode == "dynamic" else static_ms)
                for c, _ in entries]

    timer.calls = calls  # type: ignore[attr-defined]
    return timer


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, Path, Path]:
    folder = tmp_path_factory.mktemp("encoder")
    model = transformer_encoder()
    path = folder / "encoder.onnx"
    onnx.save(model, str(path))
    data = folder / "tokens.npz"
    np.savez(data, input=np.random.default_rng(0).standard_normal((40, 16, 32)).astype(np.float32))
    return model, path, data


def _dataset(model: onnx.ModelProto, data: Path):
    return open_dataset(data, model, DataOptions(batch=4))


def _outputs(model: onnx.ModelProto, data: Path) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": np.load(data)["input"]})[0]


def _op_types(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def _io(model: onnx.ModelProto) -> list[tuple[str, str]]:
    return [(v.name, str(v.type)) for v in [*model.graph.input, *model.graph.output]]


def _check_emitted(int8: onnx.ModelProto, source: onnx.ModelProto, data: Path) -> None:
    """onnx.checker, the source's I/O names, types and shapes, an onnxruntime run close to fp32."""
    onnx.checker.check_model(int8)
    assert _io(int8) == _io(source)
    got, want = _outputs(int8, data), _outputs(source, data)
    assert got.shape == want.shape
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.99


def test_auto_measures_both_modes_on_a_transformer_and_keeps_dynamic_when_it_is_faster(encoder) -> None:
    model, _, data = encoder
    timer = mode_timer(static_ms=7.0, dynamic_ms=5.0)
    result = quantize_model(model, _dataset(model, data), QuantizeOptions(), timer=timer)
    assert result.quantized and result.mode is not None and result.mode.chosen == "dynamic"
    assert result.mode.asked == "auto" and result.mode.matmul_share > 0.9
    assert [(c.mode, c.kept) for c in result.mode.candidates] == [("static", True), ("dynamic", True)]
    # the two kept variants were timed side by side with fp32, in one run
    assert [None, "static", "dynamic"] in [[c.mode if c else None for c in call] for call in timer.calls]
    assert {t.config.mode: t.speedup for t in result.mode.head_to_head} == {"static": 10 / 7, "dynamic": 2.0}
    assert result.config is not None and result.config.mode == "dynamic" and result.method == "run-time"
    ops = _op_types(result.model)
    assert INTEGER_OPS <= ops and "QuantizeLinear" not in ops
    _check_emitted(result.model, model, data)


def test_dynamic_leaves_residual_adds_layer_norms_and_attention_products_float(encoder) -> None:
    model, _, data = encoder
    result = quantize_model(model, _dataset(model, data), QuantizeOptions(mode="dynamic"), timer=mode_timer(7.0, 5.0))
    assert result.quantized
    count = {op: sum(n.op_type == op for n in result.model.graph.node) for op in ("Add", "LayerNormalization", "MatMul")}
    source = {op: sum(n.op_type == op for n in model.graph.node) for op in ("Add", "LayerNormalization", "MatMul")}
    projections = 6 * 2  # Q, K, V, output, FFN up and down, in each of 2 layers
    assert count["LayerNormalization"] == source["LayerNormalization"] and count["Add"] == source["Add"]
    assert sum(n.op_type == "MatMulInteger" for n in result.model.graph.node) == projections
    assert count["MatMul"] == source["MatMul"] - projections  # Q·K and attention·V stay float
    assert result.nodes_quantized == projections


def test_auto_keeps_static_when_static_is_faster(encoder) -> None:
    model, _, data = encoder
    result = quantize_model(model, _dataset(model, data), QuantizeOptions(), timer=mode_timer(5.0, 7.0))
    assert result.quantized and result.mode is not None and result.mode.chosen == "static"
    assert result.config is not None and result.config.mode == "static"
    assert "QuantizeLinear" in _op_types(result.model) and not INTEGER_OPS & _op_types(result.model)
    assert "static int8 is clearly faster" in result.mode.reason
    _check_emitted(result.model, model, data)


def test_modes_as_fast_as_each_other_keep_the_more_faithful(encoder) -> None:
    model, _, data = encoder
    result = quantize_model(model, _dataset(model, data), QuantizeOptions(), timer=mode_timer(5.0, 5.0))
    assert result.mode is not None
    scores = {t.config.mode: t.score for t in result.mode.head_to_head}
    assert scores["static"] != scores["dynamic"]
    assert result.mode.chosen == max(scores, key=lambda mode: scores[mode])
    assert "more faithful" in result.mode.reason


def test_a_mode_slower_than_fp32_leaves_the_choice_to_the_other(encoder) -> None:
    model, _, data = encoder
    timer = mode_timer(static_ms=12.0, dynamic_ms=5.0)
    result = quantize_model(model, _dataset(model, data), QuantizeOptions(), timer=timer)
    assert result.mode is not None and result.mode.chosen == "dynamic"
    assert [(c.mode, c.kept) for c in result.mode.candidates] == [("static", False), ("dynamic", True)]
    assert result.mode.head_to_head == ()  # only one was kept: nothing to compare side by side


def test_dynamic_outside_the_budget_is_refused_and_fp32_kept(encoder) -> None:
    model, _, data = encoder
    budget = AccuracyBudget(min_fidelity=0.999999)
    result = quantize_model(model, _dataset(model, data), QuantizeOptions(mode="dynamic", budget=budget),
                            timer=mode_timer(7.0, 5.0))
    assert not result.quantized and result.budget_met is False
    assert result.fidelity is not None and result.fidelity.score < 0.999999  # missed, not refused by mistake
    assert "accuracy budget" in result.reason
    assert not INTEGER_OPS & _op_types(result.model)


def test_dynamic_missing_the_budget_keeps_the_most_harmful_matmuls_fp32(encoder) -> None:
    model, _, data = encoder
    plain = quantize_model(model, _dataset(model, data), QuantizeOptions(mode="dynamic", max_trials=0),
                           timer=mode_timer(7.0, 5.0))
    assert plain.budget_check is not None and plain.fp32_nodes == ()
    floor = 1 - (1 - plain.budget_check.score) / 2  # half the plain deficit: some MatMuls must stay fp32
    result = quantize_model(model, _dataset(model, data),
                            QuantizeOptions(mode="dynamic", budget=AccuracyBudget(min_fidelity=floor)),
                            timer=mode_timer(7.0, 5.0))
    assert result.quantized and result.budget_met is True and result.budget_check is not None
    assert result.budget_check.score >= floor > plain.budget_check.score
    kept = {n.name for n in result.fp32_nodes}
    assert kept and all(n.op_type == "MatMul" and n.error is not None and n.error > 0 for n in result.fp32_nodes)
    assert result.nodes_quantized == 12 - len(kept) and result.exclusion_trials
    floats = {n.name for n in result.model.graph.node if n.op_type == "MatMul"}
    assert kept <= floats  # the MatMuls kept fp32 are still plain MatMuls in the model written
    _check_emitted(result.model, model, data)
    text = render_quantize(result)
    assert "dynamic int8: MatMul/Gemm kept fp32" in text and all(name in text for name in kept)


def test_auto_with_both_modes_outside_the_budget_keeps_fp32(encoder) -> None:
    model, _, data = encoder
    options = QuantizeOptions(budget=AccuracyBudget(min_fidelity=0.999999), max_trials=0)
    result = quantize_model(model, _dataset(model, data), options, timer=mode_timer(7.0, 5.0))
    assert not result.quantized and result.mode is not None
    assert [c.kept for c in result.mode.candidates] == [False, False]
    assert "neither static nor dynamic" in result.reason


def test_dynamic_calibrates_nothing_and_judges_on_all_the_data(encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, data = encoder

    def no_calibration(*args, **kwargs):
        raise AssertionError("dynamic int8 must not calibrate")

    monkeypatch.setattr(quantize_module, "calibrate", no_calibration)
    result = quantize_model(model, _dataset(model, data), QuantizeOptions(mode="dynamic"), timer=mode_timer(7.0, 5.0))
    assert result.quantized and result.calibration is None
    assert result.fidelity is not None and result.fidelity.samples == 40  # every sample judges: none calibrates


def test_dynamic_tries_per_tensor_weights_when_per_channel_is_not_faster(encoder) -> None:
    model, _, data = encoder
    timer = mode_timer(7.0, 12.0)
    result = quantize_model(model, _dataset(model, data), QuantizeOptions(mode="dynamic"), timer=timer)
    assert not result.quantized
    assert [c.config.label for c in result.candidates] == ["dynamic s8 per-channel", "dynamic s8 per-tensor"]
    assert all(c.mode == "dynamic" for call in timer.calls for c in call if c is not None)


def test_dynamic_alternatives_are_only_per_tensor_weights() -> None:
    config = dynamic_config(QuantConfig())
    assert [kind for kind, _ in alternatives(config)] == ["per-tensor"]
    assert alternatives(config, per_channel_possible=False) == []


def test_a_cnn_stays_static_under_auto(tmp_path: Path) -> None:
    from test_quantize import cnn, data_npz, dataset

    model = cnn()
    timer = mode_timer(5.0, 1.0)
    result = quantize_model(model, dataset(data_npz(tmp_path / "c.npz", model, 20), model), timer=timer)
    assert result.mode is not None and result.mode.chosen == "static" and "static only" in result.mode.reason
    assert result.mode.matmul_share < 0.5 and len(result.mode.candidates) == 1
    assert all(c.mode == "static" for call in timer.calls for c in call if c is not None)


# ----------------------------------------------------------------------------------------- command line


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["-q", *args])
    assert "Traceback" not in result.stdout + result.stderr
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def fake_latencies(monkeypatch: pytest.MonkeyPatch) -> Callable[[float, float], None]:
    """The CLI's real timer reports fp32 10 ms, and static and dynamic models the given latencies (it sees
    models, not configs: a dynamic model is the one with MatMulInteger)."""

    def install(static_ms: float, dynamic_ms: float) -> None:
        def measure(models, feeds, **kwargs) -> list[InterleavedTiming]:
            return [InterleavedTiming(10.0)] + [
                InterleavedTiming(dynamic_ms if "MatMulInteger" in _op_types(m) else static_ms) for m in models[1:]
            ]

        monkeypatch.setattr(quantize_module, "measure_latencies", measure)

    return install


def test_cli_auto_reports_the_mode_and_both_candidates(tmp_path: Path, encoder, fake_latencies) -> None:
    fake_latencies(7.0, 5.0)
    _, path, data = encoder
    out = tmp_path / "int8.onnx"
    code, stdout, _ = invoke("quantize", str(path), "-o", str(out), "--calib", str(data), "--batch", "4", "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["quantized"] is True and report["mode"] == "dynamic"
    choice = report["mode_choice"]
    assert choice["asked"] == "auto" and "clearly faster" in choice["reason"]
    assert [(c["mode"], c["kept"]) for c in choice["candidates"]] == [("static", True), ("dynamic", True)]
    assert all(c["speedup"] > 1 and c["score"] > 0.99 for c in choice["candidates"])
    assert {c["mode"]: round(c["speedup"], 3) for c in choice["head_to_head"]} == {"static": 1.429, "dynamic": 2.0}
    written = onnx.load(str(out))
    assert INTEGER_OPS <= _op_types(written)
    code, stdout, _ = invoke("quantize", str(path), "-o", str(out), "--calib", str(data), "--batch", "4")
    assert code == 0 and "mode         dynamic" in stdout and "static " in stdout


def test_cli_dynamic_needs_only_evaluation_data(tmp_path: Path, encoder, fake_latencies) -> None:
    fake_latencies(7.0, 5.0)
    _, path, data = encoder
    out = tmp_path / "int8.onnx"
    code, stdout, _ = invoke("quantize", str(path), "-o", str(out), "--eval", str(data), "--mode", "dynamic", "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["mode"] == "dynamic" and report["calibration"] is None and report["quantized"] is True
    code, _, stderr = invoke("quantize", str(path), "-o", str(out), "--mode", "dynamic")
    assert code == 2 and "--eval" in stderr
    for mode in ("auto", "static"):
        code, _, stderr = invoke("quantize", str(path), "-o", str(out), "--eval", str(data), "--mode", mode)
        assert code == 2 and "needs --calib" in stderr


# ------------------------------------------------------------------------------------------------ optimize


def test_optimize_chooses_the_mode_at_the_level_it_quantizes(tmp_path: Path, encoder, fake_latencies) -> None:
    fake_latencies(7.0, 5.0)
    _, path, data = encoder
    options = OptimizeOptions(target_macs=0.8, min_fidelity=0.9, repeat=5)
    result = run_optimize(path, data, options, data_options=DataOptions(batch=4))
    assert result.quantize is not None and result.quantize.mode is not None
    assert result.quantize.mode.chosen == "dynamic" and result.trials[0].mode == "dynamic"
    static = run_optimize(path, data, OptimizeOptions(prune=False, min_fidelity=0.9, repeat=5, quant_mode="static"),
                          data_options=DataOptions(batch=4))
    assert static.quantize is not None and static.quantize.mode is not None
    assert static.quantize.mode.chosen == "static" and static.quantize.mode.asked == "static"


def test_a_dynamic_model_onnxruntime_cannot_load_leaves_auto_to_static(encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, data = encoder

    def unloadable(*args, **kwargs) -> onnx.ModelProto:
        broken = onnx.ModelProto()
        broken.CopyFrom(model)
        broken.graph.node[0].op_type = "NoSuchOp"
        return broken

    monkeypatch.setattr(quantize_module, "quantize_dynamic_weights", unloadable)
    result = quantize_model(model, _dataset(model, data), QuantizeOptions(), timer=mode_timer(7.0, 5.0))
    assert result.quantized and result.mode is not None and result.mode.chosen == "static"
    assert [(c.mode, c.timing is None) for c in result.mode.candidates] == [("static", False), ("dynamic", True)]
    assert "cannot load" in result.mode.candidates[1].reason
    assert any("dynamic int8" in note and "cannot load" in note for note in result.notes)
    with pytest.raises(UnsupportedModelError, match="cannot load"):
        quantize_model(model, _dataset(model, data), QuantizeOptions(mode="dynamic"), timer=mode_timer(7.0, 5.0))
