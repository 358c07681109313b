"""`onnxslim prune` and the groups section of `onnxslim inspect`, through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from builders import ModelBuilder, conv_integer_model
from click.testing import CliRunner

from onnxslim import prune_model
from onnxslim.cli import cli
from onnxslim.errors import ValidationError

MODELS = Path(__file__).resolve().parent.parent / "models"
NO_PROTECT = ["--no-protect-first", "--no-protect-last"]  # the command line protects first and last by default
UNROUNDED = ["--round-to", "1"]  # ... and rounds to 8, which leaves these 4-8 channel test groups whole


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
    result = CliRunner().invoke(cli, ["prune", str(model_with_blocker), "-o", str(out), "--ratio", "0.5", *UNROUNDED, "--json"])
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
    result = CliRunner().invoke(cli, ["prune", str(model_with_blocker), "-o", str(out), "--ratio", "0.3", "--criterion", "l2", *NO_PROTECT, *UNROUNDED])
    assert result.exit_code == 0, result.output
    assert "5 found, 3 prunable, 3 pruned" in result.stdout
    assert "MACs" in result.stdout and "unsupported op LpNormalization" in result.stdout


def test_prune_round_to(model_with_blocker: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned.onnx"
    args = ["prune", str(model_with_blocker), "-o", str(out), *NO_PROTECT, "--ratio", "0.5", "--round-to", "3", "--json"]
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
    keys = {"id", "channels", "blocks", "sources", "sinks", "prunable", "blocked_by", "normalized_by", "heads", "width"}
    assert all(set(g) == keys for g in groups)
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
    from onnxslim.prune import pruner

    def fail(*args: object, **kwargs: object) -> None:
        raise ValidationError("boom")

    monkeypatch.setattr(pruner, "validate", fail)
    out = tmp_path / "pruned.onnx"
    result = CliRunner().invoke(cli, ["prune", str(model_with_blocker), "-o", str(out), "--ratio", "0.5", *UNROUNDED])
    assert result.exit_code == 4
    assert "boom" in result.stderr and not out.exists()


@pytest.mark.parametrize("name", ["mnist_resnet_bn", "mnist_mobilenet"])
def test_prune_trained_model_from_the_command_line(name: str, tmp_path: Path) -> None:
    path = MODELS / f"{name}.onnx"
    out = tmp_path / "pruned.onnx"
    result = CliRunner().invoke(cli, ["prune", str(path), "-o", str(out), "--ratio", "0.3", *UNROUNDED, "--json"])
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


def test_target_macs_json_keys_and_exclusive_budgets(model_with_blocker: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned.onnx"
    runner = CliRunner()
    result = runner.invoke(cli, ["prune", str(model_with_blocker), "-o", str(out), "--target-macs", "0.7", *NO_PROTECT, *UNROUNDED, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["target_macs"] == 0.7 and report["round_to"] == 1 and report["criterion"] == "l1"
    assert report["lossless_removed"] == 0 and report["plan"] is None and isinstance(report["budget_met"], bool)
    assert {"ratio", "macs_after", "blocked", "pruned"} <= set(report)
    both = runner.invoke(cli, ["prune", str(model_with_blocker), "-o", str(out), "--ratio", "0.3", "--target-macs", "0.5"])
    assert both.exit_code == 2 and "exclusive" in both.stderr
    assert runner.invoke(cli, ["prune", str(model_with_blocker), "-o", str(out)]).exit_code == 2


def test_unmeetable_budget_is_a_warning_and_budget_met_false(model_with_blocker: Path, tmp_path: Path) -> None:
    args = ["prune", str(model_with_blocker), "-o", str(tmp_path / "p.onnx"), "--target-macs", "0.05", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["budget_met"] is False
    assert "cannot be met" in result.stderr


def test_protection_is_on_by_default_and_says_why(model_with_blocker: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["prune", str(model_with_blocker), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    reasons = [entry["reason"] for entry in json.loads(result.stdout)["left_alone"]]
    assert any("--protect-first" in r for r in reasons) and any("--protect-last" in r for r in reasons)
    helptext = " ".join(CliRunner().invoke(cli, ["prune", "--help"]).stdout.split())
    assert "--no-protect-first" in helptext and "on by default" in helptext
    assert json.loads(result.stdout)["round_to"] == 8 and "1 disables rounding" in helptext


def test_exclude_min_keep_criteria_and_lossless_from_the_command_line(model_with_blocker: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["prune", str(model_with_blocker), "-o", str(tmp_path / "p.onnx"), *NO_PROTECT, *UNROUNDED, "--json"]
    excluded = json.loads(runner.invoke(cli, [*base, "--ratio", "0.5", "--exclude", "Conv"]).stdout)
    assert excluded["channels_removed"] == 0 and all("--exclude 'Conv'" in e["reason"] for e in excluded["left_alone"])
    kept = json.loads(runner.invoke(cli, [*base, "--ratio", "0.9", "--min-keep", "3"]).stdout)
    assert kept["pruned"] and all(entry["kept"] == 3 for entry in kept["pruned"])
    assert json.loads(runner.invoke(cli, [*base, "--ratio", "0.5", "--criterion", "bn"]).stdout)["criterion"] == "bn"
    lossless = runner.invoke(cli, [*base, "--lossless"])
    assert lossless.exit_code == 0 and json.loads(lossless.stdout)["lossless_removed"] == 0
    no_bn = runner.invoke(cli, ["prune", str(MODELS / "mnist_resnet.onnx"), "-o", str(tmp_path / "q.onnx"),
                                "--ratio", "0.3", "--criterion", "bn"])
    assert no_bn.exit_code == 2 and "fold" in no_bn.stderr


def test_saved_plan_reproduces_the_model_byte_for_byte(tmp_path: Path) -> None:
    source = MODELS / "mnist_resnet_bn.onnx"
    runner = CliRunner()
    first, second, third = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "c.onnx"
    plan = tmp_path / "plan.json"
    args = ["prune", str(source), "--target-macs", "0.6", "--round-to", "4"]
    assert runner.invoke(cli, [*args, "-o", str(first), "--plan-out", str(plan)]).exit_code == 0
    assert runner.invoke(cli, [*args, "-o", str(second)]).exit_code == 0
    replay = runner.invoke(cli, ["prune", str(source), "-o", str(third), "--plan", str(plan), "--json"])
    assert replay.exit_code == 0, replay.output
    assert json.loads(replay.stdout)["plan"] == str(plan)
    assert first.read_bytes() == second.read_bytes() == third.read_bytes()
    saved = json.loads(plan.read_text())
    assert saved["format"] == 1 and len(saved["model_sha256"]) == 64 and saved["target_macs"] == 0.6
    assert all(entry["removed"] == sorted(entry["removed"]) for entry in saved["groups"].values())
    other = runner.invoke(cli, ["prune", str(MODELS / "mnist_resnet.onnx"), "-o", str(third), "--plan", str(plan)])
    assert other.exit_code == 1 and "another model" in other.stderr


def test_plan_refuses_options_it_would_ignore_and_outputs_are_checked_first(tmp_path: Path) -> None:
    source = MODELS / "mnist_resnet.onnx"
    plan = tmp_path / "plan.json"
    runner = CliRunner()
    made = runner.invoke(cli, ["prune", str(source), "-o", str(tmp_path / "a.onnx"), "--ratio", "0.3", "--plan-out", str(plan)])
    assert made.exit_code == 0, made.output
    ignored = runner.invoke(cli, ["prune", str(source), "-o", str(tmp_path / "b.onnx"), "--plan", str(plan), "--criterion", "l2"])
    assert ignored.exit_code == 2 and "--criterion would have no effect" in ignored.output
    same = runner.invoke(cli, ["prune", str(source), "-o", str(plan), "--ratio", "0.3", "--plan-out", str(plan)])
    assert same.exit_code == 2 and "same file" in same.output
    missing = runner.invoke(cli, ["prune", str(source), "-o", str(tmp_path / "no" / "c.onnx"), "--ratio", "0.3"])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    assert not (tmp_path / "b.onnx").exists()


def test_prequantized_model_is_refused_naming_the_ops_and_inspect_says_so(tmp_path: Path) -> None:
    path = tmp_path / "dynamic.onnx"
    onnx.save(conv_integer_model(), path)
    out = tmp_path / "p.onnx"
    result = CliRunner().invoke(cli, ["prune", str(path), "-o", str(out), "--ratio", "0.3"])
    assert result.exit_code == 1 and not out.exists()
    assert "already quantized (DynamicQuantizeLinear x1, ConvInteger x1)" in result.stderr
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(path), "--json"]).stdout)
    assert info["quantized_ops"] == {"DynamicQuantizeLinear": 1, "ConvInteger": 1}
    text = CliRunner().invoke(cli, ["inspect", str(path)]).stdout
    assert "ConvInteger x1; prune and quantize refuse it" in text


def test_lossless_at_round_to_8_says_what_it_found_removed_and_why_the_rest_stayed(tmp_path: Path) -> None:
    from test_lossless import plant

    b = ModelBuilder((3, 8, 8))
    y = b.relu(b.conv(b.input, 8, 3))  # protected: the first layer
    y = b.relu(b.conv(y, 64, 3))  # 10 dead channels planted: 54 left, rounded up to 56 kept, so 8 of 10 go
    y = b.relu(b.conv(y, 16, 3))  # no dead channels: left whole, and listed as such
    y = b.relu(b.conv(y, 8, 3))  # protected: feeds the last layer
    model = plant(b.build(b.conv(y, 4)), 1, range(10))
    path, out = tmp_path / "dead.onnx", tmp_path / "p.onnx"
    onnx.save(model, path)
    result = CliRunner().invoke(cli, ["prune", str(path), "-o", str(out), "--lossless", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["lossless_found"], report["lossless_removed"]) == (10, 8)
    (kept,) = report["lossless_kept"]
    assert (kept["found"], kept["removed"]) == (10, 8) and "--round-to 8: keeps 56 of 64" in kept["reason"]
    reasons = {entry["group"]: entry["reason"] for entry in report["left_alone"]}
    assert len(reasons) == 3 and "no dead or constant channels to remove" in reasons.values()
    text = CliRunner().invoke(cli, ["prune", str(path), "-o", str(out), "--lossless"]).stdout
    assert "10 dead/constant channels found, 8 removed" in text and "keeps 56 of 64" in text


def test_left_alone_lists_groups_that_rounding_leaves_whole(model_with_blocker: Path, tmp_path: Path) -> None:
    args = ["prune", str(model_with_blocker), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.3", *NO_PROTECT, "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["pruned_groups"] == 0  # 8-channel groups: 30% off rounds back up to 8
    reasons = [entry["reason"] for entry in report["left_alone"]]
    assert len(reasons) == report["prunable_groups"] == 3
    assert all("--round-to 8 keeps all" in reason for reason in reasons)


def test_a_budget_that_falls_on_few_groups_is_a_warning(tmp_path: Path) -> None:
    b = ModelBuilder((3, 16, 16))
    y = b.relu(b.conv(b.input, 16, 3))
    y = b.relu(b.conv(y, 32, 3))  # the only group a budget may cut: its consumer below is blocked
    y = b.op("LpNormalization", [b.conv(y, 64, 3)], axis=1)  # the heavy conv's outputs are blocked
    path = tmp_path / "m.onnx"
    onnx.save(b.build(b.conv(y, 4)), path)
    args = ["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--target-macs", "0.5", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    notes = json.loads(result.stdout)["notes"]
    assert len(notes) == 1 and "the MAC budget falls on few groups" in notes[0] and "keeps 8 of 32" in notes[0]
    assert "falls on few groups" in result.stderr


def test_blocked_reasons_show_the_root_cause_and_the_chain_only_with_verbose(model_with_blocker: Path) -> None:
    from dataclasses import replace

    from onnxslim.analysis.groups import Blocker
    from onnxslim.model_info import inspect_model
    from onnxslim.report.groups import render_groups

    groups = inspect_model(model_with_blocker).groups
    nested = "unsupported op LpNormalization"
    for level in range(12):  # as a recognizer's joins nest them
        nested = f"operand 1 varies along the channel axis, but its channels could not be followed (Add_{level}: {nested})"
    blocked = replace(groups[0], blocked_by=Blocker("Add_99", nested))
    short = render_groups([blocked])
    assert "blocked at Add_0: unsupported op LpNormalization (through 12 joins; --verbose for the chain)" in short
    assert max(len(line) for line in short.splitlines()) < 200
    assert "Add_11" in render_groups([blocked], verbose=True) and "Add_11" not in short


def test_prune_with_calibration_reports_recovery_and_fidelity(tmp_path: Path) -> None:
    out = tmp_path / "pruned.onnx"
    args = ["prune", str(MODELS / "mnist_mobilenet.onnx"), "-o", str(out), "--target-macs", "0.7",
            "--calib", str(MODELS / "mnist_calib.npz"), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["criterion"] == "activation" and report["recover"] == "lsq"
    layers = report["recovery"]["layers"]
    assert layers and {layer["method"] for layer in layers} <= {"lsq", "bias", "none"}
    assert all(layer["error_after"] <= layer["error_before"] * (1 + 1e-6) + 1e-12 for layer in layers)
    evaluation = report["evaluation"]
    assert evaluation["samples"] == 256 // 5 and evaluation["accuracy_after"] > evaluation["accuracy_before"]
    assert evaluation["outputs"][0]["cosine_after"] > 0.9 and not evaluation["collapsed"]


def test_prune_reports_the_strings_of_a_ctc_reader_beside_its_cosine(tmp_path: Path) -> None:
    """On a sequence output the held-out comparison adds the share of decoded strings unchanged, before and
    after recovery, counted on every fifth sample (what recovery held out)."""
    import numpy as np
    import onnxruntime as ort
    from builders import ctc_reader

    model, calib, out = tmp_path / "reader.onnx", tmp_path / "lines.npz", tmp_path / "pruned.onnx"
    onnx.save(ctc_reader(depth=3, features=16, seed=3), model)
    lines = np.random.default_rng(0).standard_normal((100, 1, 4, 16)).astype(np.float32)
    np.savez(calib, input=lines)
    args = ["prune", str(model), "-o", str(out), "--target-macs", "0.7", "--calib", str(calib)]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.stdout)["evaluation"]
    held = lines[4::5]

    def strings(path: Path) -> list[tuple[int, ...]]:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        frames = np.argmax(session.run(None, {"input": held})[0], axis=2).T  # [T, N, C] -> [N, T]
        return [tuple(int(c) for t, c in enumerate(row) if c != 0 and (t == 0 or c != row[t - 1])) for row in frames]

    changed = sum(a != b for a, b in zip(strings(model), strings(out), strict=True))
    output = evaluation["outputs"][0]
    assert evaluation["samples"] == len(held) and output["strings_after"] == pytest.approx(1 - changed / len(held))
    assert output["strings_before"] is not None and output["cosine_after"] <= 1.0
    text = CliRunner().invoke(cli, args).stdout
    assert "strings unchanged " in text
    assert f"{output['strings_after']:.3f}" in text and "strings unchanged: share of samples" in text


@pytest.mark.parametrize("extra", [["--criterion", "activation"], ["--recover", "lsq"], ["--eval", "random"]])
def test_data_options_without_calibration_data_are_usage_errors(extra: list[str], tmp_path: Path) -> None:
    out = tmp_path / "pruned.onnx"
    result = CliRunner().invoke(cli, ["prune", str(MODELS / "mnist_resnet.onnx"), "-o", str(out), "--ratio", "0.3", *extra])
    assert result.exit_code == 2 and "--calib" in result.output and not out.exists()


def test_one_graph_import_and_one_validation_per_prune(
    model_with_blocker: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model is imported into onnx-graphsurgeon once, and the written model is validated once: by the
    library, whose record `write_validated` accepts, not again before writing."""
    import onnx_graphsurgeon as gs

    from onnxslim import io as slim_io
    from onnxslim.prune import pruner

    imports: list[object] = []
    validations: list[object] = []
    real_import, real_validate = gs.import_onnx, pruner.validate

    def count_import(model: onnx.ModelProto) -> object:
        imports.append(model)
        return real_import(model)

    def count_validate(*args: object, **kwargs: object) -> object:
        validations.append(args[0])
        return real_validate(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(gs, "import_onnx", count_import)
    monkeypatch.setattr(pruner, "validate", count_validate)
    monkeypatch.setattr(slim_io, "validate", count_validate)
    out = tmp_path / "pruned.onnx"
    result = CliRunner().invoke(cli, ["prune", str(model_with_blocker), "-o", str(out), "--ratio", "0.5", *UNROUNDED])
    assert result.exit_code == 0, result.output
    assert len(imports) == 1 and len(validations) == 1
    assert onnx.load(out).graph.node  # written
    # a model the command changes after the library validated it (--fix-shapes) is validated again
    validations.clear()
    fixed = CliRunner().invoke(
        cli, ["prune", str(model_with_blocker), "-o", str(out), "--ratio", "0.5", *UNROUNDED, "--fix-shapes"]
    )
    assert fixed.exit_code == 0, fixed.output
    assert len(validations) == 2


def test_many_groups_left_alone_are_counted_by_reason_and_listed_with_verbose(tmp_path: Path) -> None:
    """Fourteen 8-channel groups that --ratio 0.3 rounds back to 8: a count per reason, not fourteen rows."""
    b = ModelBuilder((3, 8, 8))
    y = b.input
    for _ in range(15):
        y = b.relu(b.conv(y, 8, 3))
    path = tmp_path / "m.onnx"
    onnx.save(b.build(b.conv(y, 4)), path)
    args = ["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.3", *NO_PROTECT]
    text = CliRunner().invoke(cli, args)
    assert text.exit_code == 0, text.output
    assert "left alone 15 groups (--verbose or --json lists them):" in text.stdout
    assert "   15  --round-to 8 keeps all its channels (the cut rounds to zero)" in text.stdout
    assert "Conv_" not in text.stdout.split("left alone")[1].split("\n\n")[0]  # no row per group
    verbose = CliRunner().invoke(cli, ["-v", *args])
    assert verbose.exit_code == 0, verbose.output
    rows = [line for line in verbose.stdout.splitlines() if "keeps all its channels" in line]
    assert len(rows) == 15
    listed = json.loads(CliRunner().invoke(cli, [*args, "--json"]).stdout)["left_alone"]
    assert len(listed) == 15


def test_a_collapsed_prune_warns_on_stderr_in_json_mode_too(tmp_path: Path) -> None:
    b = ModelBuilder((3, 12, 12))
    y = b.relu(b.conv(b.input, 32, 3))
    y = b.relu(b.conv(y, 32, 3))
    path = tmp_path / "m.onnx"
    onnx.save(b.build(b.conv(y, 8)), path)
    args = ["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.9", "--round-to", "1", *NO_PROTECT,
            "--recover", "none", "--calib", "random:40", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["evaluation"]["collapsed"] is True
    assert "the pruned model no longer works" in result.stderr
