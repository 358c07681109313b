"""The staged runner against the whole model on real exports: every range's outputs, bit for bit.

    python benchmarks/staged_runner_check.py [--cache DIR] [--models NAME ...] [--json FILE]

Recovery passes activations forward one range of nodes at a time (`onnxslim.activations.StagedRunner`),
each range a model of its own; issue 22 was a range that was not faithful to the whole model (a shape-[]
scalar of YOLOv8's anchors came back as shape [1]). This runs `check_staged_runner` — every range's outputs
against one run of the whole model exposing them, bit for bit — on the exports that registry wheels ship,
downloaded once with `pip download --no-deps` into the cache (default ~/.cache/onnxslim-bench; the rapidocr
wheel goes where benchmarks/int8_ppocr.py keeps it), the script's only network use:

* nudenet 3.4.2: `320n.onnx`, YOLOv8n (ultralytics 8.2.46, torch 2.3, dynamic axes: the anchors are
  computed from Shape at run time);
* rapidocr-onnxruntime 1.4.4: PP-OCRv4 detector and recognizer, PP-OCR mobile v2 direction classifier
  (paddle2onnx);
* ddddocr 1.6.1: `common.onnx` and `common_old.onnx` (quantized by onnxruntime: com.microsoft ops), and
  `common_det.onnx` (a YOLOX-style detector).

Each model as shipped and as onnxslim loads it (normalized), in ranges of one node (every tensor crosses a
boundary) and in seeded ranges of 1 to 8 nodes with activations past 16 MiB spilled to disk, on 2 batches
of seeded random inputs at the shapes below. Prints one table; exits 1 on any mismatch. About a minute on
2 cores, after the downloads (about 90 MiB of wheels).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from onnxslim.activations import StagedCheck, check_staged_runner, stage_ends
from onnxslim.io import load_model
from onnxslim.report.format import format_table
from onnxslim.shapes import random_inputs

DEFAULT_CACHE = Path.home() / ".cache" / "onnxslim-bench"
BATCHES = 2
SPILL_BUDGET = 16 << 20


@dataclass(frozen=True)
class Export:
    """A model file inside a registry wheel, and the input shapes it is checked at."""

    wheel: str  # pip requirement, pinned
    member: str  # path inside the wheel
    folder: str  # cache subfolder
    shapes: dict[str, list[int]]


EXPORTS = {
    "nudenet_320n": Export("nudenet==3.4.2", "nudenet/320n.onnx", "nudenet", {"images": [2, 3, 320, 320]}),
    "ppocrv4_det": Export("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                          "ppocr", {"x": [1, 3, 320, 320]}),
    "ppocrv4_rec": Export("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                          "ppocr", {"x": [2, 3, 48, 320]}),
    "ppocr_cls": Export("rapidocr-onnxruntime==1.4.4",
                        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "ppocr", {"x": [2, 3, 48, 192]}),
    "ddddocr_common": Export("ddddocr==1.6.1", "ddddocr/common.onnx", "ddddocr", {"input1": [1, 1, 64, 160]}),
    "ddddocr_common_old": Export("ddddocr==1.6.1", "ddddocr/common_old.onnx", "ddddocr", {"input1": [1, 1, 64, 160]}),
    "ddddocr_det": Export("ddddocr==1.6.1", "ddddocr/common_det.onnx", "ddddocr", {"images": [1, 3, 416, 416]}),
}


def fetch(export: Export, cache: Path) -> Path:
    """The model file, unzipped from its wheel (downloaded with pip into the cache unless there)."""
    folder = cache / export.folder
    path = folder / Path(export.member).name
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    name, version = export.wheel.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    if not sorted(folder.glob(pattern)):
        command = [sys.executable, "-m", "pip", "download", "--no-deps", export.wheel, "-d", str(folder)]
        print(f"downloading: {' '.join(command)}", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not sorted(folder.glob(pattern)):
            raise RuntimeError(f"`{' '.join(command)}` failed (exit {done.returncode}):\n{(done.stderr or done.stdout).strip()}")
    with zipfile.ZipFile(sorted(folder.glob(pattern))[0]) as wheel:
        partial = path.with_suffix(".part")
        partial.write_bytes(wheel.read(export.member))
        partial.replace(path)  # a model file that exists is whole
    return path


def check(name: str, model: onnx.ModelProto, shapes: dict[str, list[int]], form: str) -> list[dict[str, Any]]:
    """The two checks (one-node ranges; 1-8-node ranges with spilling) of one model in one form."""
    feeds = [random_inputs(model, shapes, seed=batch) for batch in range(BATCHES)]
    rows = []
    for label, longest, budget in (("1 node", 1, 1 << 30), ("1-8 nodes, spilled", 8, SPILL_BUDGET)):
        start = time.perf_counter()
        result: StagedCheck = check_staged_runner(model, feeds, stage_ends(len(model.graph.node), longest, seed=longest),
                                                  memory_budget=budget)
        rows.append({
            "model": name, "form": form, "nodes": len(model.graph.node), "ranges": label, "stages": result.stages,
            "compared": result.compared, "mismatches": [vars(m) for m in result.mismatches],
            "seconds": time.perf_counter() - start,
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the wheels and models are kept")
    parser.add_argument("--models", nargs="*", choices=sorted(EXPORTS), default=sorted(EXPORTS))
    parser.add_argument("--json", type=Path, default=None, help="write every row (and each mismatch) here")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for name in args.models:
        export = EXPORTS[name]
        path = fetch(export, args.cache)
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows += check(name, onnx.load(str(path)), export.shapes, "as shipped")
        rows += check(name, load_model(path).model, export.shapes, "normalized")
    table = [
        (row["model"], row["form"], row["nodes"], row["ranges"], row["stages"], row["compared"],
         len(row["mismatches"]) or "none", f"{row['seconds']:.1f}")
        for row in rows
    ]
    print(f"staged runner vs one whole-model run, {BATCHES} batches of seeded random inputs; tensors compared "
          "bit for bit")
    print(format_table(["model", "form", "nodes", "ranges", "stages", "tensors", "mismatches", "s"], table))
    failed = [row for row in rows if row["mismatches"]]
    for row in failed:
        for mismatch in row["mismatches"][:5]:
            print(f"{row['model']} ({row['form']}, {row['ranges']}): range {mismatch['stage']} "
                  f"{mismatch['nodes']}: {mismatch['tensor'] or '(the range failed)'} batch {mismatch['batch']}: "
                  f"{mismatch['detail']}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
