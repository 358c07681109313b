"""The benchmark architectures of models/build.py prune at ratio 0.3 with the oracle holding, and the
YOLO-like detector prunes inside its C2f, SPPF and neck groups: its MACs fall about as much as a uniform
30 % cut of every group that does not reach the output would give."""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import pytest
from oracle import check_prune

from models.build import BUILDERS
from onnxslim.analysis.cost import compute_cost
from onnxslim.analysis.groups import ChannelGroup
from onnxslim.io import infer_tensor_infos, normalize_model
from onnxslim.prune import PruneResult


def _reaches_output(group: ChannelGroup) -> bool:
    return group.blocked_by is not None and "graph output" in group.blocked_by.reason


def uniform_cut_macs(model: onnx.ModelProto, result: PruneResult, keep: float) -> float:
    """MACs of `model` if every group not reaching a graph output kept exactly `keep` of its channels: each
    MAC layer scales by the kept fraction of its input channels and of its output channels (depthwise:
    once, as a follower)."""
    kept_in: dict[str, list[float]] = {}
    kept_out: dict[str, list[float]] = {}
    for group in result.groups:
        fraction = 1.0 if _reaches_output(group) else keep
        for sink in group.sinks:
            entry = kept_in.setdefault(sink.node, [0.0, float(sink.extent or group.channels)])
            entry[0] += group.channels * fraction
        for member in (*group.sources, *(f for f in group.followers if f.op_type == "Conv")):
            entry = kept_out.setdefault(member.node, [0.0, float(member.extent or group.channels)])
            entry[0] += group.channels * fraction
    cost = compute_cost(model, infer_tensor_infos(model, result.analysis_shapes))
    total = 0.0
    for layer in cost.layers:
        scale = 1.0
        for table in (kept_in, kept_out):
            if layer.name in table:
                scale *= table[layer.name][0] / table[layer.name][1]
        total += layer.macs * scale
    return total


def _groups_with_source(groups: Sequence[ChannelGroup], part: str) -> list[ChannelGroup]:
    return [g for g in groups if any(part in s.node for s in g.sources)]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_bench_architecture_prunes_at_0_3_close_to_a_uniform_cut(name: str) -> None:
    model = normalize_model(BUILDERS[name](0))[0]
    result = check_prune(model, ratio=0.3, rel=1e-3)
    expected = uniform_cut_macs(model, result, 0.7) / result.macs_before
    got = result.macs_after / result.macs_before
    # floor(0.3 · C) channels go, so a little less than 30 % of small groups: allow a few points
    assert expected <= got <= expected + 0.05, (got, expected)
    if name == "yolo_like":
        assert [g.id for g in result.groups if not g.prunable] == [
            "/model.22/cv2.0/cv2.0.2/Conv", "/model.22/cv3.0/cv3.0.2/Conv"
        ]
        for block in ("model.2/", "model.9/", "model.12/", "model.15/", "model.21/"):  # C2f, SPPF, neck C2f
            groups = _groups_with_source(result.groups, block)
            assert len(groups) >= 2 and all(g.prunable for g in groups), block
        halves = [g for g in _groups_with_source(result.groups, "model.2/cv1") if g.sources[0].extent]
        assert sorted(g.sources[0].offset for g in halves) == [0, 16]  # cv1 cut in two by the Split
