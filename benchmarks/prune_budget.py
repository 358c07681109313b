"""MACs kept vs measured speedup under `--target-macs`, with and without rounding channels to multiples.

    python benchmarks/prune_budget.py [--target 0.75 --target 0.5 --target 0.3] [--round-to 1 --round-to 8]
                                      [--repeat 30] [--threads N]

Builds resnet18_like, mobilenetv2_like and yolo_like (models/build.py, seed 0) and prunes each with
`onnxslim.prune_model` (l1, the command line's defaults: first and last layers protected) at every
target fraction of MACs and every `--round-to` (default 1, 4, 8, 16). For each model and target, the
original and its pruned variants are timed in *one* interleaved run of `onnxslim.bench.benchmark` on
random inputs; speedup = p50 original / p50 pruned from that run. Prints one table: whether rounding the
channels kept to multiples of 4/8/16 buys latency on this CPU for the MACs it gives back.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.build import BUILDERS  # noqa: E402
from onnxslim.bench import BenchOptions, benchmark, physical_cores  # noqa: E402
from onnxslim.io import normalize_model, save_model  # noqa: E402
from onnxslim.prune import PruneOptions, prune_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, action="append", dest="targets")
    parser.add_argument("--round-to", type=int, action="append", dest="round_to")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    targets = args.targets or [0.75, 0.5, 0.3]
    multiples = args.round_to or [1, 4, 8, 16]
    options = BenchOptions(threads=args.threads, warmup=3, repeat=args.repeat, memory=False)
    header = f"{'model':<18} {'target':>6} {'round':>5} {'MACs kept':>9} {'met':>4} {'p50 ms':>17} {'speedup':>8}"
    rows = [header, "-" * len(header)]
    with tempfile.TemporaryDirectory() as folder:
        for name, build in BUILDERS.items():
            original = normalize_model(build(0))[0]
            original_path = save_model(original, Path(folder) / f"{name}.onnx")
            for target in targets:
                paths, results = [original_path], []
                for multiple in multiples:
                    prune = PruneOptions(target_macs=target, round_to=multiple, protect_first=True, protect_last=True)
                    result = prune_model(original, prune)
                    results.append(result)
                    paths.append(save_model(result.model, Path(folder) / f"{name}_{target}_{multiple}.onnx"))
                timed = benchmark(paths, options=options).models
                for multiple, result, model in zip(multiples, results, timed[1:], strict=True):
                    rows.append(
                        f"{name:<18} {target:>6.2f} {multiple:>5} {result.macs_after / result.macs_before:>9.3f} "
                        f"{'yes' if result.budget_met else 'no':>4} "
                        f"{timed[0].latency.p50_ms:>7.2f} → {model.latency.p50_ms:<7.2f} {model.speedup:>7.2f}×"
                    )
    threads = options.threads or physical_cores()
    print(f"--target-macs × --round-to, {threads} threads, {args.repeat} interleaved repeats, random inputs")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
