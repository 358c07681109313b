"""onnxslim on real exporter output: analysis, pruning checked against the oracle, and int8, per model.

    python models/export_torchvision.py            # torch + torchvision, in a venv of their own
    python benchmarks/real_exports.py [DIR] [--ratio 0.3] [--quantize] [--skip NAME ...] [--json FILE]

For every .onnx file in DIR (default models/torchvision): the channel groups found and how many are
prunable, the reasons the others are blocked; `prune_model` with the command line's defaults (l1, `--ratio`,
channels rounded to multiples of 8, first and last layers protected) and the pruned model's largest
deviation from the masked-model oracle of docs/ARCHITECTURE.md (tests/oracle.py) on random inputs, relative to the
oracle's largest output; with `--quantize`, `quantize_model` on random calibration data (its speed guard's
decision and speedup; accuracy is meaningless on random data and not reported). Prints one table and the
blocker reasons; `--json` writes everything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxslim.calib import DataOptions, open_dataset  # noqa: E402
from onnxslim.io import load_model, random_inputs  # noqa: E402
from onnxslim.prune import prune_model  # noqa: E402
from onnxslim.quant import quantize_model  # noqa: E402
from tests.oracle import masked_model, run_model  # noqa: E402

CLI_DEFAULTS = {"round_to": 8, "protect_first": True, "protect_last": True}


def measure(path: Path, ratio: float, quantize: bool) -> dict[str, Any]:
    loaded = load_model(path)
    start = time.perf_counter()
    result = prune_model(loaded, ratio=ratio, **CLI_DEFAULTS)
    prune_s = time.perf_counter() - start
    feeds = random_inputs(loaded.model, result.analysis_shapes, seed=1)
    oracle = masked_model(loaded.model, result.groups, result.plan, result.analysis_shapes)
    got, want = run_model(result.model, feeds)[0], run_model(oracle, feeds)[0]
    row: dict[str, Any] = {
        "model": path.stem,
        "groups": len(result.groups),
        "prunable": result.prunable_groups,
        "blocked": dict(Counter(g.blocked_by.reason for g in result.groups if g.blocked_by is not None)),
        "macs_before": result.macs_before,
        "macs_after": result.macs_after,
        "channels_removed": result.channels_removed,
        "oracle_relative_error": float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30)),
        "prune_s": prune_s,
    }
    if quantize:
        start = time.perf_counter()
        quantized = quantize_model(loaded, open_dataset("random:8", loaded.model, DataOptions()))
        row.update(quantized=quantized.quantized, int8_speedup=quantized.speedup, quantize_s=time.perf_counter() - start)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=ROOT / "models" / "torchvision")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--quantize", action="store_true")
    parser.add_argument("--skip", nargs="*", default=[], help="file names (without .onnx) to leave out")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    paths = [p for p in sorted(args.folder.glob("*.onnx")) if p.stem not in args.skip]
    if not paths:
        print(f"no .onnx files in {args.folder}: run models/export_torchvision.py first", file=sys.stderr)
        return 1
    rows = []
    for path in paths:
        print(f"{path.stem} ...", file=sys.stderr, flush=True)
        rows.append(measure(path, args.ratio, args.quantize))
    print(f"ratio {args.ratio}, command-line defaults (round-to 8, first/last protected); oracle error relative to "
          "the oracle's largest output")
    header = f"{'model':<38} {'groups (prunable)':>17} {'MACs before → after':>22} {'oracle err':>10}"
    print(header + (f" {'int8':>12}" if args.quantize else ""))
    for row in rows:
        line = (
            f"{row['model']:<38} {row['groups']:>8} ({row['prunable']:>4}) "
            f"{row['macs_before'] / 1e6:>9.1f}M → {row['macs_after'] / 1e6:>7.1f}M {row['oracle_relative_error']:>10.1e}"
        )
        if args.quantize:
            line += f" {('kept ' if row['quantized'] else 'fp32 ') + format(row['int8_speedup'] or 0, '.2f') + 'x':>12}"
        print(line)
    print("\nblocked groups, by reason")
    for row in rows:
        reasons = "; ".join(f"{count}x {reason}" for reason, count in sorted(row["blocked"].items(), key=lambda i: -i[1]))
        print(f"  {row['model']}: {reasons}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
