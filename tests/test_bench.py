"""`benchmark` and `onnxslim bench`: metrics against known answers, several models, JSON schema, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from builders import (
    CLASSES,
    classification_npz,
    int_input_model,
    save,
    scaled_classifier,
    two_output_classifier,
)
from click.testing import CliRunner
from conftest import MODELS_DIR

from onnxslim.bench import BenchOptions, benchmark, parse_profile, physical_cores
from onnxslim.calib import DataOptions
from onnxslim.cli import cli
from onnxslim.errors import DataError, UsageError
from onnxslim.report.bench import bench_json, render_bench

FAST = BenchOptions(warmup=1, repeat=7, memory=False)


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """identity, doubled and negated classifiers over [N, 10] input `x`."""
    return {
        name: save(scaled_classifier(factor), tmp_path / f"{name}.onnx")
        for name, factor in (("identity", 1.0), ("doubled", 2.0), ("negated", -1.0))
    }


@pytest.fixture
def eval_npz(tmp_path: Path) -> Path:
    classification_npz(tmp_path / "eval.npz", samples=12)
    return tmp_path / "eval.npz"


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in result.stdout + result.stderr
    return result.exit_code, result.stdout, result.stderr


# ------------------------------------------------------------------------------------------- library


def test_several_models_with_labels_known_fidelity_and_accuracy(models: dict[str, Path], eval_npz: Path) -> None:
    progress: list[int] = []
    result = benchmark(
        [models["identity"], models["doubled"], models["negated"]], data=eval_npz,
        data_options=DataOptions(batch=4), options=FAST, progress=progress.append,
    )
    assert sum(progress) == FAST.repeat
    assert (result.samples, result.batch_size, result.random_data, result.output) == (12, 4, False, "logits")
    assert result.input_shapes == {"x": (4, CLASSES)} and result.threads == physical_cores()
    identity, doubled, negated = result.models
    assert [m.name for m in result.models] == ["identity.onnx", "doubled.onnx", "negated.onnx"]
    assert identity.fidelity is None and identity.speedup == 1.0
    # labels are the argmax of x: every model that keeps the argmax is 100% right
    assert identity.accuracy.top1 == 1.0 and doubled.accuracy.top1 == 1.0 and negated.accuracy.top1 == 0.0
    assert identity.accuracy.samples == 12
    # 2x: cosine 1, SNR 10 log10(|x|^2 / |x|^2) = 0 dB; -x: cosine -1, no top-1 agreement
    assert doubled.fidelity.cosine == pytest.approx(1.0) and doubled.fidelity.snr_db == pytest.approx(0.0, abs=1e-6)
    assert doubled.fidelity.top1_agreement == 1.0 and doubled.fidelity.samples == 12
    assert negated.fidelity.cosine == pytest.approx(-1.0) and negated.fidelity.top1_agreement == 0.0
    for model in result.models:
        latency = model.latency
        assert latency.runs == FAST.repeat
        assert 0 < latency.min_ms <= latency.p50_ms <= latency.p90_ms <= latency.p99_ms
        assert model.speedup == pytest.approx(identity.latency.p50_ms / latency.p50_ms)
        assert model.throughput == pytest.approx(4 / (latency.mean_ms / 1e3))
        assert (model.params, model.macs) == (100, 4 * 100)  # Gemm 10x10 at batch 4
        assert model.size_bytes == model.path.stat().st_size and model.peak_memory_bytes is None


def test_random_inputs_when_no_data(models: dict[str, Path]) -> None:
    result = benchmark([models["identity"], models["doubled"]], options=FAST)
    assert result.random_data and result.samples == 8 and result.batch_size == 1
    assert result.models[0].accuracy is None and result.models[1].fidelity.cosine == pytest.approx(1.0)
    assert "RANDOM inputs" in render_bench(result)


def test_fixed_batch_model_counts_every_sample_once(tmp_path: Path, eval_npz: Path) -> None:
    a = save(scaled_classifier(1.0, batch=5), tmp_path / "a.onnx")
    b = save(scaled_classifier(3.0, batch=5), tmp_path / "b.onnx")
    result = benchmark([a, b], data=eval_npz, options=FAST)  # 12 samples at batch 5: 5, 5, 2 (+3 padding)
    assert result.batch_size == 5 and result.samples == 12
    assert result.models[0].accuracy.samples == 12 and result.models[1].fidelity.samples == 12
    assert result.models[1].accuracy.top1 == 1.0


def test_peak_memory_is_measured_in_a_separate_process(models: dict[str, Path]) -> None:
    result = benchmark([models["identity"]], options=BenchOptions(warmup=0, repeat=2, memory=True, memory_runs=1))
    memory = result.models[0].peak_memory_bytes
    assert isinstance(memory, int) and 0 < memory < 2**30


def test_output_choice(tmp_path: Path, eval_npz: Path) -> None:
    path = save(two_output_classifier(), tmp_path / "two.onnx")
    (tmp_path / "sub").mkdir()
    other = save(two_output_classifier(), tmp_path / "sub" / "two.onnx")
    result = benchmark([path, other], data=eval_npz, options=BenchOptions(warmup=0, repeat=2, memory=False, output="doubled"))
    assert result.output == "doubled" and result.models[1].fidelity.max_abs == 0.0
    assert result.models[0].name != result.models[1].name  # same file name: shown by path
    with pytest.raises(UsageError, match="'nope' is not an output"):
        benchmark([path], options=BenchOptions(output="nope", memory=False))


def test_models_whose_inputs_differ_are_refused(tmp_path: Path, models: dict[str, Path]) -> None:
    renamed = save(scaled_classifier(input_name="y"), tmp_path / "renamed.onnx")
    with pytest.raises(UsageError, match=r"inputs are \['y'\], the first model's \['x'\]"):
        benchmark([models["identity"], renamed], options=FAST)
    other_dtype = save(int_input_model(), tmp_path / "ints.onnx")
    with pytest.raises(UsageError, match="cannot be compared"):
        benchmark([models["identity"], other_dtype], options=FAST)
    fixed = save(scaled_classifier(batch=3), tmp_path / "fixed3.onnx")
    with pytest.raises(UsageError, match="input shapes must agree"):
        benchmark([models["identity"], fixed], options=FAST)


def test_bad_data_is_a_data_error(tmp_path: Path, models: dict[str, Path]) -> None:
    np.savez(tmp_path / "wrong.npz", input=np.zeros((2, CLASSES), np.float32))
    with pytest.raises(DataError, match="no array for input 'x'"):
        benchmark([models["identity"]], data=tmp_path / "wrong.npz", options=FAST)


# ----------------------------------------------------------------------------------------------- CLI


BENCH_KEYS = {
    "models": list, "data": str, "random_data": bool, "samples": int, "batch_size": int, "input_shapes": dict,
    "output": str, "threads": int, "warmup": int, "repeat": int, "provider": str, "opt_level": str,
    "speedup_statistic": str,
}
MODEL_KEYS = {
    "name": str, "path": str, "size_bytes": int, "params": int, "macs": int, "latency": dict, "speedup": float,
    "throughput": float,
}
LATENCY_KEYS = {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "runs"}
FIDELITY_KEYS = {
    "cosine", "max_abs", "mean_abs", "snr_db", "top1_agreement", "samples", "worst_channel_cosine",
    "worst_channel_rel_error", "worst_channel", "channel_axis", "channels", "batch_axis", "class_axis",
    "strings_unchanged", "strings_changed", "time_axis", "classes_picked",
}


def test_cli_json_schema(models: dict[str, Path], eval_npz: Path) -> None:
    code, out, err = invoke(
        "bench", str(models["identity"]), str(models["negated"]), "--data", str(eval_npz), "--json",
        "--warmup", "0", "--repeat", "3", "--threads", "1", "--batch", "2", "--opt-level", "basic",
    )
    assert code == 0, err
    report = json.loads(out)
    for key, kind in BENCH_KEYS.items():
        assert isinstance(report[key], kind), key
    assert (report["threads"], report["batch_size"], report["opt_level"], report["repeat"]) == (1, 2, "basic", 3)
    assert report["input_shapes"] == {"x": [2, CLASSES]}
    first, second = report["models"]
    for model in (first, second):
        for key, kind in MODEL_KEYS.items():
            assert isinstance(model[key], kind), key
        assert set(model["latency"]) == LATENCY_KEYS and all(isinstance(v, float) for k, v in model["latency"].items() if k != "runs")
        assert set(model["accuracy"]) == {"top1", "top5", "samples"}
        assert isinstance(model["peak_memory_bytes"], int) and model["peak_memory_bytes"] > 0
    assert first["fidelity"] is None and set(second["fidelity"]) == FIDELITY_KEYS
    assert second["fidelity"]["cosine"] == pytest.approx(-1.0) and second["accuracy"]["top1"] == 0.0


def test_cli_table_and_markdown(models: dict[str, Path], eval_npz: Path, tmp_path: Path) -> None:
    markdown = tmp_path / "bench.md"
    code, out, err = invoke(
        "bench", str(models["identity"]), str(models["doubled"]), "--data", str(eval_npz), "--no-memory",
        "--warmup", "0", "--repeat", "3", "--markdown", str(markdown),
    )
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("model"))
    for column in ("p50 ms", "speedup", "samples/s", "params", "MACs", "cosine", "top-1 agree", "top-1 acc", "peak mem"):
        assert column in header
    rows = [line for line in out.splitlines() if line.startswith(("identity.onnx", "doubled.onnx"))]
    assert len(rows) == 2 and "1.00x" in rows[0] and "100.00%" in rows[1]
    text = markdown.read_text()
    assert "| model | p50 ms |" in text and "| doubled.onnx |" in text and "12 samples" in text


def _kernel(name: str, op_type: str, ts: int, dur: int) -> dict:
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op_type}}


def test_parse_profile_leaves_out_warm_up_runs_and_sums_by_op_type() -> None:
    runs = [{"cat": "Session", "name": "model_run", "ts": ts, "dur": 90} for ts in (100, 200, 300)]
    events = [
        {"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 50},
        *runs,
        _kernel("conv_a", "Conv", 110, 1000),  # the warm-up run: left out
        *(_kernel(f"conv_{i}", "Conv", ts + 10 + i, 30) for ts in (200, 300) for i in range(2)),
        *(_kernel("relu", "Relu", ts + 20, 20) for ts in (200, 300)),
        {"cat": "Node", "name": "conv_0_fence_before", "ts": 205, "dur": 5, "args": {"op_name": "Conv"}},
    ]
    profile = parse_profile(events, skip_runs=1)
    assert profile.runs == 2
    assert [(o.op_type, o.kernels) for o in profile.ops] == [("Conv", 2), ("Relu", 1)]
    assert [o.ms for o in profile.ops] == pytest.approx([0.060, 0.020])
    assert profile.kernel_ms == pytest.approx(0.080)
    assert [o.share for o in profile.ops] == pytest.approx([0.75, 0.25])
    with pytest.raises(ValueError, match="3 runs"):
        parse_profile(events, skip_runs=3)


def test_profile_shows_each_models_kernels(models: dict[str, Path], eval_npz: Path) -> None:
    code, out, err = invoke(
        "bench", str(models["identity"]), str(models["doubled"]), "--data", str(eval_npz), "--no-memory",
        "--warmup", "0", "--repeat", "3", "--profile", "--profile-runs", "4", "--json",
    )
    assert code == 0, err
    for model in json.loads(out)["models"]:
        profile = model["profile"]
        assert profile["runs"] == 4 and profile["kernel_ms"] > 0
        assert [op["op_type"] for op in profile["ops"]] == ["Gemm"]  # the one node each model has
        assert profile["ops"][0]["kernels"] == 1 and profile["ops"][0]["share"] == pytest.approx(1.0)
    code, out, err = invoke(
        "bench", "--profile", str(models["identity"]), str(models["doubled"]), "--data", str(eval_npz), "--no-memory",
        "--warmup", "0", "--repeat", "3",
    )
    assert code == 0, err
    table = out[out.index("where the time goes"):]
    assert "20 runs per model" in table
    assert next(line for line in table.splitlines() if line.startswith("op type")).split()[2:] == ["identity.onnx", "doubled.onnx"]
    assert [line.split()[0] for line in table.splitlines() if line.startswith(("Gemm", "kernel time"))] == ["Gemm", "kernel"]
    code, out, _ = invoke("bench", str(models["identity"]), "--no-memory", "--repeat", "2")
    assert code == 0 and "where the time goes" not in out


def test_cli_exit_codes(models: dict[str, Path], tmp_path: Path) -> None:
    np.savez(tmp_path / "wrong.npz", x=np.zeros((2, CLASSES), np.float64))
    code, _, err = invoke("bench", str(models["identity"]), "--data", str(tmp_path / "wrong.npz"), "--no-memory")
    assert code == 1 and "float64, but input 'x' expects float32" in err
    renamed = save(scaled_classifier(input_name="y"), tmp_path / "renamed.onnx")
    code, _, err = invoke("bench", str(models["identity"]), str(renamed), "--no-memory")
    assert code == 2 and "cannot be compared" in err
    code, _, err = invoke("bench", str(models["identity"]), "--markdown", str(models["identity"]))
    assert code == 2 and "refusing to overwrite" in err
    code, _, err = invoke("bench", str(models["identity"]), "--mean", "a,b")
    assert code == 2 and "comma-separated numbers" in err
    code, _, err = invoke("bench", str(models["identity"]), "--provider", "NoSuchProvider", "--no-memory")
    assert code == 2 and "not available" in err


def test_cli_help_states_the_defaults() -> None:
    code, out, _ = invoke("bench", "--help")
    assert code == 0
    for text in ("--data", "--batch", "0.875", "ImageNet", "1/255", "physical cores", "--opt-level", "--markdown"):
        assert text in out


def test_cli_bench_on_the_reference_model_with_labels() -> None:
    code, out, err = invoke(
        "bench", str(MODELS_DIR / "mnist_mobilenet.onnx"), "--data", str(MODELS_DIR / "mnist_calib.npz"),
        "--batch", "64", "--warmup", "0", "--repeat", "2", "--no-memory", "--json",
    )
    assert code == 0, err
    accuracy = json.loads(out)["models"][0]["accuracy"]
    assert accuracy["samples"] == 256 and accuracy["top1"] > 0.9


def test_time_interleaved_alternates_order_and_cycles_feeds() -> None:
    from onnxslim.bench import time_interleaved

    calls: list[tuple[str, int]] = []

    class FakeSession:
        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, _outputs: object, feeds: dict) -> None:
            calls.append((self.name, int(feeds["x"][0])))

    ticks = iter(range(10**6))
    feeds = [{"x": np.array([0])}, {"x": np.array([1])}]
    times = time_interleaved(
        [FakeSession("a"), FakeSession("b")], feeds, warmup=1, keep_going=lambda rounds, _spent: rounds < 3,
        clock=lambda: float(next(ticks)),
    )
    assert calls[:2] == [("a", 0), ("b", 0)]  # warm-up, untimed
    assert calls[2:] == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 0), ("b", 0)]
    assert times == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]  # one injected tick per timed run


def test_markdown_into_a_missing_folder_is_refused_before_any_work(tmp_path: Path) -> None:
    model = Path(__file__).parent.parent / "models" / "mnist_resnet.onnx"
    code, out, err = invoke("bench", str(model), "--repeat", "2", "--no-memory", "--markdown", str(tmp_path / "no" / "r.md"))
    assert (code, out) == (2, "") and "does not exist" in err
    code, out, err = invoke("bench", str(model), "--repeat", "2", "--no-memory", "--markdown", str(model))
    assert code == 2 and "refusing to overwrite the input model" in err
    report = tmp_path / "r.md"
    code, out, _ = invoke("bench", str(model), "--repeat", "2", "--no-memory", "--markdown", str(report))
    assert code == 0 and "speedup" in out and report.read_text().startswith("batch 1")


def test_labels_on_a_non_classifier_are_ignored_with_a_note(tmp_path: Path) -> None:
    from builders import conv_model  # output [1, 8, 10, 10]: a feature map, not class scores

    path = save(conv_model(), tmp_path / "detector.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "labelled.npz", x=rng.standard_normal((3, 4, 10, 10)).astype(np.float32), labels=np.arange(3))
    result = benchmark([path, path], data=tmp_path / "labelled.npz", options=FAST)
    assert all(m.accuracy is None for m in result.models)
    assert result.notes == ("labels ignored: output 'y' of shape [1, 8, 10, 10] is not a classifier's",)
    assert "note: labels ignored" in render_bench(result)


def test_speedup_spread_says_when_a_ratio_is_within_noise(models: dict[str, Path]) -> None:
    from dataclasses import replace

    from onnxslim.runtime import speedup_range as _speedup_range

    assert _speedup_range([1.0] * 20, [0.5] * 20) == (2.0, 2.0)  # twice as fast in every block
    steady, jumpy = [1.0] * 20, [0.8, 0.8, 0.8, 0.8, 1.3, 1.3, 1.3, 1.3, 1.0, 1.0] * 2  # same median, noisy blocks
    low, high = _speedup_range(steady, jumpy)
    assert low < 1.0 < high
    assert _speedup_range([1.0] * 5, [1.0] * 5) is None  # too few runs to judge
    result = benchmark([models["identity"], models["doubled"]], options=BenchOptions(warmup=1, repeat=10, memory=False))
    assert result.models[1].speedup_range is not None and result.models[0].speedup_range is None
    within = replace(result, models=(result.models[0], replace(result.models[1], speedup_range=(0.8, 1.2))))
    assert "doubled" in render_bench(within) and "is not a significant difference" in render_bench(within)
    clear = replace(result, models=(result.models[0], replace(result.models[1], speedup_range=(1.5, 1.7))))
    assert "not a significant difference" not in render_bench(clear) and "(1.50-1.70)" in render_bench(clear)
    assert json.loads(json.dumps(bench_json(within)))["models"][1]["speedup_range"] == [0.8, 1.2]


def test_a_ctc_readers_bench_shows_the_strings_unchanged(tmp_path: Path) -> None:
    """A sequence output: the table adds the share of decoded strings unchanged (with its sample count);
    logits doubled keep every string, the classifier's weights negated change them."""
    import onnx
    from builders import ctc_reader

    source = ctc_reader(steps=16, classes=12)
    doubled, negated = onnx.ModelProto(), onnx.ModelProto()
    doubled.CopyFrom(source)
    negated.CopyFrom(source)
    for model, factor in ((doubled, 2.0), (negated, -1.0)):
        matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
        for tensor in model.graph.initializer:
            if tensor.name in (matmul.input[1], *(n.input[1] for n in model.graph.node if n.op_type == "Add")):
                tensor.CopyFrom(onnx.numpy_helper.from_array(factor * onnx.numpy_helper.to_array(tensor), tensor.name))
    paths = [save(m, tmp_path / f"{name}.onnx") for name, m in (("reader", source), ("doubled", doubled), ("negated", negated))]
    np.savez(tmp_path / "lines.npz", input=np.random.default_rng(0).standard_normal((8, 1, 4, 16)).astype(np.float32))
    result = benchmark(paths, data=tmp_path / "lines.npz", data_options=DataOptions(batch=4), options=FAST)
    _, same, flipped = result.models
    assert same.fidelity is not None and same.fidelity.strings_unchanged == 1.0 and same.fidelity.samples == 8
    assert flipped.fidelity is not None and flipped.fidelity.strings_changed is not None and flipped.fidelity.strings_changed > 0
    text = render_bench(result)
    assert "strings unchanged" in text and "1.000 (n=8)" in text
    assert f"{flipped.fidelity.strings_unchanged:.3f} (n=8)" in text
    assert "strings unchanged" not in render_bench(benchmark(paths[:1], data=tmp_path / "lines.npz", options=FAST))
