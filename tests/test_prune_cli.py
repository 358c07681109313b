"""`onnxslim prune` and the groups section of `onnxslim inspect`, through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from builders import ModelBuilder
from click.testing import CliRunner

from onnxslim import prune_model
from onnxslim.cli import cli
from onnxslim.errors import ValidationError

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture
def model_with_blocker(tmp_path: Path) -> Path:
    b = ModelBuilder((3, 8, 8))
    x = b.relu(b.bn(b.conv(b.input, 8, 3)))
    y = b.op("LpNormalization", [b.conv(x, 6, 3)], axis=1)
    y = b.se(b.relu(b.conv(y, 8, 3)), 4)
    path = tmp_path / "model.onnx"
    onnx.save(b.build(b.conv(y, 4)), path)
    return path


def test_prune_json_and_output(model_with_blocker: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned.onnx"
    result = CliRunner().invoke(cli, ["prune", str(model_with_blocker), "-o", str(out), "--ratio", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in ("macs_before", "macs_after", "params_before", "params_after", "groups", "prunable_groups",
                "channels_removed", "blocked"):
        assert key in report
    assert report["macs_after"] < report["macs_before"]
    assert report["groups"] == 5 and report["prunable_groups"] == 3
    assert {"group", "node", "reason"} <= set(report["blocked"][0])
    assert any(b["reason"] == "unsupported op LpNormalization" for b in report["blocked"])
    saved = onnx.load(out)
    onnx.checker.check_model(saved)
    assert saved.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_prune_text_summary(model_with_blocker: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned.onnx"
    result = CliRunner().invoke(cli, ["prune", str(model_with_blocker), "-o", str(out), "--ratio", "0.3", "--criterion", "l2"])
    assert result.exit_code == 0, result.output
    assert "5 found, 3 prunable, 3 pruned" in result.stdout
    assert "MACs" in result.stdout and "unsupported op LpNormalization" in result.stdout


def test_prune_round_to(model_with_blocker: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned.onnx"
    args = ["prune", str(model_with_blocker), "-o", str(out), "--ratio", "0.5", "--round-to", "3", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    saved = onnx.load(out)
    first = next(t for t in saved.graph.initializer if t.name == saved.graph.node[0].input[1])
    assert first.dims[0] == 6  # 8 channels, 4 removed, 4 kept rounded up to 6
    assert CliRunner().invoke(cli, [*args[:-3], "--round-to", "0"]).exit_code == 2


def test_inspect_lists_groups_and_names_the_blocker(model_with_blocker: Path) -> None:
    text = CliRunner().invoke(cli, ["inspect", str(model_with_blocker)])
    assert text.exit_code == 0, text.output
    assert "channel groups  5 found, 3 prunable" in text.stdout
    assert "unsupported op LpNormalization" in text.stdout
    data = json.loads(CliRunner().invoke(cli, ["inspect", str(model_with_blocker), "--json"]).stdout)
    groups = data["groups"]
    assert len(groups) == 5
    blocked = [g for g in groups if not g["prunable"]]
    assert any(g["blocked_by"]["reason"] == "unsupported op LpNormalization" for g in blocked)
    assert all(set(g) == {"id", "channels", "sources", "sinks", "prunable", "blocked_by"} for g in groups)
    assert all(g["blocked_by"] is None for g in groups if g["prunable"])


def test_usage_errors(model_with_blocker: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["prune", str(model_with_blocker), "-o", str(tmp_path / "o.onnx"), "--ratio", "1"]).exit_code == 2
    assert runner.invoke(cli, ["prune", str(model_with_blocker), "--ratio", "0.5"]).exit_code == 2
    refused = runner.invoke(cli, ["prune", str(model_with_blocker), "-o", str(model_with_blocker), "--ratio", "0.5"])
    assert refused.exit_code == 2 and "refusing to overwrite" in refused.stderr


def test_validation_failure_exits_4_and_writes_nothing(
    model_with_blocker: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxslim.prune import rewrite

    def fail(*args: object) -> None:
        raise ValidationError("boom")

    monkeypatch.setattr(rewrite, "validate", fail)
    out = tmp_path / "pruned.onnx"
    result = CliRunner().invoke(cli, ["prune", str(model_with_blocker), "-o", str(out), "--ratio", "0.5"])
    assert result.exit_code == 4
    assert "boom" in result.stderr and not out.exists()


@pytest.mark.parametrize("name", ["mnist_resnet_bn", "mnist_mobilenet"])
def test_prune_trained_model_from_the_command_line(name: str, tmp_path: Path) -> None:
    path = MODELS / f"{name}.onnx"
    out = tmp_path / "pruned.onnx"
    result = CliRunner().invoke(cli, ["prune", str(path), "-o", str(out), "--ratio", "0.3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["macs_after"] < 0.8 * report["macs_before"] and out.exists()


def test_library_entry_point_accepts_a_path(model_with_blocker: Path) -> None:
    result = prune_model(model_with_blocker, ratio=0.5)
    assert result.channels_removed > 0 and result.size_after < result.size_before


def test_symbolic_batch_is_kept_unless_fix_shapes(tmp_path: Path) -> None:
    source = MODELS / "mnist_resnet.onnx"
    kept, fixed = tmp_path / "kept.onnx", tmp_path / "fixed.onnx"
    runner = CliRunner()
    assert runner.invoke(cli, ["prune", str(source), "-o", str(kept), "--ratio", "0.2"]).exit_code == 0
    args = ["prune", str(source), "-o", str(fixed), "--ratio", "0.2", "--fix-shapes", "--input-shapes", "input:8,1,28,28"]
    assert runner.invoke(cli, args).exit_code == 0

    def input_dims(path: Path) -> list[int | str]:
        dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]

    assert input_dims(kept) == ["batch", 1, 28, 28]
    assert input_dims(fixed) == [8, 1, 28, 28]
