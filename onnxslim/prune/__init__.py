"""Channel pruning: score channel groups, plan which channels go, rewrite the graph without them."""

from onnxslim.prune.importance import CRITERIA
from onnxslim.prune.plan import PrunePlan, plan_by_ratio
from onnxslim.prune.pruner import BlockedGroup, PruneResult, prune_model
from onnxslim.prune.rewrite import apply_plan, rewrite_model

__all__ = [
    "CRITERIA",
    "BlockedGroup",
    "PrunePlan",
    "PruneResult",
    "apply_plan",
    "plan_by_ratio",
    "prune_model",
    "rewrite_model",
]
