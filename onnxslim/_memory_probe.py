"""Peak memory of one model, measured in a fresh process (run by `onnxslim.bench`, not by users).

    python -m onnxslim._memory_probe MODEL --feeds JSON [--threads N] [--opt-level all] [--provider P] [--runs 3]

It imports onnxslim's session settings, builds the inputs, notes the resident memory (the baseline), creates the
session and runs it `--runs` times, and prints one JSON object: baseline and peak resident bytes. On Linux
the kernel's high-water mark (VmHWM) is reset after the baseline, so the peak is that of loading and
running the model alone; elsewhere the peak is getrusage's ru_maxrss.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxslim.runtime import OPT_LEVELS, session_options


def _status_bytes(field: str) -> int | None:
    """A `VmRSS`/`VmHWM` line of /proc/self/status in bytes (Linux), else None."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def _reset_peak() -> bool:
    """Reset the kernel's resident high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _maxrss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS reports bytes, Linux KiB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m onnxslim._memory_probe")
    parser.add_argument("model")
    parser.add_argument("--feeds", required=True, help='JSON: {"input": [[1, 3, 224, 224], "float32"]}')
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--opt-level", default="all", choices=OPT_LEVELS)
    parser.add_argument("--provider", default="CPUExecutionProvider")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    feeds = {}
    for name, (shape, dtype) in json.loads(args.feeds).items():
        dtype = np.dtype(dtype)
        if dtype.kind == "f":
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = rng.integers(0, 2 if dtype.kind == "b" else 4, shape).astype(dtype)

    current = _status_bytes("VmRSS")
    if current is not None and _reset_peak():
        method, baseline = "VmHWM", current
    else:
        method, baseline = "ru_maxrss", _maxrss_bytes()

    options = session_options(threads=args.threads, opt_level=args.opt_level)
    session = ort.InferenceSession(args.model, options, providers=[args.provider])
    for _ in range(args.runs):
        session.run(None, feeds)

    peak = _status_bytes("VmHWM") if method == "VmHWM" else _maxrss_bytes()
    json.dump({"baseline_bytes": baseline, "peak_bytes": peak, "method": method}, sys.stdout)


if __name__ == "__main__":
    main()
