"""Every table of per-op knowledge, and the one import-time check that they agree with `rules.RULES`.

An op starts in `analysis/rules.py`: its `RULES` entry says how channels flow through it. What else it needs
depends on that entry, and `op_table_problems` names each missing table when the package is imported:

- a **source** op (`Behaviour.SOURCE`: creates channels and, as a sink, mixes them — Conv, Gemm …) needs
  `analysis/cost.py` `MAC_OPS` (its MACs: a missing one would silently count zero and skew MAC budgets),
  `prune/importance.py` `_OUT_WEIGHTS` and `_IN_WEIGHTS` (its weights by output and by input channel, for
  scoring), `prune/rewrite.py` `REWRITE_HANDLERS` with `prune_output` and `prune_input` (slicing), and
  `prune/lossless.py` `SOURCE_BIAS_INPUT` (which input holds its bias, None when it has none);
- a **follower** op (`OpRule(follower=True)`: per-channel constants or attributes that follow the channels —
  BatchNormalization, Split sizes, a depthwise Conv) needs `REWRITE_HANDLERS` with `prune_follower`.

Optional, and safe to leave out: `lossless._CONSTANT_RULES` (how a per-channel constant goes through an op;
without it lossless search treats the op's output as unknown) and `lossless._BIAS_FOLDS` (how a constant
channel folds into a sink's bias; without it such channels are not removed as lossless).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from onnxslim.analysis.cost import MAC_OPS
from onnxslim.analysis.rules import RULES, Behaviour, OpRule
from onnxslim.prune.importance import _IN_WEIGHTS, _OUT_WEIGHTS
from onnxslim.prune.lossless import _BIAS_FOLDS, _CONSTANT_RULES, SOURCE_BIAS_INPUT
from onnxslim.prune.rewrite import REWRITE_HANDLERS, RewriteHandler

__all__ = ["OP_TABLES", "op_table_problems"]

# where each table lives, for the messages
OP_TABLES: Mapping[str, str] = {
    "RULES": "onnxslim/analysis/rules.py",
    "MAC_OPS": "onnxslim/analysis/cost.py",
    "_OUT_WEIGHTS": "onnxslim/prune/importance.py",
    "_IN_WEIGHTS": "onnxslim/prune/importance.py",
    "REWRITE_HANDLERS": "onnxslim/prune/rewrite.py",
    "SOURCE_BIAS_INPUT": "onnxslim/prune/lossless.py",
    "_CONSTANT_RULES": "onnxslim/prune/lossless.py",
    "_BIAS_FOLDS": "onnxslim/prune/lossless.py",
}


def _where(table: str) -> str:
    return f"{OP_TABLES[table]} {table}"


def op_table_problems(
    rules: Mapping[str, OpRule] = RULES,
    *,
    mac_ops: Collection[str] = frozenset(MAC_OPS),
    out_weights: Collection[str] = frozenset(_OUT_WEIGHTS),
    in_weights: Collection[str] = frozenset(_IN_WEIGHTS),
    rewrite_handlers: Mapping[str, RewriteHandler] = REWRITE_HANDLERS,
    source_bias: Collection[str] = frozenset(SOURCE_BIAS_INPUT),
    constant_rules: Collection[str] = frozenset(_CONSTANT_RULES),
    bias_folds: Collection[str] = frozenset(_BIAS_FOLDS),
) -> list[str]:
    """One line per op whose entries are missing (or per entry for an op `rules` does not know)."""
    problems = []
    for op, rule in rules.items():
        handler = rewrite_handlers.get(op)
        missing = []
        if rule.behaviour is Behaviour.SOURCE:
            for table, keys in (("MAC_OPS", mac_ops), ("_OUT_WEIGHTS", out_weights), ("_IN_WEIGHTS", in_weights)):
                if op not in keys:
                    missing.append(_where(table))
            if handler is None or handler.prune_output is None or handler.prune_input is None:
                missing.append(f"{_where('REWRITE_HANDLERS')} (prune_output and prune_input)")
            if op not in source_bias:
                missing.append(_where("SOURCE_BIAS_INPUT"))
        if rule.follower and (handler is None or handler.prune_follower is None):
            missing.append(f"{_where('REWRITE_HANDLERS')} (prune_follower)")
        if missing:
            kind = "source op" if rule.behaviour is Behaviour.SOURCE else "follower op"
            problems.append(f"{kind} {op} has no entry in " + ", ".join(missing))
    tables: tuple[tuple[str, Collection[str]], ...] = (
        ("_OUT_WEIGHTS", out_weights), ("_IN_WEIGHTS", in_weights), ("REWRITE_HANDLERS", tuple(rewrite_handlers)),
        ("SOURCE_BIAS_INPUT", source_bias), ("_CONSTANT_RULES", constant_rules), ("_BIAS_FOLDS", bias_folds),
    )
    for table, keys in tables:
        for op in sorted(set(keys) - set(rules)):
            problems.append(f"{_where(table)} has an entry for {op}, which RULES does not know")
    return problems


_PROBLEMS = op_table_problems()
if _PROBLEMS:  # pragma: no cover - checked once at import
    raise ImportError("onnxslim per-op tables disagree (see onnxslim/prune/optables.py):\n  " + "\n  ".join(_PROBLEMS))
