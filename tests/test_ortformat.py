"""ortformat.py: the ORT-format model loads in onnxruntime and computes what the .onnx does; optimize
--format ort writes it with its required-operators config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from builders import ModelBuilder
from click.testing import CliRunner

from onnxslim.cli import cli
from onnxslim.ortformat import to_ort_format


def _model() -> onnx.ModelProto:
    b = ModelBuilder((3, 10, 10), seed=4)
    y = b.relu(b.bn(b.conv(b.input, 8, 3)))
    return b.build(b.conv(y, 4, 1))


def test_the_ort_format_model_computes_what_the_onnx_model_does(tmp_path: Path) -> None:
    model = _model()
    converted = to_ort_format(model, "small")
    path = tmp_path / "small.ort"
    path.write_bytes(converted.model)
    feeds = {"input": np.random.default_rng(0).standard_normal((2, 3, 10, 10)).astype(np.float32)}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    lines = converted.required_operators.splitlines()
    assert "# - small.ort" in lines and any(line.startswith("ai.onnx;") and "Conv" in line for line in lines)
    assert "/tmp" not in converted.required_operators  # no path of the machine that converted it


def test_optimize_format_ort_writes_the_ort_model_and_its_config(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path)
    data = tmp_path / "calib.npz"
    np.savez(data, input=np.random.default_rng(1).standard_normal((40, 3, 10, 10)).astype(np.float32))
    out = tmp_path / "out"
    args = ["optimize", str(path), "-o", str(out), "--calib", str(data), "--no-prune", "--threads", "1",
            "--format", "ort", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"optimized.onnx", "optimized.ort", "required_operators.config"} <= set(report["files"])
    assert report["threads"] == 1
    session = ort.InferenceSession(str(out / "optimized.ort"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == [o.name for o in onnx.load(path).graph.output]
    again = CliRunner().invoke(cli, args[:-3] + ["--json"])  # without --format ort: the earlier .ort goes
    assert again.exit_code == 0, again.output
    assert not (out / "optimized.ort").exists() and not (out / "required_operators.config").exists()
