"""Time and peak memory of inspect and prune on synthetic graphs of 1k to 20k nodes (the growth should be linear).

    python benchmarks/prune_scaling.py [--nodes 1000 --nodes 2000 ...] [--profile N]

Builds a residual chain like an exported ResNet (tests/builders.py): blocks of Conv 3×3 → Relu → Conv 3×3 →
Add(block input) → Relu on a [1, 16, 8, 8] input, a 1×1 Conv every 8 blocks starting a new residual group,
so the number of channel groups grows with the number of nodes; channel 0 of every block's first Conv is
dead (zero filter and bias), so `--lossless` removes one channel per block. The model is saved once per size; each
operation then runs in a fresh process (`inspect_model`, `prune_model(ratio=0.3)`, `prune_model(lossless=True)`
on the saved file, as the command line does, including the one validation) and reports its wall time, the
part of it spent validating (two onnxruntime sessions, the original's and the pruned model's, whose creation
onnxruntime makes superlinear in the node count), and its peak resident memory (getrusage's ru_maxrss: the
whole process, Python and onnxruntime included).
`--profile N` instead runs `prune --ratio 0.3` at N nodes under cProfile and prints the top functions.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.builders import ModelBuilder  # noqa: E402

NODES_PER_BLOCK = 5  # Conv, Relu, Conv, Add, Relu
BLOCKS_PER_STAGE = 8
OPERATIONS = ("inspect", "prune --ratio 0.3", "prune --lossless")


def build_chain(nodes: int, channels: int = 16, size: int = 8) -> onnx.ModelProto:
    """A residual chain of about `nodes` nodes (see the module docstring)."""
    b = ModelBuilder((channels, size, size), seed=0)
    x = b.relu(b.conv(b.input, channels, 3))
    block, dead = 0, set()
    while len(b.nodes) + NODES_PER_BLOCK < nodes:
        if block and block % BLOCKS_PER_STAGE == 0:
            x = b.relu(b.conv(x, channels, 1))  # a new residual group
        hidden = b.conv(x, channels, 3)
        dead.update(b.nodes[-1].input[1:3])  # its channel 0 is made dead below: --lossless has work to do
        y = b.conv(b.relu(hidden), channels, 3)
        x = b.relu(b.op("Add", [y, x]))
        block += 1
    model = b.build(b.conv(x, 4, 1))
    for tensor in model.graph.initializer:
        if tensor.name in dead:
            values = numpy_helper.to_array(tensor).copy()
            values[0] = 0.0  # a zero filter and a zero bias: channel 0 is 0 after the Relu
            tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), tensor.name))
    return model


def run(operation: str, path: str) -> dict[str, float]:
    """One operation on the model at `path`, in this process: seconds and peak resident MB."""
    started, validation = time.perf_counter(), 0.0
    if operation == "inspect":
        from onnxslim import inspect_model

        inspect_model(path)
    else:
        from onnxslim.io import load_model
        from onnxslim.prune import prune_model

        options = {"ratio": 0.3} if operation.endswith("0.3") else {"lossless": True}
        validation = prune_model(load_model(path), **options).step_seconds.get("validate", 0.0)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime, "validate": validation,
        "peak_mb": usage.ru_maxrss / 1024,
    }


def measure(operation: str, path: str) -> dict[str, float]:
    """`run` in a fresh Python process, so peaks do not carry over from one measurement to the next."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", operation, path], check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def profile(nodes: int) -> None:
    import cProfile
    import pstats

    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "chain.onnx")
        onnx.save(build_chain(nodes), path)
        cProfile.runctx("run('prune --ratio 0.3', path)", globals(), {"path": path, "run": run}, str(Path(folder) / "p"))
        pstats.Stats(str(Path(folder) / "p")).sort_stats("cumulative").print_stats(40)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, action="append")
    parser.add_argument("--profile", type=int, default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run(*args.child)))
        return
    if args.profile:
        profile(args.profile)
        return
    sizes = args.nodes or [1000, 2000, 5000, 10000, 20000]
    header = f"{'nodes':>6} {'convs':>6}  " + "  ".join(f"{op:>30}" for op in OPERATIONS)
    print("wall s (of which onnxruntime validation) / peak resident MB; each in a fresh process")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as folder:
        for size in sizes:
            model = build_chain(size)
            path = str(Path(folder) / f"chain_{size}.onnx")
            onnx.save(model, path)
            convs = sum(node.op_type == "Conv" for node in model.graph.node)
            cells = []
            for operation in OPERATIONS:
                result = measure(operation, path)
                validation = f"({result['validate']:.1f})" if operation != "inspect" else ""
                cells.append(f"{result['seconds']:>7.2f} {validation:>7} {result['peak_mb']:>7.0f} MB")
            print(f"{len(model.graph.node):>6} {convs:>6}  " + "  ".join(f"{c:>30}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
