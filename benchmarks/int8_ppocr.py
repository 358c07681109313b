"""`onnxslim quantize` on PaddleOCR's PP-OCRv4 recognizer and detector: real exports, scored on real answers.

    python benchmarks/int8_ppocr.py [--markdown] [--det-size 320|640] [--min-fidelity C] [--cache DIR]
                                    [--samples-rec N] [--samples-det N] [--models rec det] [--threads N]

The models are the ones rapidocr-onnxruntime 1.4.4 ships (`ch_PP-OCRv4_rec_infer.onnx`, 10 MiB, CTC over
6625 characters; `ch_PP-OCRv4_det_infer.onnx`, 4.5 MiB, DBNet): the script runs `pip download --no-deps
rapidocr-onnxruntime==1.4.4` into the cache (default ~/.cache/onnxslim-bench/ppocr) once and unzips them
from the wheel; that is its only network use. The data is rendered there too, seeded, with DejaVu (from
matplotlib's package data, else the system's; PIL's default font when neither is found), preprocessed as
rapidocr 1.4.4 does (PIL's bilinear resize for cv2's):

* rec: 200 calibration and 300 evaluation text lines (English words, numbers, codes), BGR, height 48 with
  the aspect kept, (x/255 - 0.5) / 0.5, zero-padded to width 320. Scored by greedy CTC decoding against the
  rendered text: character accuracy (1 - edit distance / length, per line, averaged) and exact lines.
* det: 48 calibration and 48 evaluation pages of 320x320 (`--det-size 640`), lines of text at random sizes,
  BGR, (x/255 - 0.5) / 0.5. Scored by the IoU of the text map (probability > 0.3) with fp32's, pooled over
  the pages, and by box recall / precision against the rendered lines' boxes (IoU > 0.5, one-to-one) after
  rapidocr's DB post-processing, axis-aligned and numpy-only.

Per model, `quantize_model` (calibration: the calibration set, batch 1; `eval_data`: the evaluation set,
on which the guard measures fidelity against fp32, without labels) with (a) plain int8, `max_trials=0,
force=True`; (b) the defaults: the accuracy guard with its default budget; (c) with `--min-fidelity C`, the
guard with that budget. The task metric is that of the model the result would write (`result.model`) or,
when it keeps fp32, of the int8 model it reports (`result.int8_model`): the `scored` column says which.
Speedup is the result's (fp32 median / int8 median, interleaved, one run on this machine, batch 1; noisy on
a busy machine), fp32 nodes those the guard kept, trials its trial quantizations, and the last column the
wall time of the `quantize_model` call.

About 15 minutes on 2 cores at the defaults (the guarded recognizer is most of it); `--det-size 640` adds
several more.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import random
import string
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from onnxslim.calib import DataOptions, open_dataset
from onnxslim.evaluate import AccuracyBudget
from onnxslim.io import load_model
from onnxslim.quant import QuantizeOptions, QuantizeResult, quantize_model
from onnxslim.report.format import format_bytes, format_table
from onnxslim.runtime import physical_cores

WHEEL = "rapidocr-onnxruntime==1.4.4"
MODEL_FILES = {"rec": "ch_PP-OCRv4_rec_infer.onnx", "det": "ch_PP-OCRv4_det_infer.onnx"}
REC_H, REC_W = 48, 320
REC_SEED, DET_SEED = 1234, 4321
DB_THRESH, DB_BOX_THRESH, DB_UNCLIP, DB_MIN_SIZE = 0.3, 0.5, 1.6, 3  # rapidocr 1.4.4 config.yaml
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word but "
    "not what all were we when your can said there use an each which she do how their if will up other about out many "
    "then them these so some her would make like him into time has look two more write go see number no way could "
    "people my than first water been call who oil its now find long down day did get come made may part over new "
    "sound take only little work know place year live me back give most very after thing our just name good sentence "
    "man think say great where help through much before line right too mean old any same tell boy follow came want "
    "show also around form three small set put end does another well large must big even such because turn here why "
    "ask went men read need land different home us move try kind hand picture again change off play spell air away "
    "animal house point page letter mother answer found study still learn should America world Invoice Total Amount "
    "Date Street Road Phone Email Model Version Python Linux Server Market Order"
).split()
# glyphs that are ambiguous in isolation (I/l/1, O/o/0, case-only pairs like c/C) are left out of random codes
UNAMBIGUOUS = [c for c in string.ascii_letters + string.digits if c not in "Il1|Oo0CcSsVvWwXxZzUuKkPp"]


# ------------------------------------------------------------------------------------ models and fonts


def fetch_models(cache: Path) -> dict[str, Path]:
    """The two PP-OCRv4 models, unzipped from rapidocr's wheel (downloaded with pip unless cached)."""
    paths = {name: cache / file for name, file in MODEL_FILES.items()}
    if all(path.exists() for path in paths.values()):
        return paths
    wheels = sorted(cache.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
    if not wheels:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(cache)]
        print(f"downloading the models: {' '.join(command)}", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(cache.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"`{' '.join(command)}` failed (exit {done.returncode}):\n"
                               f"{(done.stderr or done.stdout).strip()}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        for name, path in paths.items():
            partial = path.with_suffix(".part")
            partial.write_bytes(wheel.read(f"rapidocr_onnxruntime/models/{MODEL_FILES[name]}"))
            partial.replace(path)  # a model file that exists is whole
    return paths


def find_fonts() -> tuple[str, list[str | None]]:
    """DejaVu .ttf files (matplotlib's, else the system's) and where from; [None] (PIL's default) without."""
    try:
        import matplotlib

        found = glob.glob(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVu*.ttf"))
        source = "DejaVu from matplotlib"
    except ImportError:
        found = []
    if not found:
        found, source = glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf"), "DejaVu from the system"
    fonts = sorted(f for f in found if not any(skip in f for skip in ("Display", "MathTeX", "ExtraLight")))
    return (source, list(fonts)) if fonts else ("PIL's default font", [None])


def _font(path: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size) if path is None else ImageFont.truetype(path, size)


def _as_bgr(img: Image.Image, rng: random.Random, blur: tuple[float, float]) -> np.ndarray:
    """Sometimes blurred, always a little noise, RGB -> BGR uint8 (rapidocr works on cv2's BGR images)."""
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(*blur)))
    pixels = np.asarray(img).astype(np.float32)
    pixels += np.random.default_rng(rng.randint(0, 2**31)).normal(0, rng.uniform(0, 6), pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)[:, :, ::-1].copy()


# ------------------------------------------------------------------------------------------- rec data


def _line_text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 3))]
        text = " ".join(w.capitalize() if rng.random() < 0.3 else w.upper() if rng.random() < 0.1 else w for w in words)
    elif kind < 0.65:
        text = str(rng.randint(0, 10 ** rng.randint(2, 9)))
        if rng.random() < 0.4 and len(text) > 2:
            text = text[:-2] + "." + text[-2:]
    elif kind < 0.85:
        text = rng.choice(WORDS).capitalize() + rng.choice([" ", "-", ""]) + str(rng.randint(0, 99999))
    else:
        text = "".join(rng.choice(UNAMBIGUOUS) for _ in range(rng.randint(4, 12)))
    text = text.strip()
    if len(text) < 4:
        text += str(rng.randint(100, 999))
    return text[:20].strip()


def _render_line(rng: random.Random, fonts: list[str | None], text: str) -> np.ndarray:
    font = _font(rng.choice(fonts), rng.randint(26, 40))
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = rng.randint(2, 12), rng.randint(2, 10)
    img = Image.new("RGB", (int(right - left) + 2 * pad_x, int(bottom - top) + 2 * pad_y),
                    tuple(rng.randint(200, 255) for _ in range(3)))
    ImageDraw.Draw(img).text((pad_x - left + rng.randint(-1, 1), pad_y - top + rng.randint(-1, 1)), text, font=font,
                             fill=tuple(rng.randint(0, 60) for _ in range(3)))
    return _as_bgr(img, rng, (0.3, 0.8))


def _rec_input(bgr: np.ndarray) -> np.ndarray:
    """rapidocr 1.4.4 TextRecognizer.resize_norm_img: height 48, aspect kept up to width 320, zero-padded."""
    height, width = bgr.shape[:2]
    resized_w = min(REC_W, math.ceil(REC_H * width / height))
    resized = np.asarray(Image.fromarray(bgr).resize((resized_w, REC_H), Image.Resampling.BILINEAR), np.float32)
    out = np.zeros((3, REC_H, REC_W), np.float32)
    out[:, :, :resized_w] = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def _rec_samples(rng: random.Random, fonts: list[str | None], count: int) -> tuple[np.ndarray, list[str]]:
    images: list[np.ndarray] = []
    labels: list[str] = []
    while len(images) < count:
        text = _line_text(rng)
        bgr = _render_line(rng, fonts, text)
        if bgr.shape[1] / bgr.shape[0] > REC_W / REC_H:  # would be squashed to fit: skip
            continue
        images.append(_rec_input(bgr))
        labels.append(text)
    return np.stack(images), labels


# ------------------------------------------------------------------------------------------- det data


def _page_line(rng: random.Random) -> str:
    words = []
    for _ in range(rng.randint(1, 5)):
        kind = rng.random()
        if kind < 0.7:
            word = rng.choice(WORDS)
            words.append(word.capitalize() if rng.random() < 0.3 else word)
        elif kind < 0.9:
            words.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
        else:
            words.append("".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(3, 8))))
    return " ".join(words)


def _render_page(rng: random.Random, fonts: list[str | None], size: int) -> tuple[np.ndarray, list[list[int]]]:
    """A size x size page (a multiple of 32: rapidocr does not resize it) and its lines' ink boxes."""
    img = Image.new("RGB", (size, size), tuple(rng.randint(195, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    boxes = []
    y = rng.randint(10, 40)
    while True:
        font_size = rng.randint(16, 40) if size >= 640 else rng.randint(12, 28)
        font = _font(rng.choice(fonts), font_size)
        text = _page_line(rng)
        left, top, right, bottom = (int(v) for v in font.getbbox(text))
        width, height = right - left, bottom - top
        if width > size - 20:
            continue
        if y + height > size - 10:
            break
        x = rng.randint(10, size - 10 - width)
        draw.text((x - left, y - top), text, font=font, fill=tuple(rng.randint(0, 70) for _ in range(3)))
        boxes.append([x, y, x + width, y + height])
        y += height + rng.randint(int(0.6 * font_size), int(2.0 * font_size))
    bgr = _as_bgr(img, rng, (0.3, 0.7))
    return ((bgr.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1), boxes


def _det_samples(rng: random.Random, fonts: list[str | None], count: int, size: int) -> tuple[np.ndarray, list]:
    pages = [_render_page(rng, fonts, size) for _ in range(count)]
    return np.stack([x for x, _ in pages]).astype(np.float32), [boxes for _, boxes in pages]


def render_data(folder: Path, name: str, make: Callable[[int], tuple[np.ndarray, list]], counts: tuple[int, int]
                ) -> tuple[Path, Path, list]:
    """calibration .npz, evaluation .npz and the evaluation answers, rendered once into `folder`."""
    calib, evaluation, answers = (folder / f"{name}_{part}" for part in ("calib.npz", "eval.npz", "eval.json"))
    if not (calib.exists() and evaluation.exists() and answers.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        print(f"rendering {name} data into {folder} ...", file=sys.stderr, flush=True)
        calib_x, _ = make(counts[0])
        eval_x, eval_answers = make(counts[1])
        np.savez(calib, x=calib_x)
        np.savez(evaluation, x=eval_x)
        answers.write_text(json.dumps(eval_answers))
    return calib, evaluation, json.loads(answers.read_text())


# ------------------------------------------------------------------------------------------- scoring


def run(model: onnx.ModelProto | Path, x: np.ndarray, batch: int, threads: int) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def _edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def rec_score(probs: np.ndarray, labels: list[str], characters: list[str]) -> str:
    """Greedy CTC (repeats merged, blanks dropped) against the rendered text: character and line accuracy."""
    texts = []
    for best in probs.argmax(-1):
        keep = np.r_[True, best[1:] != best[:-1]] & (best != 0)
        texts.append("".join(characters[i] for i in best[keep]).strip())
    chars = np.mean([max(0.0, 1 - _edit_distance(t, g) / len(g)) for t, g in zip(texts, labels, strict=True)])
    lines = np.mean([t == g for t, g in zip(texts, labels, strict=True)])
    return f"char {100 * chars:.2f}%, line {100 * lines:.2f}%"


def _components(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x0, y0, x1, y1, inclusive) of the 8-connected components: row runs + union-find."""
    runs: list[tuple[int, int, int]] = []
    rows: list[list[int]] = []
    for y, row in enumerate(mask):
        edges = np.diff(np.r_[0, row.astype(np.int8), 0])
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
        rows.append(list(range(len(runs), len(runs) + len(starts))))
        runs += [(y, int(s), int(e)) for s, e in zip(starts, ends, strict=True)]
    parent = list(range(len(runs)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for above, below in zip(rows, rows[1:], strict=False):
        i = j = 0
        while i < len(above) and j < len(below):
            _, start_a, end_a = runs[above[i]]
            _, start_b, end_b = runs[below[j]]
            if start_a <= end_b + 1 and start_b <= end_a + 1:
                parent[find(above[i])] = find(below[j])
            if end_a < end_b:
                i += 1
            else:
                j += 1
    boxes: dict[int, tuple[int, int, int, int]] = {}
    for k, (y, start, end) in enumerate(runs):
        b = boxes.get(root := find(k))
        boxes[root] = (start, y, end, y) if b is None else (min(b[0], start), b[1], max(b[2], end), y)
    return list(boxes.values())


def _detect(prob: np.ndarray) -> list[tuple[float, float, float, float]]:
    """rapidocr's DBPostProcess, axis-aligned: threshold, 2x2 dilation, components, box score, unclip."""
    mask = prob > DB_THRESH
    dilated = mask.copy()
    dilated[:-1] |= mask[1:]
    dilated[:, :-1] |= mask[:, 1:]
    dilated[:-1, :-1] |= mask[1:, 1:]
    found = []
    for x0, y0, x1, y1 in _components(dilated):
        w, h = x1 - x0, y1 - y0
        if min(w, h) < DB_MIN_SIZE or prob[y0:y1 + 1, x0:x1 + 1].mean() < DB_BOX_THRESH:
            continue
        d = w * h * DB_UNCLIP / (2 * (w + h))
        found.append((x0 - d, y0 - d, x1 + d, y1 + d))
    return found


def _iou(a: tuple[float, ...] | list[int], b: tuple[float, ...] | list[int]) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _matches(found: list, truth: list, threshold: float = 0.5) -> int:
    pairs = sorted(((_iou(f, t), i, j) for i, f in enumerate(found) for j, t in enumerate(truth)), reverse=True)
    used_found, used_truth = set(), set()
    for overlap, i, j in pairs:
        if overlap <= threshold:
            break
        if i not in used_found and j not in used_truth:
            used_found.add(i)
            used_truth.add(j)
    return len(used_found)


def det_score(probs: np.ndarray, reference: np.ndarray, boxes: list[list[list[int]]]) -> str:
    """Text-map IoU with fp32's (pooled) and box recall / precision against the rendered lines."""
    text_map = probs[:, 0] > DB_THRESH
    iou = np.logical_and(text_map, reference).sum() / max(np.logical_or(text_map, reference).sum(), 1)
    found = [_detect(prob) for prob in probs[:, 0]]
    hits = sum(_matches(f, t) for f, t in zip(found, boxes, strict=True))
    recall, precision = hits / sum(map(len, boxes)), hits / max(sum(map(len, found)), 1)
    return f"IoU {iou:.4f}, R {100 * recall:.1f}%, P {100 * precision:.1f}%"


# ---------------------------------------------------------------------------------------------- rows


def _row(name: str, setting: str, result: QuantizeResult, score: str, seconds: float) -> list[str]:
    trials = len(result.method_trials) - 1 + len(result.exclusion_trials)
    return [
        name,
        setting,
        "int8" if result.quantized else "fp32",
        result.config.label if result.config else "-",
        f"{result.speedup:.2f}x" if result.speedup else "-",
        f"{format_bytes(result.size_fp32)} -> {format_bytes(result.size_int8 or 0)}",
        str(len(result.fp32_nodes)),
        str(trials),
        {True: "yes", False: "NO", None: "-"}[result.budget_met],
        "written int8" if result.quantized else "unwritten int8",
        score,
        f"{seconds:.0f} s",
    ]


def _scorer(path: Path, eval_x: np.ndarray, answers: list, threads: int) -> Callable[[onnx.ModelProto | Path], str]:
    """model -> its task metric on the evaluation set (rec if the model carries a character list, else det)."""
    metadata = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    if "character" in metadata:
        characters = ["<blank>", *metadata["character"].split("\n"), " "]  # as rapidocr: blank first, space last
        return lambda model: rec_score(run(model, eval_x, 25, threads), answers, characters)
    reference = run(path, eval_x, 4, threads)[:, 0] > DB_THRESH
    return lambda model: det_score(run(model, eval_x, 4, threads), reference, answers)


def benchmark(label: str, path: Path, calib_path: Path, eval_path: Path, answers: list,
              settings: list[tuple[str, QuantizeOptions]], threads: int) -> list[list[str]]:
    """The fp32 export's row, then one per setting."""
    score = _scorer(path, np.load(eval_path)["x"], answers, threads)
    rows = [[label, "fp32 export", "fp32", "-", "-", format_bytes(path.stat().st_size), "-", "-", "-", "fp32",
             score(path), "-"]]
    loaded = load_model(path)
    calib = open_dataset(calib_path, loaded.model, DataOptions())
    evaluation = open_dataset(eval_path, loaded.model, DataOptions())
    for setting, options in settings:
        print(f"quantizing {label}: {setting} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        result = quantize_model(loaded, calib, options, eval_data=evaluation)
        seconds = time.perf_counter() - start
        rows.append(_row(label, setting, result, score(result.model if result.quantized else result.int8_model),
                         seconds))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "onnxslim-bench" / "ppocr")
    parser.add_argument("--det-size", type=int, choices=(320, 640), default=320, help="detector page size")
    parser.add_argument("--min-fidelity", type=float, default=None, metavar="C", help="an extra row with this budget")
    parser.add_argument("--samples-rec", type=int, default=None, metavar="N",
                        help="N calibration and N evaluation lines (default 200 and 300)")
    parser.add_argument("--samples-det", type=int, default=None, metavar="N", help="N pages of each (default 48)")
    parser.add_argument("--models", nargs="+", choices=tuple(MODEL_FILES), default=list(MODEL_FILES))
    parser.add_argument("--threads", type=int, default=None, help="quantize's timing threads and scoring's")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    started = time.perf_counter()
    threads = args.threads or physical_cores()
    args.cache.mkdir(parents=True, exist_ok=True)
    try:
        paths = fetch_models(args.cache)
    except RuntimeError as e:
        print(f"cannot fetch PP-OCRv4 from {WHEEL}: {e}", file=sys.stderr)
        return 1
    font_source, fonts = find_fonts()
    font_tag = {"DejaVu from matplotlib": "mpl", "DejaVu from the system": "system"}.get(font_source, "pil")
    rec_counts = (args.samples_rec or 200, args.samples_rec or 300)
    det_counts = (args.samples_det or 48, args.samples_det or 48)
    folder = args.cache / f"data-{font_tag}"
    rec_rng, det_rng = random.Random(REC_SEED), random.Random(DET_SEED)
    data = {
        "rec": lambda: render_data(folder, f"rec{rec_counts[0]}-{rec_counts[1]}",
                                   lambda n: _rec_samples(rec_rng, fonts, n), rec_counts),
        "det": lambda: render_data(folder, f"det{args.det_size}px{det_counts[0]}-{det_counts[1]}",
                                   lambda n: _det_samples(det_rng, fonts, n, args.det_size), det_counts),
    }
    settings = [("plain int8 (max_trials=0, force)", QuantizeOptions(max_trials=0, force=True, threads=args.threads)),
                ("defaults (guard, cosine 0.99)", QuantizeOptions(threads=args.threads))]
    if args.min_fidelity is not None:
        settings.append((f"guard, min_fidelity {args.min_fidelity:g}",
                         QuantizeOptions(budget=AccuracyBudget(min_fidelity=args.min_fidelity), threads=args.threads)))
    rows = []
    for name in args.models:
        label = f"PP-OCRv4 {name}" + (f" {args.det_size}px" if name == "det" else "")
        rows += benchmark(label, paths[name], *data[name](), settings, threads)
    print(f"PP-OCRv4 from {WHEEL}; data: rec {rec_counts[0]} calibration / {rec_counts[1]} evaluation lines, det "
          f"{det_counts[0]} / {det_counts[1]} pages of {args.det_size}x{args.det_size}, {font_source}; batch 1; "
          "speedup: fp32 median / int8 median, interleaved, one run on this machine")
    print(format_table(
        ["model", "setting", "written", "int8 variant", "speedup", "size fp32 -> int8", "fp32 nodes", "trials",
         "budget met", "scored", "task metric", "quantize"],
        rows, markdown=args.markdown,
    ))
    print(f"\ntotal wall time {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
