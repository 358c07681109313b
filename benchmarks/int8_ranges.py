"""Ranges per tensor and the Concat joined per input, on YOLOv8n (nudenet 3.4.2's `320n.onnx`): plain int8
(no fallback) for each calibration method and placement, scored as benchmarks/real_models.py scores it.

    python benchmarks/int8_ranges.py [--cache DIR] [--threads N] [--eval N] [--methods minmax tensor]

The model, the 128 calibration scenes and the evaluation scenes are real_models.py's (downloaded and rendered
once into the cache). For each `--methods` M (calibrated once each, on the 103 calibration batches the
quantizer calibrates on) and each placement (`compute`: Conv only, where the output Concat and the ops before
it are float anyway; `kernels`: every node onnxruntime runs in int8 here), int8 models are built from the same
ranges with (under `kernels`):

* `shared`: the output Concat (box pixels 0-320 beside class probabilities <= 1) quantized like any node:
  one scale for both (the range rule off);
* `concat float`: only that Concat float (the rule as it was: its inputs rounded by their producers);
* `per input`: the rule as it is: the Concat joined in float, and the element-wise producers only it reads
  (the box Mul, the class Sigmoid) not rounded.

Printed per model: the fidelity score onnxslim's budget reads on its held-out calibration tail (the lower of
the mean cosine and the worst output channel's), and on the first `--eval` evaluation scenes the detections'
agreement with fp32 (F1 at IoU 0.5, score 0.1) and the class-score cosine, pooled and of the worst class.
Speed is not measured here (real_models.py --mode quantize times onnxslim's written model against fp32 and
onnxruntime's plain int8 in one interleaved run); the placements' speeds are what `quantize`'s placement step
reports.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import real_data  # noqa: E402
from benchmarks import real_models as rm  # noqa: E402
from onnxslim.calib import DataOptions, open_dataset  # noqa: E402
from onnxslim.io import load_model  # noqa: E402
from onnxslim.quant.config import QuantizeOptions  # noqa: E402
from onnxslim.quant.quantizer import QuantState, apply_range_rules, prepare  # noqa: E402
from onnxslim.report.format import format_table  # noqa: E402
from onnxslim.runtime import cpu_session, physical_cores, session_options  # noqa: E402


def _outputs(model: onnx.ModelProto | str, images: np.ndarray, threads: int) -> np.ndarray:
    session = cpu_session(model, session_options(threads=threads))
    return np.concatenate([session.run(None, {"images": images[i:i + 1]})[0] for i in range(len(images))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=rm.DEFAULT_CACHE)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--eval", type=int, default=48, help="evaluation scenes scored (of 128)")
    parser.add_argument("--methods", nargs="+", default=["minmax", "tensor"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    threads = args.threads or physical_cores()
    spec = rm.MODELS["yolov8n"]
    assert spec.export is not None
    model = rm.fetch(spec.export, args.cache)
    calib_path, eval_path, _ = rm.render_data(args.cache, args.cache / "real-models", spec.data, model)
    loaded = load_model(model)
    calib = open_dataset(calib_path, loaded.model, DataOptions(input_shapes={"images": (1, 3, 320, 320)}))
    with np.load(eval_path) as data:
        images = data["images"][: args.eval]
    reference = _outputs(str(model), images, threads)
    rows = []
    for method in args.methods:
        with tempfile.TemporaryDirectory(prefix="int8-ranges-") as scratch:
            state = QuantState(QuantizeOptions(method=method), loaded.model, loaded.size_bytes, calib, None,
                               Path(scratch))
            started = time.perf_counter()
            prepare(state)
            apply_range_rules(state)
            seconds = time.perf_counter() - started
            concat = next(n.name for n in state.model.graph.node if "output0" in n.output)
            ruled = [e.name for e in state.rule_nodes]
            user = state.user_excluded
            variants = {"shared": user, "concat float": [*user, concat], "per input": state.base_excluded}
            kinds = state.calibrations[method][1].range_kinds
            print(f"{method}: calibration and range rules {seconds:.0f} s; per input keeps float {ruled}"
                  + (f"; ranges {dict(kinds)}" if kinds else ""), file=sys.stderr, flush=True)
            for placement in ("compute", "kernels"):
                # under `compute` the Concat, the Mul and the Sigmoid are float whatever the rule: one row
                for label, excluded in variants.items() if placement == "kernels" else [("per input", state.base_excluded)]:
                    config = replace(state.config, placement=placement)
                    int8 = state.build(method, excluded, config)
                    check = state.judge(int8, (config, f"{method}/{label}", tuple(excluded))).check
                    score = real_data.detection_agreement(_outputs(int8, images, threads), reference, conf=0.1)
                    rows.append([method, placement, label, f"{check.score:.4f}", f"{score.figures['f1']:.3f}",
                                 f"{score.figures['class_cos']:.4f}", f"{score.figures['worst_class_cos']:.4f}"])
                    print("  ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"YOLOv8n plain int8 (no fallback), {len(images)} evaluation scenes, {threads} threads")
    print(format_table(["method", "placement", "output Concat", "budget score", "F1", "class cos", "worst class"],
                       rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
