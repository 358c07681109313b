"""Recovery on recurrent readers: built CRNN-like models, and ddddocr's captcha recognizer on rendered captchas.

    python benchmarks/recurrent_recovery.py [--no-built] [--no-ddddocr] [--ddddocr DIR] [--plan PLAN.json]
                                            [--target-macs 0.5] [--samples 200] [--sliced]

Built models (tests/builders.py, random weights, random inputs): `crnn_model` (a bidirectional LSTM unrolled
as Gemm/Sigmoid/Tanh with weights shared by every step), `unrolled_rnn_model` (shared Gemm and MatMul
weights) and `crnn_lstm_model` (one ONNX LSTM op), each pruned with `ratio=0.4, round_to=1` and calibrated on
200 random inputs, with recovery `none` and `lsq`: parameters, the distinct tensors read by the readers of the
most shared weight, and against the original on 200 other inputs the mean squared error and the top-1
agreement per time step.

ddddocr (the wheel `pip download ddddocr==1.6.1 --no-deps` fetches into a cache, unless `--ddddocr` names
its unpacked `ddddocr/` folder): `common.onnx` (the beta model: CNN → one bidirectional LSTM op → Gemm, CTC
over [T, 1, 8210]), fed 64×160 grey captchas rendered with Pillow (4–6 letters and digits of its charset in
DejaVu fonts, lines and Gaussian noise; seeded), `--samples` to calibrate and as many other ones to judge.
`prune_model` at `--target-macs` with the command line's defaults (activation, round-to 8, first and last
layers protected) or at a saved `--plan`; exact strings and characters (1 − edit distance / length, greedy
CTC decoding as ddddocr does) of the original and the pruned model, the relative squared error of the LSTM's
input and output and of the logits, and the wall time. `--sliced` also measures the plan without recovery.

Run it against another onnxslim (e.g. an older commit's `onnxslim/` exported by `git archive` to DIR) with
`PYTHONPATH=DIR`: it uses only `prune_model`, `open_dataset` and `normalize_model`.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from builders import crnn_lstm_model, crnn_model, unrolled_rnn_model  # noqa: E402

from onnxslim.calib import open_dataset  # noqa: E402
from onnxslim.io import normalize_model  # noqa: E402
from onnxslim.prune import prune_model  # noqa: E402

CLI_DEFAULTS = {"criterion": "activation", "round_to": 8, "protect_first": True, "protect_last": True}
WHEEL = "ddddocr==1.6.1"
CACHE = Path(tempfile.gettempdir()) / "onnxslim-bench-ddddocr"
FONTS = [f"/usr/share/fonts/truetype/dejavu/{name}.ttf" for name in ("DejaVuSans", "DejaVuSerif", "DejaVuSansMono")]


def _session(model: onnx.ModelProto, exposed: tuple[str, ...] = ()) -> Any:
    import onnxruntime as ort

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for name in exposed:
        copy.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(copy.SerializeToString(), options, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------ built models


def _distinct_shared(model: onnx.ModelProto, reference: onnx.ModelProto) -> tuple[int, int]:
    """(readers, distinct weight tensors they read in `model`) for the most shared weight of `reference`."""
    readers: dict[str, list[str]] = {}
    for node in reference.graph.node:
        if node.op_type in ("Gemm", "MatMul") and len(node.input) > 1:
            readers.setdefault(node.input[1], []).append(node.name)
    names = max(readers.values(), key=len)
    nodes = {node.name: node for node in model.graph.node}
    return len(names), len({nodes[name].input[1] for name in names})


def built(samples: int = 200) -> list[str]:
    rows = ["model                recover  params  readers  tensors       mse  top-1 agreement", "-" * 78]
    for name, build in (("crnn_model", crnn_model), ("unrolled_rnn_model", unrolled_rnn_model),
                        ("crnn_lstm_model", crnn_lstm_model)):
        model = build()
        normalized = normalize_model(model)[0]
        shape = [d.dim_value for d in normalized.graph.input[0].type.tensor_type.shape.dim[1:]]
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "calib.npz"
            np.savez(path, input=np.random.default_rng(0).standard_normal((samples, *shape)).astype(np.float32))
            calib = open_dataset(path, normalized)
            test = np.random.default_rng(1).standard_normal((samples, *shape)).astype(np.float32)
            want = _session(normalized).run(None, {"input": test})[0]
            rows.append(f"{name:<20} original {sum(int(np.prod(t.dims)) for t in normalized.graph.initializer):>7}  "
                        f"{_distinct_shared(normalized, normalized)[0]:>7}  {1:>7}")
            for recover in ("none", "lsq"):
                result = prune_model(model, ratio=0.4, round_to=1, calib=calib, recover=recover)
                got = _session(result.model).run(None, {"input": test})[0]
                readers, tensors = _distinct_shared(result.model, normalized)
                mse = float(np.mean((got - want) ** 2))
                agreement = float(np.mean(got.argmax(-1) == want.argmax(-1)))
                rows.append(f"{'':<20} {recover:<8} {result.params_after:>7}  {readers:>7}  {tensors:>7}  "
                            f"{mse:>8.4f}  {agreement:>15.3f}")
    return rows


# ------------------------------------------------------------------------------------------------ ddddocr


def fetch_ddddocr(folder: Path | None) -> Path:
    """The unpacked `ddddocr/` package folder of the wheel (downloaded once into a cache)."""
    if folder is not None:
        return folder
    package = CACHE / "ddddocr"
    if not (package / "common.onnx").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-q", "-d", str(CACHE)], check=True)
        wheel = next(CACHE.glob("ddddocr-*.whl"))
        import zipfile

        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(CACHE)
    return package


def beta_charset(package: Path) -> list[str]:
    """The charset `common.onnx` decodes with (CharsetManager._get_beta_charset), read without importing it."""
    tree = ast.parse((package / "models" / "charset_manager.py").read_text(encoding="utf-8"))
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef) and function.name == "_get_beta_charset":
            for node in ast.walk(function):
                if isinstance(node, ast.Return) and node.value is not None:
                    return list(ast.literal_eval(node.value))
    raise SystemExit("ddddocr's beta charset was not found")


def render(rng: np.random.Generator, alphabet: list[str], width: int = 160, height: int = 64) -> tuple[str, np.ndarray]:
    """A captcha: 4–6 characters at jittered heights, three lines, Gaussian noise; [1, height, width] in 0–1."""
    from PIL import Image, ImageDraw, ImageFont

    text = "".join(rng.choice(alphabet, int(rng.integers(4, 7))))
    image = Image.new("L", (width, height), int(rng.integers(200, 256)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        points = [tuple(int(v) for v in rng.integers(0, [width, height])) for _ in range(2)]
        draw.line(points, fill=int(rng.integers(60, 180)), width=int(rng.integers(1, 3)))
    font = ImageFont.truetype(FONTS[int(rng.integers(len(FONTS)))], int(rng.integers(28, 38)))
    x = int(rng.integers(2, 12))
    for character in text:
        draw.text((x, int(rng.integers(2, height - 40))), character, fill=int(rng.integers(0, 90)), font=font)
        x += int(font.getlength(character)) + int(rng.integers(-1, 4))
    pixels = np.asarray(image, np.float32) + rng.normal(0, 18, (height, width))
    return text, (np.clip(pixels, 0, 255) / 255.0)[None].astype(np.float32)


def _edits(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[:], i
        for j, cb in enumerate(b, 1):
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (ca != cb))
    return row[-1]


def read_strings(model: onnx.ModelProto, images: np.ndarray, charset: list[str]) -> list[str]:
    session = _session(model)
    name = session.get_inputs()[0].name
    strings = []
    for image in images:
        best = session.run(None, {name: image[None]})[0].argmax(-1).reshape(-1)
        decoded, previous = [], None
        for index in best:
            if index != previous and index != 0:
                decoded.append(charset[int(index)])
            previous = index
        strings.append("".join(decoded))
    return strings


def _accuracy(read: list[str], truth: list[str]) -> tuple[float, float]:
    exact = float(np.mean([r == t for r, t in zip(read, truth, strict=True)]))
    characters = 1 - sum(_edits(r, t) for r, t in zip(read, truth, strict=True)) / sum(len(t) for t in truth)
    return exact, characters


def _relative_errors(model: onnx.ModelProto, original: onnx.ModelProto, images: np.ndarray) -> dict[str, float]:
    """Squared error / variance of the LSTM's input and output and of the logits, against the original."""
    lstm = next(node for node in original.graph.node if node.op_type == "LSTM")
    logits = next(node for node in original.graph.node if node.op_type == "Gemm")
    names = (lstm.input[0], lstm.output[0], logits.output[0])
    ours, theirs = _session(model, names), _session(original, names)
    error, variance = np.zeros(3), np.zeros(3)
    for image in images:
        a = ours.run(list(names), {"input1": image[None]})
        b = theirs.run(list(names), {"input1": image[None]})
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            error[i] += float(np.sum((u - v) ** 2))
            variance[i] += float(np.sum((v - v.mean()) ** 2))
    return dict(zip(("lstm input", "lstm output", "logits"), (error / variance).tolist(), strict=True))


def ddddocr(folder: Path | None, target: float, samples: int, plan: str | None, sliced: bool) -> list[str]:
    package = fetch_ddddocr(folder)
    charset = beta_charset(package)
    alphabet = [c for c in charset if c.isascii() and c.isalnum()]
    original = onnx.load(str(package / "common.onnx"))

    def captchas(seed: int) -> tuple[list[str], np.ndarray]:
        rng = np.random.default_rng(seed)
        drawn = [render(rng, alphabet) for _ in range(samples)]
        return [text for text, _ in drawn], np.stack([image for _, image in drawn])

    _, calib_images = captchas(1)
    truth, images = captchas(2)
    rows = [f"ddddocr common.onnx: {samples} captchas calibrate, {samples} others judge",
            "model              exact  chars  lstm in  lstm out  logits   MACs kept  params   seconds", "-" * 86]
    exact, characters = _accuracy(read_strings(original, images, charset), truth)
    rows.append(f"{'original':<18} {exact:>5.3f}  {characters:>5.3f}")
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "calib.npz"
        np.savez(path, input1=calib_images)
        calib = open_dataset(path, original)
        budget: dict[str, Any] = {"plan_path": plan} if plan else {"target_macs": target}
        for recover in ("none", "lsq") if sliced else ("lsq",):
            start = time.perf_counter()
            result = prune_model(original, input_shapes={"input1": (1, 1, 64, 160)}, calib=calib, recover=recover,
                                 **CLI_DEFAULTS, **budget)
            seconds = time.perf_counter() - start
            exact, characters = _accuracy(read_strings(result.model, images, charset), truth)
            errors = _relative_errors(result.model, original, images[:40])
            rows.append(
                f"{'pruned, ' + recover:<18} {exact:>5.3f}  {characters:>5.3f}  {errors['lstm input']:>7.3f}  "
                f"{errors['lstm output']:>8.3f}  {errors['logits']:>6.3f}  {result.macs_after / result.macs_before:>10.3f}"
                f"  {result.params_after / 1e6:>5.2f}M  {seconds:>8.1f}"
            )
    rows.append("(lstm in/out, logits: squared error / variance against the original on 40 of the judging captchas;"
                " MACs kept: of the MACs this onnxslim counts)")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-built", action="store_true", help="skip the built models")
    parser.add_argument("--no-ddddocr", action="store_true", help="skip ddddocr's recognizer")
    parser.add_argument("--ddddocr", type=Path, default=None, help="the unpacked ddddocr/ package folder")
    parser.add_argument("--plan", default=None, help="a saved plan for common.onnx instead of --target-macs")
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--sliced", action="store_true", help="also the plan without recovery")
    args = parser.parse_args(argv)
    if not args.no_built:
        print("\n".join(built()), end="\n\n", flush=True)
    if not args.no_ddddocr:
        print("\n".join(ddddocr(args.ddddocr, args.target_macs, args.samples, args.plan, args.sliced)))


if __name__ == "__main__":
    main()
