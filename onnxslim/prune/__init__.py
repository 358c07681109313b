"""Channel pruning: score channel groups, plan which channels go, rewrite the graph without them."""

from onnxslim.prune.importance import CRITERIA
from onnxslim.prune.plan import PrunePlan, load_plan, plan_by_macs, plan_by_ratio, save_plan
from onnxslim.prune.pruner import BlockedGroup, PruneOptions, PruneResult, prune_model
from onnxslim.prune.recover import RECOVERY_METHODS, RecoverOptions, RecoveryReport, recover_model
from onnxslim.prune.rewrite import apply_plan, rewrite_model

__all__ = [
    "CRITERIA",
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
