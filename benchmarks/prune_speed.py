"""Channel pruning at ratio 0.3 on the three benchmark architectures: MACs, params and latency, pruned vs original.

    python benchmarks/prune_speed.py [--ratio 0.3] [--repeat 50] [--threads N] [--round-to 1 --round-to 8]

Builds resnet18_like, mobilenetv2_like and yolo_like (models/build.py, seed 0), prunes each with
`onnxslim.prune_model` (l1, every prunable group), and benchmarks original and pruned side by side with
`onnxslim.bench.benchmark` on random inputs: one run, interleaved repeats, speedup = p50 original / p50
pruned from that run. Each `--round-to` (default: 1 and 8) gives one row per model: the channels kept
by each group rounded up to a multiple of it. Prints one table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.build import BUILDERS  # noqa: E402
from onnxslim.bench import BenchOptions, benchmark, physical_cores  # noqa: E402
from onnxslim.io import normalize_model, save_model  # noqa: E402
from onnxslim.prune import prune_model  # noqa: E402


def row(name: str, original: onnx.ModelProto, original_path: Path, multiple: int, ratio: float, options: BenchOptions) -> str:
    """Prune `original`, benchmark it against the original in one interleaved run, format one table row."""
    result = prune_model(original, ratio=ratio, round_to=multiple)
    pruned_path = save_model(result.model, original_path.with_name(f"{name}_pruned_{multiple}.onnx"))
    before, after = benchmark([original_path, pruned_path], options=options).models
    return (
        f"{name:<18} {multiple:>5} {result.prunable_groups:>4}/{len(result.groups):<4} "
        f"{result.macs_before / 1e6:>7.1f} → {result.macs_after / 1e6:<7.1f} "
        f"{result.params_before / 1e3:>6.0f} → {result.params_after / 1e3:<6.0f} "
        f"{before.latency.p50_ms:>6.2f} → {after.latency.p50_ms:<6.2f} {after.speedup:>7.2f}×"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--round-to", type=int, action="append", dest="round_to")
    args = parser.parse_args(argv)
    round_to = args.round_to or [1, 8]
    options = BenchOptions(threads=args.threads, warmup=5, repeat=args.repeat, memory=False)
    header = f"{'model':<18} {'round':>5} {'groups':>9} {'MACs (M)':>17} {'params (k)':>15} {'p50 ms':>15} {'speedup':>8}"
    rows = [header, "-" * len(header)]
    with tempfile.TemporaryDirectory() as folder:
        for name, build in BUILDERS.items():
            original = normalize_model(build(0))[0]
            original_path = save_model(original, Path(folder) / f"{name}.onnx")
            for multiple in round_to:
                rows.append(row(name, original, original_path, multiple, args.ratio, options))
    print(f"ratio {args.ratio}, {options.threads or physical_cores()} threads, {args.repeat} interleaved repeats, random inputs")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
