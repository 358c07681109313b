"""`onnxslim optimize` and `onnxslim sweep` (optimizer/): the choice, the search bound, the files, the JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import ModelBuilder
from click.testing import CliRunner

from onnxslim.cli import cli
from onnxslim.evaluate import AccuracyBudget
from onnxslim.optimizer import OptimizeOptions, choose_final, default_budget
from onnxslim.optimizer import search as pipeline


def test_the_fastest_candidate_that_meets_the_budget_wins() -> None:
    name, why = choose_final(
        [("original", 1.0, True, None), ("pruned", 1.4, True, 1.3), ("int8", 2.1, True, 1.9)], 1.05
    )
    assert name == "int8" and "2.10x" in why
    candidates = [("original", 1.0, True, None), ("pruned", 1.4, True, 1.3), ("int8", 2.1, False, 1.9)]
    assert choose_final(candidates, 1.05)[0] == "pruned"


def test_never_worse_than_the_input() -> None:
    name, why = choose_final([("original", 1.0, True, None), ("pruned", 1.02, True, 1.0), ("int8", 3.0, False, 2.8)], 1.05)
    assert name == "original" and "not reliably 1.05x" in why
    name, why = choose_final([("original", 1.0, True, None), ("pruned", 1.8, False, 1.7)], 1.05)
    assert name == "original" and "no candidate met" in why


def test_a_speedup_within_the_runs_noise_does_not_count() -> None:
    """1.39x at the median, but as slow as the original in one block of the interleaved run (the detector a
    reviewer re-timed at 1.00x): the original is kept."""
    name, why = choose_final([("original", 1.0, True, None), ("int8", 1.39, True, 0.97)], 1.05)
    assert name == "original" and "0.97x" in why


def test_default_budget_is_half_a_point_with_labels_and_cosine_099_without() -> None:
    assert default_budget(OptimizeOptions(), True) == AccuracyBudget(max_drop=0.5)
    assert default_budget(OptimizeOptions(), False) == AccuracyBudget(min_fidelity=0.99)
    assert default_budget(OptimizeOptions(min_fidelity=0.9), True) == AccuracyBudget(min_fidelity=0.9)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"target_macs": 0.5, "target_speedup": 2.0}, "exclusive"),
        ({"prune": False, "quantize": False}, "nothing to do"),
        ({"prune": False, "target_macs": 0.5}, "need pruning"),
        ({"target_speedup": 0.8}, "above 1"),
    ],
)
def test_contradictory_options_are_usage_errors(fields: dict, message: str) -> None:
    from onnxslim.errors import UsageError

    with pytest.raises(UsageError, match=message):
        OptimizeOptions(**fields)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A small conv net whose channels are half redundant (so pruning with recovery keeps its outputs), with
    calibration and evaluation data."""
    b = ModelBuilder((3, 12, 12), seed=5)
    y = b.relu(b.conv(b.input, 16, k=3))  # protected: the first layer
    y = b.relu(b.conv(y, 32, k=3, bias=None))  # prunable, its 32 filters 16 distinct ones twice
    y = b.relu(b.conv(y, 32, k=3))  # prunable
    y = b.relu(b.conv(y, 16))  # protected: feeds the head
    model = b.build(b.conv(y, 8))
    second = model.graph.node[2]
    index = next(i for i, t in enumerate(model.graph.initializer) if t.name == second.input[1])
    weight = onnx.numpy_helper.to_array(model.graph.initializer[index])
    duplicated = np.concatenate([weight[:16]] * 2)
    model.graph.initializer[index].CopyFrom(onnx.numpy_helper.from_array(duplicated, second.input[1]))
    folder = tmp_path_factory.mktemp("pipeline")
    path = folder / "small.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(0)
    calib, evaluation = folder / "calib.npz", folder / "eval.npz"
    np.savez(calib, input=rng.standard_normal((64, 3, 12, 12)).astype(np.float32))
    np.savez(evaluation, input=rng.standard_normal((32, 3, 12, 12)).astype(np.float32))
    return path, calib, evaluation


def test_optimize_writes_every_output_and_a_valid_model(small: tuple[Path, Path, Path], tmp_path: Path) -> None:
    model, calib, evaluation = small
    out = tmp_path / "out"
    args = ["optimize", str(model), "-o", str(out), "--calib", str(calib), "--eval", str(evaluation),
            "--target-macs", "0.6", "--min-fidelity", "0.9", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"optimized.onnx", "pruned.onnx", "plan.json", "report.md", "report.json"} <= set(report["files"])
    assert sorted(p.name for p in out.iterdir()) == sorted(report["files"])
    assert json.loads((out / "report.json").read_text())["chosen"] == report["chosen"]
    names = [m["name"] for m in report["models"]]
    assert names[:2] == ["original", "pruned"] and report["chosen"] in names
    assert report["budget"]["min_fidelity"] == 0.9 and len(report["trials"]) == 1
    stages = report["stage_seconds"]  # where the time went: every stage that ran, adding up to the whole
    assert {"load", "analysis", "prune levels", "judging levels", "int8", "final measurement"} <= set(stages)
    assert all(seconds >= 0 for seconds in stages.values())
    assert sum(stages.values()) <= report["seconds"] + 1e-6 and sum(stages.values()) >= 0.8 * report["seconds"]
    for key in ("p50_ms", "p90_ms", "speedup", "size", "params", "macs", "accuracy", "fidelity", "peak_memory"):
        assert key in report["models"][0]
    assert report["models"][1]["macs"] < report["models"][0]["macs"]
    optimized = onnx.load(out / "optimized.onnx")
    onnx.checker.check_model(optimized)
    original = onnx.load(model)
    assert [i.name for i in optimized.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in optimized.graph.output] == [o.name for o in original.graph.output]
    markdown = (out / "report.md").read_text()
    assert "| model |" in markdown and "## Trials" in markdown and "onnxslim optimize" in markdown


def test_no_level_meeting_the_budget_without_int8_writes_the_original(small: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Nothing pruned nor quantized is a candidate: the original is written, validated at the data's shapes
    (was exit 4: no shapes to validate it with)."""
    model, calib, _ = small
    out = tmp_path / "out"
    args = ["optimize", str(model), "-o", str(out), "--calib", str(calib), "--no-quantize", "--max-trials", "1",
            "--min-fidelity", "0.99999", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["chosen"] == "original" and "pruned.onnx" not in report["files"]
    written = onnx.load(out / "optimized.onnx")
    onnx.checker.check_model(written)
    assert [o.name for o in written.graph.output] == [o.name for o in onnx.load(model).graph.output]


def test_the_search_is_bounded_and_keeps_the_original_when_nothing_is_faster(
    small: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An injected timer makes every candidate as slow as the original: optimized.onnx is the original."""
    model, calib, evaluation = small
    real = pipeline.benchmark

    def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
        bench = real(*args, **kwargs)
        return dataclasses.replace(bench, models=[dataclasses.replace(m, speedup=1.0) for m in bench.models])

    monkeypatch.setattr(pipeline, "benchmark", slow)
    options = OptimizeOptions(min_fidelity=0.8, quantize=False, max_trials=3)
    result = pipeline.optimize(model, calib, options, eval_data=evaluation)
    assert 1 <= len(result.trials) <= 3 and "at most 3 trials" in result.search
    assert result.chosen == "original" and "not reliably 1.05x" in result.reason
    assert result.model is not None
    original = pipeline.load_model(model).model
    assert result.model.SerializeToString() == original.SerializeToString()


def test_sweep_json(small: tuple[Path, Path, Path]) -> None:
    model, calib, evaluation = small
    args = ["sweep", str(model), "--calib", str(calib), "--eval", str(evaluation), "--target-macs", "1,0.5", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [p["target_macs"] for p in report["points"]] == [1.0, 0.5]
    for point in report["points"]:
        assert {"macs_kept", "quantized", "fidelity", "budget_met", "p50_ms", "speedup", "params", "size"} <= set(point)
    assert report["points"][0]["fidelity"] == pytest.approx(1.0) and report["points"][1]["macs_kept"] < 0.6
    assert report["points"][1]["params"] < report["original"]["params"]


def test_sensitivity_curves_are_measured_once_for_the_whole_search(
    small: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxslim.prune import sensitivity

    calls = []
    real = sensitivity.measure_curves

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sensitivity, "measure_curves", counted)
    monkeypatch.setattr("onnxslim.prune.pruner.measure_curves", counted)
    monkeypatch.setattr("onnxslim.optimizer.search.measure_curves", counted)
    model, calib, evaluation = small
    options = OptimizeOptions(min_fidelity=0.8, quantize=False, max_trials=3, allocate="sensitivity")
    result = pipeline.optimize(model, calib, options, eval_data=evaluation)
    assert len(result.trials) >= 2 and len(calls) == 1
    assert result.prune is None or result.prune.options.allocate == "sensitivity"


def test_without_eval_data_pruning_never_sees_the_samples_the_budget_is_checked_on(small: tuple[Path, Path, Path]) -> None:
    model, calib, _ = small
    options = OptimizeOptions(min_fidelity=0.5, quantize=False, target_macs=0.7)
    result = pipeline.optimize(model, calib, options)
    assert result.prune is not None and result.prune.recovery is not None
    assert result.prune.recovery.samples == 64 - 12  # the last 12 of 64 batches are the judge's
    assert "last 12 samples of --calib" in result.data or any("last 12 samples" in note for note in result.notes)


def test_target_speedup_keeps_the_least_pruned_level_that_reaches_it(
    small: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An injected timer: a model is 1 / (MACs kept) as fast as the original."""
    model, calib, evaluation = small
    monkeypatch.setattr(pipeline, "_speedup", lambda original, candidate, options: 1.0 / _macs_fraction(original, candidate))
    options = OptimizeOptions(target_speedup=1.6, quantize=False, max_trials=4, min_fidelity=0.0)
    result = pipeline.optimize(model, calib, options, eval_data=evaluation)
    assert 1 <= len(result.trials) <= 4
    reached = [t for t in result.trials if t.speedup is not None and t.speedup >= 1.6]
    assert reached and result.prune is not None
    kept = result.prune.macs_after / result.prune.macs_before
    assert kept == pytest.approx(max(t.macs_kept for t in reached))


def _macs_fraction(original: onnx.ModelProto, candidate: onnx.ModelProto) -> float:
    from onnxslim.analysis.cost import compute_cost
    from onnxslim.io import infer_tensor_infos

    shapes = {"input": (1, 3, 12, 12)}
    return compute_cost(candidate, infer_tensor_infos(candidate, shapes)).macs / compute_cost(
        original, infer_tensor_infos(original, shapes)
    ).macs


def test_labels_on_an_output_that_is_no_classifier_give_a_fidelity_budget(
    small: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Labels beside a non-classifier output are ignored; the default budget is then cosine 0.99, not a top-1
    drop it cannot measure (was exit 2, '--max-drop needs labels', with no --max-drop given). -q works too."""
    model, calib, _ = small
    labelled = tmp_path / "labelled.npz"
    data = dict(np.load(calib))
    np.savez(labelled, **data, labels=np.zeros(len(data["input"]), dtype=np.int64))
    args = ["optimize", str(model), "-o", str(tmp_path / "out"), "--calib", str(labelled), "--max-trials", "1",
            "--no-quantize", "--json", "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["budget"]["min_fidelity"] == 0.99


def test_a_model_with_nothing_to_prune_gets_no_pruned_model_or_plan(tmp_path: Path) -> None:
    """A Conv whose channels are the model's output cannot be cut: the prune removes nothing, and optimize
    writes neither pruned.onnx nor plan.json (it did, for magika's export)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["output"], name="conv", pads=[1, 1, 1, 1])], "one_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4, 8, 8])], [weight],
    )
    path, calib, out = tmp_path / "one.onnx", tmp_path / "calib.npz", tmp_path / "out"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    np.savez(calib, input=rng.standard_normal((32, 3, 8, 8)).astype(np.float32))
    result = CliRunner().invoke(cli, ["optimize", str(path), "-o", str(out), "--calib", str(calib), "--no-quantize",
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "pruned.onnx" not in report["files"] and "plan.json" not in report["files"]
    assert sorted(p.name for p in out.iterdir()) == sorted(report["files"])
    # no level is tried, nor timed as a "pruned" candidate, and the report says why
    assert report["trials"] == [] and [m["name"] for m in report["models"]] == ["original"]
    assert any(note.startswith("nothing to prune: none of its 1 channel group(s)") and "graph output" in note
               for note in report["notes"]), report["notes"]


def test_when_int8_does_not_pay_pruning_gets_the_whole_budget() -> None:
    """Levels judged with half the budget; int8 not kept: the failed levels are judged again with the whole
    budget (no new run), then the bisection goes deeper with the trials left, and the deepest passing wins."""
    from types import SimpleNamespace

    from onnxslim.evaluate import BudgetCheck
    from onnxslim.optimizer.config import Trial

    def fidelity(keep: float) -> float:  # a smooth loss: 0.995 at keep 0.5, 0.99 at keep 0.33
        return 1 - 0.0025 / keep

    def made(keep: float) -> SimpleNamespace:
        return SimpleNamespace(model=SimpleNamespace(keep=keep), macs_after=keep, macs_before=1.0)

    def check(model) -> BudgetCheck:  # the whole budget: cosine 0.99
        score = fidelity(model.keep)
        return BudgetCheck(score >= 0.99, score, None, "" if score >= 0.99 else "misses")

    asked: list[float] = []

    def level(keep: float):
        asked.append(keep)
        return made(keep), Trial(keep, keep, fidelity(keep), None, fidelity(keep) >= 0.995)

    # the half-budget search (cosine 0.995) passed 0.75 and failed 0.375 and 0.5625 -- as _search_budget would
    trials = [Trial(0.75, 0.75, fidelity(0.75), None, True), Trial(0.375, 0.375, fidelity(0.375), None, False),
              Trial(0.5625, 0.5625, fidelity(0.5625), None, True)]
    passed = [(0.75, made(0.75), 0), (0.5625, made(0.5625), 2)]
    failed = [(0.375, made(0.375), 1)]
    best, note = pipeline._deeper_without_int8(passed, failed, trials, 3, level, check)
    assert trials[1].pruned_met and trials[1].whole_budget  # 0.375 passes the whole budget (0.9933): re-judged
    assert asked and all(keep < 0.375 for keep in asked)  # new levels only below the deepest passing one
    assert best is not None and best.macs_after < 0.375 and fidelity(best.macs_after) >= 0.99
    assert all(t.whole_budget for t in trials[3:]) and len(trials) == 3 + len(asked) <= 6
    assert "whole budget" in note and "1 level(s) already pruned passed" in note
    # nothing deeper passes: None, and the search keeps its own answer
    none, _ = pipeline._deeper_without_int8(passed, [], list(trials[:1]), 0, level, lambda m: BudgetCheck(False, 0.5, None, "x"))
    assert none is None


def test_optimize_judges_a_ctc_readers_pruning_levels_and_int8_by_their_strings(tmp_path: Path) -> None:
    """Issue 23: on a sequence output the pruning trials and the final models are checked on the share of
    greedy-decoded strings unchanged (what a reader sees), counted on the held-out samples."""
    from builders import ctc_reader

    source = ctc_reader(depth=3, features=16, seed=3)
    model, calib = tmp_path / "reader.onnx", tmp_path / "lines.npz"
    onnx.save(source, model)
    lines = np.random.default_rng(0).standard_normal((100, 1, 4, 16)).astype(np.float32)
    np.savez(calib, input=lines)
    out = tmp_path / "out"
    args = ["optimize", str(model), "-o", str(out), "--calib", str(calib), "--batch", "10", "--target-macs", "0.7",
            "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    held = lines[80:]  # no --eval: the last fifth of the batches judges

    def strings(path: Path) -> list[tuple[int, ...]]:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        frames = np.argmax(session.run(None, {"input": held})[0], axis=2).T  # [T, N, C] -> [N, T]
        return [tuple(int(c) for t, c in enumerate(row) if c != 0 and (t == 0 or c != row[t - 1])) for row in frames]

    reference = strings(model)
    trial = report["trials"][0]
    assert trial["score_name"] == "strings unchanged" and trial["samples"] == len(held)
    pruned = next(m for m in report["models"] if m["name"] == "pruned")
    changed = sum(a != b for a, b in zip(reference, strings(out / "pruned.onnx"), strict=True))
    assert pruned["budget"]["score_name"] == "strings unchanged"
    assert pruned["fidelity"] == pytest.approx(1 - changed / len(held)) == pytest.approx(trial["pruned_score"])
    assert pruned["budget"]["met"] == (changed == 0)  # 20 samples: a 99% budget admits no changed string
    assert trial["pruned_met"] == (changed == 0)
    assert f"strings unchanged {1 - changed / len(held):.3f} (n=20)" in (out / "report.md").read_text()


def test_the_pruned_levels_warnings_reach_the_report(
    small: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the prune of the kept level warned about (a MAC budget taken from few groups) was on stderr only;
    optimize's report carries it too."""
    from onnxslim.prune import outcome

    monkeypatch.setattr(outcome, "_concentration", lambda *args: "the MAC budget falls on few groups: (injected)")
    model, calib, evaluation = small
    args = ["optimize", str(model), "-o", str(tmp_path / "out"), "--calib", str(calib), "--eval", str(evaluation),
            "--target-macs", "0.6", "--min-fidelity", "0.1", "--no-quantize", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    notes = json.loads(result.stdout)["notes"]
    assert "the pruned level: the MAC budget falls on few groups: (injected)" in notes, notes


@pytest.mark.parametrize(("threshold", "expected"), [(1.01, [0.55, 0.972]), (0.9, [0.55, 0.972, 0.761, 0.867, 0.919, 0.893])])
def test_a_failing_middle_probes_the_shallowest_level_before_walking_up(threshold: float, expected: list[float]) -> None:
    """Pruning that fails at every level (real exports: five levels for nothing) stops after the middle and
    the shallowest level; when the shallowest passes, the bisection goes on between them."""
    from types import SimpleNamespace

    from onnxslim.optimizer.config import Trial

    asked: list[float] = []

    def level(keep: float):
        asked.append(keep)
        met = keep >= threshold
        return SimpleNamespace(model=None, macs_after=keep, macs_before=1.0), Trial(keep, keep, keep, None, met)

    options = OptimizeOptions(min_fidelity=0.99, quantize=False, max_trials=6)
    pruned, _, trials = pipeline._search_budget(options, level, lambda r, t: (None, t), AccuracyBudget(min_fidelity=0.99))
    assert asked == expected and [t.target_macs for t in trials] == expected
    assert (pruned is None) == (threshold > 1)
