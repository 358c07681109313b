"""Every onnx backend-test light model prunes at ratio 0.3 with the masked oracle holding.

Their weights are constant fills, so they are randomized first (seeded, He-scaled) and the final Softmax is
dropped so that the oracle compares logits, where a wrong rewrite cannot hide behind a saturated softmax.
The group counts and blocker reasons are pinned so that a regression in the analysis shows.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import light_param, load_light
from oracle import check_prune

from onnxslim.prune import PruneResult


def randomized_logits_model(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """A copy with He-scaled random weights, positive random 1-D parameters and the final Softmax removed."""
    rng = np.random.default_rng(seed)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        values = onnx.numpy_helper.to_array(tensor)
        if values.dtype != np.float32 or values.size <= 1:
            continue
        if values.ndim >= 2:
            fan_in = int(np.prod(values.shape[1:])) if values.ndim > 2 else min(values.shape)
            values = rng.standard_normal(values.shape) * np.sqrt(2.0 / fan_in)
        else:
            values = rng.uniform(0.5, 1.5, values.shape)
        tensor.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), tensor.name))
    output = copy.graph.output[0]
    softmax = next((n for n in copy.graph.node if n.op_type == "Softmax" and n.output[0] == output.name), None)
    if softmax is not None:
        copy.graph.node.remove(softmax)
        output.name = softmax.input[0]
    return copy


# name → (groups, prunable groups, blocker reasons and how many groups each blocks)
EXPECTED: dict[str, tuple[int, int, dict[str, int]]] = {
    "bvlc_alexnet": (8, 5, {"LRN mixes neighbouring channels": 2, "its channels reach graph output 'r24'": 1}),
    "densenet121": (121, 120, {"its channels reach graph output 'fc6_1'": 1}),
    "inception_v1": (58, 55, {"LRN mixes neighbouring channels": 2, "its channels reach graph output 'r143'": 1}),
    "inception_v2": (70, 69, {"its channels reach graph output 'r507'": 1}),
    "resnet50": (38, 37, {"its channels reach graph output 'r174'": 1}),
    # each stage's grouped convs are cut like the concatenation-fed stream they join, and share its groups
    # (blocked first by the grouped conv that reads the stream); the analysis that re-walked the graph stopped
    # with a subset of them cut, depending on which of two cut fronts arrived first (28 groups, 6 and 1 more reasons)
    "shufflenet": (21, 0, {
        "Reshape splits the channel axis": 16,  # the channel shuffle
        "grouped Conv (group=4) reads channels of several groups (a Concat, or a Split or Slice elsewhere cuts them)": 4,
        "its channels reach graph output 'r201'": 1,
    }),
    "squeezenet": (26, 25, {"its channels reach graph output 'r65'": 1}),
    "vgg19": (19, 18, {"its channels reach graph output 'r46'": 1}),
    "zfnet512": (8, 5, {"LRN mixes neighbouring channels": 2, "its channels reach graph output 'r20'": 1}),
}


def _reasons(result: PruneResult) -> dict[str, int]:
    return dict(Counter(group.blocked_by.reason for group in result.groups if group.blocked_by is not None))


@pytest.mark.parametrize("name", [light_param(f"light_{name}.onnx") for name in sorted(EXPECTED)], ids=sorted(EXPECTED))
def test_light_model_prunes_at_0_3_with_the_oracle_holding(name: str) -> None:
    groups, prunable, reasons = EXPECTED[name.removeprefix("light_").removesuffix(".onnx")]
    model = randomized_logits_model(load_light(name).model)
    result = check_prune(model, ratio=0.3, rel=1e-3, expect_pruned=prunable > 0)
    assert (len(result.groups), result.prunable_groups) == (groups, prunable)
    assert _reasons(result) == reasons


@pytest.mark.parametrize("name", ["light_inception_v1.onnx"])
def test_recovery_runs_through_real_concat_graphs(name: str) -> None:
    """lsq recovery on a real Inception graph (Concat everywhere): the oracle holds without recovery; with it
    the same channels go, every refit is finite and no worse than as sliced on held-out samples."""
    import math

    from onnxslim.calib import open_dataset
    from onnxslim.io import normalize_model

    model = randomized_logits_model(load_light(name).model)
    calib = open_dataset("random:10", normalize_model(model)[0])
    result = check_prune(model, None, "activation", target_macs=0.6, round_to=8, calib=calib, recover="none")
    from onnxslim.prune import prune_model

    lsq = prune_model(model, target_macs=0.6, round_to=8, criterion="activation", calib=calib, recover="lsq")
    assert lsq.recovery is not None and lsq.recovery.nodes and lsq.evaluation is not None
    assert all(math.isfinite(n.error_after) and n.error_after <= n.error_before * (1 + 1e-6) + 1e-12
               for n in lsq.recovery.nodes)
    assert result.plan.kept == lsq.plan.kept  # the same channels go; only the refit differs
    onnx.checker.check_model(lsq.model)
