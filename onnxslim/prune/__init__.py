"""Channel pruning: score channel groups, plan which channels go, rewrite the graph without them, recover.

    state.py        options, the state the steps share, the result
    pruner.py       the pipeline of named steps (PIPELINE) and prune_model, measure_sensitivity
    importance.py   criteria: group -> one score per channel
    plan.py         scores + budget -> PrunePlan; plans saved and loaded
    lossless.py     dead and constant channels
    rewrite.py      PrunePlan -> graph with the channels physically gone (REWRITE_HANDLERS)
    recover.py      sequential least-squares refit of the layers that read pruned channels
    sensitivity.py  damage curves per group, and allocation by them
    outcome.py      what the budget left whole, and why, in words
    optables.py     checks every per-op table against analysis.rules.RULES at import
"""

from onnxslim.prune.importance import CRITERIA
from onnxslim.prune.plan import PrunePlan, load_plan, plan_by_macs, plan_by_ratio, save_plan
from onnxslim.prune.pruner import measure_sensitivity, prune_model
from onnxslim.prune.recover import RECOVERY_METHODS, RecoverOptions, RecoveryReport, recover_model
from onnxslim.prune.rewrite import apply_plan, rewrite_model
from onnxslim.prune.sensitivity import DEFAULT_RATIOS, SensitivityCurves
from onnxslim.prune.state import ALLOCATIONS, BlockedGroup, PruneOptions, PruneResult

__all__ = [
    "ALLOCATIONS",
    "CRITERIA",
    "DEFAULT_RATIOS",
    "SensitivityCurves",
    "measure_sensitivity",
    "RECOVERY_METHODS",
    "BlockedGroup",
    "PruneOptions",
    "PrunePlan",
    "RecoverOptions",
    "RecoveryReport",
    "PruneResult",
    "apply_plan",
    "load_plan",
    "plan_by_macs",
    "plan_by_ratio",
    "prune_model",
    "recover_model",
    "rewrite_model",
    "save_plan",
]

from onnxslim.prune import optables  # noqa: E402,F401 - checks every per-op table against RULES once, at import
