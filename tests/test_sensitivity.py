"""`onnxslim sensitivity` and `prune --allocate sensitivity` (prune/sensitivity.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxslim.calib import open_dataset
from onnxslim.cli import cli
from onnxslim.io import normalize_model
from onnxslim.prune import PruneOptions, measure_sensitivity, prune_model
from onnxslim.prune.plan import BUDGET_TOLERANCE


def harmless_and_vital() -> onnx.ModelProto:
    """x → convA (16) → Relu → convB (8) → Relu → convC (32, 3×3) → y. Group A is harmless: convB all but
    ignores its channels 4–15 (weights × 1e-4), so three quarters of A can go for free. Group B is vital:
    convC reads all eight of its channels with equal, independent weights — and cutting B saves the most MACs
    per channel (convC is the heaviest layer), so an allocation blind to damage would cut B first."""
    rng = np.random.default_rng(0)
    wa = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    wb = rng.standard_normal((8, 16, 3, 3)).astype(np.float32) / 4
    wb[:, 4:] *= 1e-4
    wc = rng.standard_normal((32, 8, 3, 3)).astype(np.float32) / 4
    inits = [numpy_helper.from_array(v, n) for n, v in (("wa", wa), ("wb", wb), ("wc", wc))]
    inits += [numpy_helper.from_array(np.full(c, 0.1, np.float32), f"b{n}") for n, c in (("a", 16), ("b", 8), ("c", 32))]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="convA", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"], name="reluA"),
        helper.make_node("Conv", ["ra", "wb", "bb"], ["b"], name="convB", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["rb"], name="reluB"),
        helper.make_node("Conv", ["rb", "wc", "bc"], ["y"], name="convC", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "harmless_and_vital", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, 8, 8])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("sensitivity")
    model = folder / "model.onnx"
    onnx.save(harmless_and_vital(), model)
    data = folder / "calib.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((80, 3, 8, 8)).astype(np.float32))
    return model, data


def _calib(files: tuple[Path, Path]):  # type: ignore[no-untyped-def]
    return open_dataset(files[1], normalize_model(onnx.load(files[0]))[0])


def test_sensitivity_ranks_the_vital_group_first(files: tuple[Path, Path]) -> None:
    curves = measure_sensitivity(
        onnx.load(files[0]), PruneOptions(ratio=0.0, criterion="activation", recover="lsq"), calib=_calib(files),
        ratios=(0.25, 0.5),
    )
    order = [g.group for g in curves.groups]
    assert order == ["convB", "convA"]
    vital, harmless = curves.groups
    assert harmless.worst_damage < 1e-3 < vital.worst_damage
    assert [p.removed for p in vital.points] == [2, 4] and curves.trials == 4
    assert curves.samples == 16  # every fifth of 80 calibration samples, held out


def test_allocation_spares_the_vital_group_and_meets_the_budget(files: tuple[Path, Path]) -> None:
    options = PruneOptions(target_macs=0.75, criterion="activation", allocate="sensitivity")
    result = prune_model(onnx.load(files[0]), options, calib=_calib(files))
    assert result.budget_met and result.macs_after / result.macs_before <= 0.75 + BUDGET_TOLERANCE
    assert "convB" not in result.plan.kept  # the vital group keeps every channel
    assert len(result.plan.kept["convA"]) <= 6
    assert result.sensitivity is not None and result.sensitivity.trials == 6  # two groups × 25, 50, 75%


def test_sensitivity_json_schema_and_plot(files: tuple[Path, Path], tmp_path: Path) -> None:
    plot = tmp_path / "curves.png"
    args = ["sensitivity", str(files[0]), "--calib", str(files[1]), "--ratios", "0.5,0.25", "--json", "--plot", str(plot)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ratios"] == [0.25, 0.5] and report["recover"] == "lsq" and report["criterion"] == "activation"
    assert report["accuracy_original"] is None and report["forward_passes"] >= report["trials"] == 4
    assert [g["group"] for g in report["groups"]] == ["convB", "convA"]
    for group in report["groups"]:
        assert set(group) == {"group", "channels", "macs", "points"} and group["macs"] > 0
        assert [set(p) for p in group["points"]] == [{"ratio", "removed", "cosine", "accuracy"}] * 2
        assert all(p["accuracy"] is None and 0 < p["cosine"] <= 1 for p in group["points"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ratios", "0.5,1.2"], "between 0 and 1"),
        (["--ratios", "half"], "comma-separated"),
    ],
)
def test_bad_ratios_are_usage_errors(files: tuple[Path, Path], args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["sensitivity", str(files[0]), "--calib", str(files[1]), *args])
    assert result.exit_code == 2 and message in result.output


def test_allocate_sensitivity_needs_data_and_a_mac_budget(files: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    base = ["prune", str(files[0]), "-o", str(out), "--allocate", "sensitivity"]
    no_data = CliRunner().invoke(cli, [*base, "--target-macs", "0.5"])
    assert no_data.exit_code == 2 and "--calib" in no_data.output
    no_budget = CliRunner().invoke(cli, [*base, "--ratio", "0.5", "--calib", str(files[1])])
    assert no_budget.exit_code == 2 and "--target-macs" in no_budget.output and not out.exists()
