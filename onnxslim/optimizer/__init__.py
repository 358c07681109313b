"""`optimize` and `sweep`: from an exported model to the fastest model that keeps its accuracy, with the proof.

    config.py   options, result types, the budget in force
    search.py   the search over pruning levels, int8 on the best, the final interleaved measurement, the choice
    sweep.py    every MAC fraction asked, measured side by side

(The package is `optimizer`, not `optimize`: `onnxslim.optimize` is the public function.)
"""

from onnxslim.optimizer.config import (
    DEFAULT_TRIALS,
    Candidate,
    OptimizeOptions,
    OptimizeResult,
    SweepPoint,
    SweepResult,
    Trial,
    default_budget,
)
from onnxslim.optimizer.search import choose_final, optimize
from onnxslim.optimizer.sweep import sweep

__all__ = [
    "DEFAULT_TRIALS",
    "Candidate",
    "OptimizeOptions",
    "OptimizeResult",
    "SweepPoint",
    "SweepResult",
    "Trial",
    "choose_final",
    "default_budget",
    "optimize",
    "sweep",
]
