"""Accuracy kept by pruning without retraining: criteria and recovery methods, on trained and built models.

    python benchmarks/prune_recovery.py [--keep 0.9 --keep 0.7 --keep 0.5 --keep 0.3] [--no-yolo]

For models/mnist_resnet.onnx and models/mnist_mobilenet.onnx: `onnxslim.prune_model` at every MAC keep
fraction (`--target-macs`, the command line's defaults: round-to 8, first and last layers protected), with
l1 and no recovery (the old default), and with the activation criterion and each recovery method (bias,
affine, lsq), calibrated on models/mnist_calib.npz (256 images); top-1 on models/mnist_eval.npz (1,000
held-out images) and the recovery time; and activation + lsq with `--allocate sensitivity` (per-group cuts
from each group's measured damage) with its MACs kept and the whole prune's time. Then the YOLO-like detector of models/build.py (random weights)
at half its MACs, calibrated on 64 and measured on 16 uniform-noise images (its probe distribution):
cosine of output0 and of its class-score rows against the original (mean over images), the worst output
row's (onnxslim's own score), with and without lsq, and the whole prune's time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.build import build_yolo_like  # noqa: E402
from onnxslim.calib import open_dataset  # noqa: E402
from onnxslim.io import load_model, normalize_model  # noqa: E402
from onnxslim.prune import PruneOptions, prune_model  # noqa: E402

METHODS = (("l1", "none"), ("activation", "bias"), ("activation", "affine"), ("activation", "lsq"))
ALLOCATED = ("activation", "lsq", "sensitivity")  # the last column: --allocate sensitivity
CLI_DEFAULTS = {"round_to": 8, "protect_first": True, "protect_last": True}


def mnist(keeps: list[float]) -> list[str]:
    rows = [
        f"{'model':<16} {'MACs kept':>9} " + " ".join(f"{c + '+' + r:>16}" for c, r in METHODS)
        + f" {'lsq time':>8} {'lsq+sensitivity':>16} {'MACs kept':>9} {'time':>6}",
    ]
    for name in ("mnist_resnet", "mnist_mobilenet"):
        loaded = load_model(ROOT / "models" / f"{name}.onnx")
        calib = open_dataset(ROOT / "models" / "mnist_calib.npz", loaded.model)
        evaluation = open_dataset(ROOT / "models" / "mnist_eval.npz", loaded.model)
        original = None
        for keep in keeps:
            cells, seconds, kept = [], 0.0, 0.0
            for criterion, recover in METHODS:
                options = PruneOptions(target_macs=keep, criterion=criterion, recover=recover, **CLI_DEFAULTS)
                result = prune_model(loaded, options, calib=calib, eval_data=evaluation)
                assert result.evaluation is not None and result.evaluation.accuracy_after is not None
                original = result.evaluation.accuracy_original
                cells.append(f"{100 * result.evaluation.accuracy_after:>15.1f}%")
                kept = result.macs_after / result.macs_before
                if recover == "lsq" and result.recovery is not None:
                    seconds = result.recovery.seconds
            options = PruneOptions(target_macs=keep, criterion=ALLOCATED[0], recover=ALLOCATED[1],
                                   allocate=ALLOCATED[2], **CLI_DEFAULTS)
            start = time.perf_counter()
            allocated = prune_model(loaded, options, calib=calib, eval_data=evaluation)
            allocated_seconds = time.perf_counter() - start
            assert allocated.evaluation is not None and allocated.evaluation.accuracy_after is not None
            rows.append(
                f"{name:<16} {kept:>9.3f} " + " ".join(cells) + f" {seconds:>7.1f}s"
                f" {100 * allocated.evaluation.accuracy_after:>15.1f}% "
                f"{allocated.macs_after / allocated.macs_before:>9.3f} {allocated_seconds:>5.1f}s"
            )
            print(rows[-1], file=sys.stderr, flush=True)
        assert original is not None
        rows.append(f"{name:<16} {'1.000':>9} original top-1 {100 * original:.1f}%")
    return rows


def yolo() -> list[str]:
    model = normalize_model(build_yolo_like(0))[0]
    rng = np.random.default_rng(0)
    rows = [f"{'yolo_like':<16} {'MACs kept':>9} {'recover':>8} {'cosine output0':>15} {'cosine classes':>15} "
            f"{'worst row':>12} {'time':>7}"]
    with tempfile.TemporaryDirectory() as folder:
        calib_path, eval_path = Path(folder) / "calib.npz", Path(folder) / "eval.npz"
        np.savez(calib_path, images=rng.uniform(0, 1, (64, 3, 320, 320)).astype(np.float32))
        images = rng.uniform(0, 1, (16, 3, 320, 320)).astype(np.float32)
        np.savez(eval_path, images=images)
        calib, evaluation = open_dataset(calib_path, model), open_dataset(eval_path, model)
        for recover in ("none", "lsq"):
            options = PruneOptions(target_macs=0.5, criterion="activation", recover=recover, **CLI_DEFAULTS)
            start = time.perf_counter()
            result = prune_model(model, options, calib=calib, eval_data=evaluation)
            seconds = time.perf_counter() - start
            assert result.evaluation is not None
            whole, classes = _row_cosine(model, result.model, images, 0), _row_cosine(model, result.model, images, 64)
            rows.append(
                f"{'yolo_like':<16} {result.macs_after / result.macs_before:>9.3f} {recover:>8} "
                f"{whole:>15.3f} {classes:>15.3f} {result.evaluation.outputs[0].cosine_after:>12.3f} {seconds:>6.1f}s"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def _row_cosine(original, pruned, images: np.ndarray, first: int) -> float:  # type: ignore[no-untyped-def]
    """Mean over images of the cosine of output0's rows from `first` on (0: all; 64: the class scores)."""
    import onnxruntime

    sessions = [onnxruntime.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (original, pruned)]
    cosines = []
    for image in images:
        want, got = (s.run(None, {"images": image[None]})[0][0, first:].ravel() for s in sessions)
        cosines.append(float(want @ got / (np.linalg.norm(want) * np.linalg.norm(got) + 1e-12)))
    return float(np.mean(cosines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, action="append", dest="keeps")
    parser.add_argument("--no-yolo", action="store_true")
    parser.add_argument("--no-mnist", action="store_true")
    args = parser.parse_args(argv)
    if not args.no_mnist:
        rows = mnist(args.keeps or [0.9, 0.7, 0.5, 0.3])
        print("top-1 on models/mnist_eval.npz after pruning to a MAC budget (criterion+recovery), no retraining")
        print("\n".join(rows))
    if not args.no_yolo:
        print()
        print("\n".join(yolo()))


if __name__ == "__main__":
    main()
