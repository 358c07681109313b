"""Budgets (`--target-macs`, min-keep, round-to), eligibility (exclude, protect) and plan files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import ModelBuilder, encoder_model
from oracle import assert_outputs_close, check_weight_shapes, masked_model, run_model

from models.build import BUILDERS
from onnxslim.analysis.cost import compute_cost
from onnxslim.errors import ModelLoadError
from onnxslim.io import infer_tensor_infos, normalize_model, random_inputs
from onnxslim.prune import PruneOptions, prune_model
from onnxslim.prune.plan import MacModel, eligible_groups, load_plan, save_plan


def chain_with_concat() -> onnx.ModelProto:
    """conv(16) → relu → [conv(12) ‖ conv(20)] → concat → conv(8) → relu → conv(4): segments of 12 and 20."""
    b = ModelBuilder((3, 8, 8))
    x = b.relu(b.conv(b.input, 16, 3))
    y = b.concat(b.relu(b.conv(x, 12, 3)), b.relu(b.conv(x, 20, 1)))
    return b.build(b.conv(b.relu(b.conv(y, 8, 3)), 4))


def mostly_blocked() -> onnx.ModelProto:
    """One big conv whose channels reach the output: only a small group can be pruned."""
    b = ModelBuilder((3, 16, 16))
    x = b.relu(b.conv(b.input, 4, 3))
    return b.build(b.conv(x, 64, 3))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_target_macs_half_lands_within_three_points_on_the_bench_architectures(name: str) -> None:
    model = normalize_model(BUILDERS[name](0))[0]
    result = prune_model(model, target_macs=0.5, protect_first=True, protect_last=True)
    kept = result.macs_after / result.macs_before
    assert abs(kept - 0.5) <= 0.03, kept
    assert result.budget_met
    if name == "resnet18_like":  # the pruned model is the masked model, and the weights have the kept shapes
        oracle = masked_model(model, result.groups, result.plan, result.analysis_shapes)
        feeds = random_inputs(model, result.analysis_shapes, seed=1)
        assert_outputs_close(run_model(result.model, feeds), run_model(oracle, feeds), 1e-3)
        check_weight_shapes(result.model, result.groups, result.plan)


def test_mac_model_is_exact_for_any_plan() -> None:
    model = normalize_model(chain_with_concat())[0]
    result = prune_model(model, ratio=0.4)
    infos = infer_tensor_infos(model, result.analysis_shapes)
    estimate = MacModel(result.groups, {layer.name: layer.macs for layer in compute_cost(model, infos).layers})
    removed = {g.id: len(result.plan.removed(g)) for g in result.groups}
    assert estimate.macs_after(removed) == pytest.approx(result.macs_after, rel=1e-9)
    assert estimate.macs_after({}) == pytest.approx(result.macs_before, rel=1e-9)


def test_an_unmeetable_budget_is_met_as_far_as_possible_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="onnxslim"):
        result = prune_model(mostly_blocked(), target_macs=0.1)
    assert not result.budget_met
    assert "cannot be met" in caplog.text
    assert result.macs_after < result.macs_before  # as far as possible: the small group kept one channel
    assert all(len(result.plan.kept[g]) == 1 for g in result.plan.kept)


def test_target_macs_respects_round_to_and_min_keep_per_concat_segment() -> None:
    model = normalize_model(chain_with_concat())[0]
    for options in (PruneOptions(target_macs=0.4, round_to=4), PruneOptions(ratio=0.9, round_to=4, min_keep=5)):
        result = prune_model(model, options)
        segments = [g for g in result.groups if g.prunable]
        assert {g.channels for g in segments} >= {12, 20}  # the Concat's segments are groups of their own
        for group in segments:
            kept = len(result.plan.kept.get(group.id, range(group.channels)))
            assert kept % 4 == 0 or kept == group.channels, (group.id, kept)
            assert kept >= min(options.min_keep, group.channels)
    result = prune_model(model, ratio=0.9, min_keep=3)
    assert all(len(kept) == 3 for kept in result.plan.kept.values())


def test_exclude_by_glob_and_by_op_type_and_protect_first_last() -> None:
    model = normalize_model(chain_with_concat())[0]
    result = prune_model(model, ratio=0.5)
    groups = [g for g in result.groups if g.prunable]
    outputs = [o.name for o in model.graph.output]
    first = groups[0].sources[0].node
    eligible, reasons = eligible_groups(result.groups, outputs, exclude=(first,), protect_first=False, protect_last=False)
    assert first not in {s.node for g in groups if g.id in eligible for s in g.sources}
    assert "--exclude" in reasons[groups[0].id]
    eligible, _ = eligible_groups(result.groups, outputs, exclude=("Conv",), protect_first=False, protect_last=False)
    assert not eligible
    eligible, reasons = eligible_groups(result.groups, outputs, exclude=("Conv_*",), protect_first=False, protect_last=False)
    assert not eligible and all("Conv_*" in why for why in reasons.values())
    eligible, reasons = eligible_groups(result.groups, outputs, protect_first=True, protect_last=True)
    last = groups[-1]  # conv(8) → relu → conv(4, the head): the group of 8 feeds the head
    assert "--protect-first" in reasons[groups[0].id] and "--protect-last" in reasons[last.id]
    assert eligible == {g.id for g in groups} - {groups[0].id, last.id}
    pruned = prune_model(model, ratio=0.5, protect_first=True, protect_last=True)
    assert set(pruned.plan.kept) == eligible and set(pruned.left_alone) == {groups[0].id, last.id}


def test_resnet_protect_last_keeps_the_group_feeding_the_classifier() -> None:
    model = normalize_model(BUILDERS["resnet18_like"](0))[0]
    eligible, reasons = eligible_groups(
        prune_model(model, ratio=0.0).groups, [o.name for o in model.graph.output]
    )
    gemm = next(n.name for n in model.graph.node if n.op_type == "Gemm")
    protected = [gid for gid, why in reasons.items() if "protect-last" in why]
    groups = {g.id: g for g in prune_model(model, ratio=0.0).groups}
    assert protected and all(any(s.node == gemm for s in groups[gid].sinks) for gid in protected)


def test_plan_file_round_trip_and_refusals(tmp_path: Path) -> None:
    model = normalize_model(chain_with_concat())[0]
    result = prune_model(model, target_macs=0.5)
    path = tmp_path / "plan.json"
    save_plan(path, result.plan, result.groups, result.model_sha256, {"criterion": "l1"})
    assert load_plan(path, result.groups, result.model_sha256) == result.plan
    with pytest.raises(ModelLoadError, match="another model"):
        load_plan(path, result.groups, "0" * 64)
    text = path.read_text()
    gid = next(iter(result.plan.kept))
    channels = next(g.channels for g in result.groups if g.id == gid)
    path.write_text(text.replace(f'"channels": {channels}', f'"channels": {channels + 1}', 1))
    with pytest.raises(ModelLoadError, match="does not match"):
        load_plan(path, result.groups, result.model_sha256)
    path.write_text(text)
    applied = prune_model(model, plan_path=str(path))
    assert applied.plan == result.plan
    assert applied.model.SerializeToString() == result.model.SerializeToString()


def test_the_same_options_give_the_same_bytes() -> None:
    model = normalize_model(chain_with_concat())[0]
    first = prune_model(model, target_macs=0.6, criterion="random", seed=3)
    second = prune_model(model, target_macs=0.6, criterion="random", seed=3)
    assert first.model.SerializeToString() == second.model.SerializeToString()
    other = prune_model(model, target_macs=0.6, criterion="random", seed=4)
    assert other.plan != first.plan
    assert np.isfinite(first.macs_after)


def test_the_model_hash_covers_external_weights(tmp_path: Path) -> None:
    """Two models with the same graph but different weights in their external data must not share a hash,
    or a plan made for one would be accepted for the other."""
    from onnxslim.prune.plan import model_sha256

    b = ModelBuilder((3, 8, 8))
    model = b.build(b.conv(b.relu(b.conv(b.input, 8, 3)), 4))
    path = tmp_path / "m.onnx"
    external = onnx.ModelProto()
    external.CopyFrom(model)  # save_model converts the proto it is given to external data in place
    onnx.save_model(external, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    before = model_sha256(path)
    data = bytearray((tmp_path / "m.onnx.data").read_bytes())
    data[0] ^= 0xFF  # same graph, same .onnx bytes, different weights
    (tmp_path / "m.onnx.data").write_bytes(bytes(data))
    assert model_sha256(path) != before
    # without external data the hash is that of the file's bytes, as before
    plain = tmp_path / "plain.onnx"
    onnx.save_model(model, str(plain))
    assert model_sha256(plain) == model_sha256(plain.read_bytes())


# ------------------------------------------------------------------------------------------ grouped convs


def resnext_block() -> onnx.ModelProto:
    """A ResNeXt bottleneck: conv1x1(24) → grouped conv3x3(24, group=4) → conv1x1(16) + shortcut conv(16)."""
    b = ModelBuilder((8, 8, 8))
    x = b.relu(b.bn(b.conv(b.input, 16, 1)))
    y = b.relu(b.bn(b.conv(x, 24, 1)))
    y = b.relu(b.bn(b.conv(y, 24, 3, group=4)))
    y = b.relu(b.op("Add", [b.bn(b.conv(y, 16, 1)), x]))
    return b.build(b.conv(y, 4))


def _per_block(group, kept) -> list[int]:  # type: ignore[no-untyped-def]
    size = group.channels // group.blocks
    return [sum(1 for c in kept if c // size == block) for block in range(group.blocks)]


@pytest.mark.parametrize("budget", [{"ratio": 0.5}, {"target_macs": 0.5}, {"ratio": 0.5, "round_to": 8}])
def test_groups_of_grouped_convs_lose_as_many_channels_from_every_block(budget: dict) -> None:
    model = normalize_model(resnext_block())[0]
    result = prune_model(model, **budget)
    grouped = [g for g in result.groups if g.blocks > 1]
    assert len(grouped) == 2 and all(g.blocks == 4 for g in grouped)
    for group in grouped:
        kept = result.plan.kept.get(group.id, tuple(range(group.channels)))
        assert len(set(_per_block(group, kept))) == 1, (group.id, _per_block(group, kept))
        if budget.get("round_to") == 8:
            assert len(kept) % 8 == 0
    assert any(result.plan.changes(g) for g in grouped)
    infos = infer_tensor_infos(model, result.analysis_shapes)
    estimate = MacModel(result.groups, {layer.name: layer.macs for layer in compute_cost(model, infos).layers})
    removed = {g.id: len(result.plan.removed(g)) for g in result.groups}
    assert estimate.macs_after(removed) == pytest.approx(result.macs_after, rel=1e-9)  # exact for grouped convs


def test_within_each_block_the_lowest_scoring_channels_go() -> None:
    model = normalize_model(resnext_block())[0]
    result = prune_model(model, ratio=0.5)
    import onnx_graphsurgeon as gs

    from onnxslim.prune.importance import ScoreContext, l1_importance

    group = next(g for g in result.groups if g.blocks > 1 and result.plan.changes(g))
    scores = l1_importance(group, ScoreContext(gs.import_onnx(model)))
    size = group.channels // group.blocks
    for block in range(group.blocks):
        channels = range(block * size, (block + 1) * size)
        kept = [c for c in channels if c in result.plan.kept[group.id]]
        gone = [c for c in channels if c not in result.plan.kept[group.id]]
        assert len(kept) == len(gone) == size // 2 and max(scores[c] for c in gone) <= min(scores[c] for c in kept)


def test_an_unbalanced_plan_for_a_grouped_conv_is_refused(tmp_path: Path) -> None:
    model = normalize_model(resnext_block())[0]
    result = prune_model(model, ratio=0.5)
    group = next(g for g in result.groups if g.blocks > 1 and result.plan.changes(g))
    path = tmp_path / "plan.json"
    unbalanced = dict(result.plan.kept)
    unbalanced[group.id] = tuple(range(group.channels // 2, group.channels))  # keeps blocks 2 and 3 whole
    from onnxslim.prune import PrunePlan

    save_plan(path, PrunePlan(unbalanced), result.groups, result.model_sha256, {})
    with pytest.raises(ModelLoadError, match=r"each of its 4 blocks must keep as many channels; this plan keeps \[0, 0, 6, 6\]"):
        load_plan(path, result.groups, result.model_sha256)


def test_mac_model_is_exact_for_heads_including_the_attention_products() -> None:
    """Q·Kᵀ and softmax·V lose a head's share of their MACs with each head (followers that count MACs)."""
    model = normalize_model(encoder_model(layers=2, heads=4, head_size=4, ffn=24))[0]
    shapes = {"x": [2, 7, 16], "attention_mask": [2, 7]}
    result = prune_model(model, target_macs=0.6, input_shapes=shapes, protect_first=False)
    assert any(g.width == 4 and result.plan.changes(g) for g in result.groups)
    infos = infer_tensor_infos(model, result.analysis_shapes)
    estimate = MacModel(result.groups, {layer.name: layer.macs for layer in compute_cost(model, infos).layers})
    removed = {g.id: len(result.plan.removed(g)) for g in result.groups}
    assert estimate.macs_after(removed) == pytest.approx(result.macs_after, rel=1e-9)
