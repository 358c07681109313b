"""Time and peak memory of inspect and prune on synthetic graphs of 1k to 20k nodes (the growth should be linear).

    python benchmarks/prune_scaling.py [--family chain --family concat] [--nodes 1000 --nodes 2000 ...]
    python benchmarks/prune_scaling.py --profile N [--family concat]

Two families of residual networks on a [1, 16, 8, 8] input, built with tests/builders.py; blocks of Conv 3×3 →
Relu → Conv 3×3 → Add(block input) → Relu, channel 0 of every block's first Conv dead (zero filter and bias) so
that `--lossless` removes one channel per block:

- `chain`, like an exported ResNet: a 1×1 Conv every 8 blocks starts a new residual group, so the number of
  groups grows with the number of nodes. Measured at `--ratio 0.3`.
- `concat`, one residual stream through the whole network, fed every 8 blocks by a concatenation (the block's
  branch is Concat(Conv 1×1 → 8 channels, Conv 1×1 → Relu → Conv 3×3 → 8 channels), which cuts the stream,
  every block's convs in it, into two groups of 8 channels) and gated every 4 blocks by a squeeze-excite
  (x · Sigmoid(Conv(Relu(Conv(GlobalAveragePool(x)))))). Every cut reaches the whole stream: the analysis
  that re-walked the graph until no new cut appeared took one walk per block here, and stopped at 16 walks
  with the later blocks' groups blocked. Measured at `--ratio 0.5`, so that 16-channel groups lose channels.

The model is saved once per size; each operation then runs in a fresh process (`inspect_model`,
`prune_model(ratio=…)`, `prune_model(lossless=True)` on the saved file, as the command line does, including the
one validation) and reports its wall time, the part of it spent analysing the channel groups (shape inference,
graph import and `build_channel_groups`) and validating (two onnxruntime sessions, the original's and the pruned
model's, whose creation onnxruntime makes superlinear in the node count), and its peak resident memory
(VmHWM: the whole process, Python and onnxruntime included). The table also gives the groups the
analysis finds and how many of them are blocked: only the last Conv's, whose channels are the graph output, at
every size.
The machine may be shared: wall times are noisy, compare them within one run.
`--profile N` instead runs the family's prune at N nodes under cProfile and prints the top functions.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.builders import ModelBuilder  # noqa: E402

BLOCKS_PER_STAGE = 8  # chain: a new residual group every 8 blocks; concat: a concatenation every 8 blocks
SE_EVERY = 4  # concat: a squeeze-excite gate after every 4th block
NODES_PER_BLOCK = 5  # Conv, Relu, Conv, Add, Relu
MOST_NODES_PER_BLOCK = 13  # concat: a concatenation block (7 nodes) and a squeeze-excite gate (6)


def _residual_block(b: ModelBuilder, x: str, channels: int, dead: set[str]) -> str:
    hidden = b.conv(x, channels, 3)
    dead.update(b.nodes[-1].input[1:3])  # its channel 0 is made dead below: --lossless has work to do
    y = b.conv(b.relu(hidden), channels, 3)
    return b.relu(b.op("Add", [y, x]))


def _kill_channel_zero(model: onnx.ModelProto, dead: set[str]) -> onnx.ModelProto:
    for tensor in model.graph.initializer:
        if tensor.name in dead:
            values = numpy_helper.to_array(tensor).copy()
            values[0] = 0.0  # a zero filter and a zero bias: channel 0 is 0 after the Relu
            tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), tensor.name))
    return model


def build_chain(nodes: int, channels: int = 16, size: int = 8) -> onnx.ModelProto:
    """A residual chain of about `nodes` nodes, a new residual group every 8 blocks (the module docstring)."""
    b = ModelBuilder((channels, size, size), seed=0)
    x = b.relu(b.conv(b.input, channels, 3))
    block, dead = 0, set[str]()
    while len(b.nodes) + NODES_PER_BLOCK < nodes:
        if block and block % BLOCKS_PER_STAGE == 0:
            x = b.relu(b.conv(x, channels, 1))  # a new residual group
        x = _residual_block(b, x, channels, dead)
        block += 1
    return _kill_channel_zero(b.build(b.conv(x, 4, 1)), dead)


def build_concat_stream(nodes: int, channels: int = 16, size: int = 8) -> onnx.ModelProto:
    """One residual stream of about `nodes` nodes, fed by a concatenation every 8 blocks and gated by a
    squeeze-excite every 4 (the module docstring)."""
    b = ModelBuilder((channels, size, size), seed=0)
    x = b.relu(b.conv(b.input, channels, 3))
    block, dead = 0, set[str]()
    while len(b.nodes) + MOST_NODES_PER_BLOCK < nodes:
        if block % BLOCKS_PER_STAGE == BLOCKS_PER_STAGE - 1:
            x = b.concat_residual(x, channels // 2)
        else:
            x = _residual_block(b, x, channels, dead)
        if block % SE_EVERY == SE_EVERY - 1:
            x = b.se(x, channels // 4)
        block += 1
    return _kill_channel_zero(b.build(b.conv(x, 4, 1)), dead)


FAMILIES: dict[str, tuple[Callable[[int], onnx.ModelProto], float]] = {
    "chain": (build_chain, 0.3),
    "concat": (build_concat_stream, 0.5),
}


def run(operation: str, path: str) -> dict[str, float]:
    """One operation on the model at `path`, in this process: seconds, peak resident MB, groups."""
    started, steps, groups, blocked = time.perf_counter(), {}, 0, 0
    if operation == "inspect":
        from onnxslim import inspect_model

        inspect_model(path)
    else:
        from onnxslim.io import load_model
        from onnxslim.prune import prune_model

        options = {"lossless": True} if operation == "prune --lossless" else {"ratio": float(operation.split()[-1])}
        result = prune_model(load_model(path), **options)
        steps, groups, blocked = result.step_seconds, len(result.groups), len(result.groups) - result.prunable_groups
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime, "peak_mb": peak_mb(usage),
        "analyse": steps.get("analyse", 0.0), "validate": steps.get("validate", 0.0),
        "groups": groups, "blocked": blocked,
    }


def peak_mb(usage: resource.struct_rusage) -> float:
    """This process's peak resident memory. Linux's ru_maxrss keeps the parent's peak across fork and exec (so a
    child started by a parent that had built a 20k-node model reported the parent's 760 MB); VmHWM is the peak
    of this program alone."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return usage.ru_maxrss / 1024


def measure(operation: str, path: str) -> dict[str, float]:
    """`run` in a fresh Python process, so peaks do not carry over from one measurement to the next."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", operation, path], check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def operations(family: str) -> tuple[str, ...]:
    return ("inspect", f"prune --ratio {FAMILIES[family][1]}", "prune --lossless")


def profile(family: str, nodes: int) -> None:
    import cProfile
    import pstats

    build, ratio = FAMILIES[family]
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / f"{family}.onnx")
        onnx.save(build(nodes), path)
        operation = f"prune --ratio {ratio}"
        cProfile.runctx("run(operation, path)", globals(), {"operation": operation, "path": path, "run": run}, str(Path(folder) / "p"))
        pstats.Stats(str(Path(folder) / "p")).sort_stats("cumulative").print_stats(40)


def table(family: str, sizes: list[int]) -> None:
    header = f"{'nodes':>6} {'convs':>6} {'groups':>6} {'blocked':>7}  " + "  ".join(f"{op:>28}" for op in operations(family))
    print(f"\n{family}: wall s [analysis s, validation s] / peak resident MB; each in a fresh process")
    print(header)
    print("-" * len(header))
    build = FAMILIES[family][0]
    with tempfile.TemporaryDirectory() as folder:
        for size in sizes:
            model = build(size)
            path = str(Path(folder) / f"{family}_{size}.onnx")
            onnx.save(model, path)
            convs = sum(node.op_type == "Conv" for node in model.graph.node)
            cells, counts = [], ""
            for operation in operations(family):
                result = measure(operation, path)
                steps = f"[{result['analyse']:.2f}, {result['validate']:.1f}]" if operation != "inspect" else ""
                cells.append(f"{result['seconds']:>6.2f} {steps:>12} {result['peak_mb']:>5.0f} MB")
                if operation.startswith("prune --ratio"):
                    counts = f"{result['groups']:>6} {result['blocked']:>7}"
            print(f"{len(model.graph.node):>6} {convs:>6} {counts}  " + "  ".join(f"{c:>28}" for c in cells), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), action="append")
    parser.add_argument("--nodes", type=int, action="append")
    parser.add_argument("--profile", type=int, default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run(*args.child)))
        return
    families = args.family or list(FAMILIES)
    if args.profile:
        profile(families[0], args.profile)
        return
    for family in families:
        table(family, args.nodes or [1000, 2000, 5000, 10000, 20000])


if __name__ == "__main__":
    main()
