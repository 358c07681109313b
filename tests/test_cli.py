"""The command line: `inspect`, group options, exit codes and messages for bad input (no tracebacks)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from builders import constant_weights_model, conv_model
from click.testing import CliRunner
from conftest import LIGHT_DIR, MODELS_DIR
from test_prune_light import EXPECTED as LIGHT_GROUPS

from models.build import BUILDERS, write_models
from onnxslim import __version__
from onnxslim.cli import cli

INSPECT_KEYS = {"inputs", "outputs", "opsets", "ops", "params", "macs", "layers"}


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in result.stdout + result.stderr
    return result.exit_code, result.stdout, result.stderr


def inspect_json(path: Path, *extra: str) -> dict:
    code, out, err = invoke("inspect", str(path), "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def test_version_and_help() -> None:
    code, out, _ = invoke("--version")
    assert code == 0 and __version__ in out
    code, out, _ = invoke("inspect", "--help")
    assert code == 0 and "--input-shapes" in out


def test_inspect_every_light_model(light_model_name: str) -> None:
    info = inspect_json(LIGHT_DIR / light_model_name)
    assert INSPECT_KEYS <= info.keys()
    model = onnx.load(str(LIGHT_DIR / light_model_name))
    convs = sum(1 for n in model.graph.node if n.op_type in ("Conv", "Gemm"))
    mac_layers = [layer for layer in info["layers"] if layer["op_type"] in ("Conv", "Gemm")]
    assert len(mac_layers) == convs and all(layer["macs"] > 0 for layer in mac_layers)
    assert info["macs"] == sum(layer["macs"] for layer in info["layers"])
    assert info["params"] > 0 and info["opsets"] == {"ai.onnx": 9}
    assert info["weight_storage"]["computed"]["tensors"] > 0  # their weights are ConstantOfShape outputs
    groups, prunable, _ = LIGHT_GROUPS[light_model_name.removeprefix("light_").removesuffix(".onnx")]
    assert (len(info["groups"]), sum(g["prunable"] for g in info["groups"])) == (groups, prunable)
    assert all(g["prunable"] == (g["blocked_by"] is None) for g in info["groups"])
    assert all(g["blocked_by"]["reason"] for g in info["groups"] if g["blocked_by"])
    if "alexnet" in light_model_name:  # its two-group convs: prunable, in two blocks
        assert sum(g["blocks"] == 2 and g["prunable"] for g in info["groups"]) == 3


def test_inspect_text_report() -> None:
    code, out, _ = invoke("inspect", str(LIGHT_DIR / "light_squeezenet.onnx"))
    assert code == 0
    assert "MACs" in out and "Conv 26" in out and "top 10 layers by MACs" in out


def test_inspect_constant_node_model(tmp_path: Path) -> None:
    path = tmp_path / "paddle_style.onnx"
    onnx.save_model(constant_weights_model(), str(path))
    info = inspect_json(path)
    assert info["weight_storage"]["constant_nodes"]["tensors"] >= 2
    assert info["macs"] == 4 * 8 * 8 * 3 * 3 * 3  # one 3x3 conv, 3 -> 4 channels, 8x8 output
    assert info["inputs"][0]["shape"] == ["batch", 3, 8, 8]
    assert info["analysis_shapes"] == {"x": [1, 3, 8, 8]}
    # a larger batch for analysis scales the MACs
    assert inspect_json(path, "--input-shapes", "x:4,3,8,8")["macs"] == 4 * info["macs"]


@pytest.mark.parametrize("model_path", sorted(MODELS_DIR.glob("*.onnx")), ids=lambda p: p.stem)
def test_inspect_every_shipped_model(model_path: Path) -> None:
    info = inspect_json(model_path)
    assert info["macs"] > 0 and info["params"] > 0


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_inspect_every_benchmark_architecture(name: str, tmp_path: Path) -> None:
    (path,) = write_models(tmp_path, [name])
    info = inspect_json(path)
    assert info["macs"] > 1e8 and info["params"] > 1e6


def test_bad_inputs_exit_with_a_message(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    model = tmp_path / "m.onnx"
    onnx.save_model(conv_model(), str(model))
    cases = [
        ([str(tmp_path / "missing.onnx")], 1, "no such file"),
        ([str(tmp_path)], 1, "directory"),
        ([str(text)], 1, "not a readable ONNX model"),
        ([str(empty)], 1, "empty"),
        ([str(model), "--input-shapes", "nope:1,4,10,10"], 2, "not an input of the model"),
        ([str(model), "--input-shapes", "x:1,4,10"], 2, "rank 3 given"),
        ([str(model), "--input-shapes", "x:1,four"], 2, "whole numbers"),
    ]
    for args, code, message in cases:
        got_code, out, err = invoke("inspect", *args)
        assert (got_code, out) == (code, ""), (args, err)
        assert message in err, (args, err)


def test_symbolic_dims_without_shapes_name_the_input(tmp_path: Path) -> None:
    model = conv_model()
    for d, name in zip(model.graph.input[0].type.tensor_type.shape.dim, ["n", "c", "h", "w"], strict=True):
        d.dim_param = name
    path = tmp_path / "dynamic.onnx"
    onnx.save_model(model, str(path))
    code, _, err = invoke("inspect", str(path))
    assert code == 2 and "input 'x' has symbolic dims" in err and "--input-shapes x:" in err
    assert inspect_json(path, "--input-shapes", "x:1,4,10,10")["macs"] == 8 * 10 * 10 * 4 * 9


def test_no_user_or_environment_problem_reaches_exit_4(tmp_path: Path) -> None:
    """The bad-input corpus and the real-export cases of issue 15, through every command that can meet
    them: exit 1 (model or data) or 2 (usage, output path), with a one-line reason and nothing written."""
    from builders import conv_integer_model, paddle_dims_model, token_model

    text, empty, model = tmp_path / "notes.txt", tmp_path / "empty.onnx", tmp_path / "m.onnx"
    text.write_text("not a model\n")
    empty.write_bytes(b"")
    onnx.save_model(conv_model(), str(model))
    quantized, paddle, tokens = tmp_path / "int8.onnx", tmp_path / "paddle.onnx", tmp_path / "tokens.onnx"
    onnx.save_model(conv_integer_model(), str(quantized))
    onnx.save_model(paddle_dims_model(), str(paddle))
    onnx.save_model(token_model(hidden=True), str(tokens))
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    cases = [
        *(
            (command, [str(bad), *extra], 1, message)
            for bad, message in (
                (tmp_path / "missing.onnx", "no such file"), (tmp_path, "directory"),
                (text, "not a readable ONNX model"), (empty, "empty"),
            )
            for command, extra in (("inspect", []), ("prune", ["-o", str(out), "--ratio", "0.3"]), ("bench", []))
        ),
        ("inspect", [str(model), "--input-shapes", "nope:1,4,10,10"], 2, "not an input of the model"),
        ("inspect", [str(paddle)], 2, "--input-shapes x:<?>,3,<?>,<?>"),
        ("prune", [str(model), "-o", "/proc/x.onnx", "--ratio", "0.3"], 2, "cannot write /proc/x.onnx"),
        ("prune", [str(model), "-o", str(text / "o.onnx"), "--ratio", "0.3"], 2, "is a file, not a folder"),
        ("prune", [str(model), "-o", str(out), "--ratio", "0.3", "--plan-out", "/proc/p.json"], 2, "cannot write"),
        ("prune", [str(model), "-o", str(out), "--ratio", "0.3", "--exclude", "nothing*"], 2, "matches no node"),
        ("prune", [str(quantized), "-o", str(out), "--ratio", "0.3"], 1, "already quantized"),
        ("prune", [str(tokens), "-o", str(out), "--ratio", "0.3", "--input-shapes", "input_ids:1,16",
                   "--input-shapes", "token_type_ids:1,16"], 1, "the original model does not run on random inputs"),
        ("quantize", [str(model), "-o", "/proc/x.onnx", "--calib", "random"], 2, "cannot write /proc/x.onnx"),
        ("quantize", [str(quantized), "-o", str(out), "--calib", "random"], 1, "already quantized"),
        ("bench", [str(model), "--markdown", "/proc/x.md"], 2, "cannot write /proc/x.md"),
    ]
    for command, args, code, message in cases:
        got, stdout, stderr = invoke(command, *args)
        assert (got, stdout) == (code, ""), (command, args, stderr)
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]  # warnings may precede it
        assert len(errors) == 1 and message in errors[0], (command, args, stderr)
        assert "bug in onnxslim" not in stderr
    assert list(out.parent.iterdir()) == []


def test_quiet_after_the_subcommand_silences_warnings(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(constant_weights_model(), str(path))
    args = ["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--target-macs", "0.05", "--no-protect-first"]
    _, _, loud = invoke(*args)
    assert "cannot be met" in loud
    for quiet in ([*args, "-q"], ["-q", *args]):
        code, _, err = invoke(*quiet)
        assert code == 0 and err == "", err


def test_the_group_lists_every_command_and_each_loads_from_its_module() -> None:
    """`onnxslim --help` lists commands from `cli.COMMANDS` without importing them: every entry must name a
    module that defines that command, and every command must be listed."""
    import importlib

    import click

    from onnxslim.cli import COMMANDS

    for name, (module, summary) in COMMANDS.items():
        command = getattr(importlib.import_module(module), name)
        assert isinstance(command, click.Command) and command.help and summary
    text = CliRunner().invoke(cli, ["--help"]).output
    assert all(name in text for name in COMMANDS)
    assert CliRunner().invoke(cli, ["nosuchcommand"]).exit_code == 2


def test_help_does_not_load_onnx_or_onnxruntime() -> None:
    """Start-up stays cheap: the group's help imports no heavy library (measured: 0.06 s against ~1 s)."""
    import subprocess
    import sys

    code = (
        "import sys; from onnxslim.cli import main; sys.argv = ['onnxslim', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('onnx', 'onnxruntime', 'numpy', 'onnx_graphsurgeon') if m in sys.modules)\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_inspect_with_data_reports_every_float_tensor(tmp_path: Path) -> None:
    import numpy as np

    from onnxslim.cli import cli as group

    model = MODELS_DIR / "mnist_resnet.onnx"
    out = CliRunner().invoke(group, ["inspect", str(model), "--data", str(MODELS_DIR / "mnist_eval.npz"), "--batch", "100", "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["data"].endswith("(1000 samples)") and len(report["tensors"]) > 20
    logits = next(t for t in report["tensors"] if t["name"] == "logits")
    assert logits["values"] == 1000 * 10 and logits["nonfinite"] == 0 and np.isfinite(logits["outlier_ratio"])
    text = CliRunner().invoke(group, ["inspect", str(model), "--data", "random:4", "--top", "3"])
    assert text.exit_code == 0 and "widest ranges for their spread" in text.stdout
