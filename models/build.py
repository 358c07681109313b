"""Benchmark architectures built in pure ONNX with seeded random weights (no PyTorch, no download).

    python -m models.build [--out DIR] [--only NAME] [--seed N]

writes ``resnet18_like.onnx``, ``mobilenetv2_like.onnx``, ``yolo_like.onnx`` and ``yolov8_like.onnx`` (default folder
``models/bench/``, which is not committed: the build takes seconds). Tests and benchmark scripts
call ``build_resnet18_like()`` etc. in-process instead.

The graphs are shaped like real exports (``shared/PATTERNS.md``): PyTorch eval exports with BatchNorm
folded into the Conv bias, weights as initializers, node names ``/scope/OpType`` and tensor names
``/scope/OpType_output_0`` like the TorchScript exporter, Relu6 as ``Clip`` with min/max inputs, SiLU as
``Sigmoid`` + ``Mul``, Split sizes and Resize scales as inputs (opset 17).

Weights are random with a fixed seed, then given the statistics of a trained, folded BatchNorm: going
through the convs in order, each one's output on a random probe batch is normalised per channel and
scaled by a gamma drawn from [0.5, 1.5] plus a beta from N(0, 0.1) (both halved on the last conv of a
residual branch). So channels differ in magnitude, as in a trained network, and activations neither
explode nor vanish through the depth (a SiLU net without it blows up within a few blocks).
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "BUILDERS",
    "build_mobilenetv2_like",
    "build_resnet18_like",
    "build_yolo_like",
    "build_yolov8_like",
    "write_models",
]

OPSET = 17
IR_VERSION = 8  # what PyTorch writes for opset 17
PRODUCER = "onnxslim.models.build"
DEFAULT_OUT = Path(__file__).resolve().parent / "bench"

# BN gamma/beta scale of a residual branch's last conv, so that each Add grows activations only a little
RESIDUAL_SCALE = 0.5
# images in the probe batch on which BatchNorm statistics are measured; more than one, so that the
# statistics of the low-resolution layers include the variation between images, as a trained BN's do
PROBE_BATCH = 4


class _GraphBuilder:
    """Accumulates nodes and initializers of one graph; every op method returns its output tensor's name.

    ``scope`` arguments are module paths such as ``layer1/layer1.0/conv1``; they name nodes
    (``/layer1/layer1.0/conv1/Conv``) and weights (``layer1.layer1.0.conv1.weight``), as PyTorch does.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.inputs: list[onnx.ValueInfoProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, np.ndarray] = {}
        self.channels: dict[str, int] = {}  # tensor name -> size of its axis 1
        self._batchnorms: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # Conv node -> (gamma, beta)
        self._node_names: set[str] = set()

    # ------------------------------------------------------------------------------ plumbing

    def input(self, name: str, shape: Sequence[int | str]) -> str:
        """Declare a float32 graph input (symbolic dims by name)."""
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        self.channels[name] = int(shape[1])
        return name

    def initializer(self, name: str, array: np.ndarray) -> str:
        """Add a constant once; later calls with the same name reuse it (as exporters dedupe constants)."""
        self.initializers.setdefault(name, array)
        return name

    def node(
        self,
        op_type: str,
        inputs: Sequence[str],
        scope: str,
        channels: int | None,
        num_outputs: int = 1,
        **attributes: object,
    ) -> list[str]:
        """Append a node named ``/scope/OpType`` (``_1``, ``_2`` … when repeated) and return its outputs."""
        base = f"/{scope}/{op_type}" if scope else f"/{op_type}"
        name, count = base, 0
        while name in self._node_names:
            count += 1
            name = f"{base}_{count}"
        self._node_names.add(name)
        outputs = [f"{name}_output_{index}" for index in range(num_outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=name, **attributes))
        if channels is not None:
            for output in outputs:
                self.channels[output] = channels
        return outputs

    def build(
        self, name: str, outputs: dict[str, tuple[str, Sequence[int | str]]], probe: np.ndarray
    ) -> onnx.ModelProto:
        """Fold BatchNorm statistics measured on ``probe`` into the convs and return the checked model.

        ``outputs`` maps each graph output name to (tensor, shape).
        """
        self._fold_batchnorms(probe)
        renames = {tensor: output_name for output_name, (tensor, _) in outputs.items()}
        for node in self.nodes:
            node.output[:] = [renames.get(tensor, tensor) for tensor in node.output]
            node.input[:] = [renames.get(tensor, tensor) for tensor in node.input]
        graph_outputs = [
            helper.make_tensor_value_info(output_name, TensorProto.FLOAT, list(shape))
            for output_name, (_, shape) in outputs.items()
        ]
        model = self._model(self.nodes, graph_outputs, name)
        onnx.checker.check_model(model, full_check=True)
        return model

    def _model(
        self,
        nodes: Sequence[onnx.NodeProto],
        outputs: Sequence[onnx.ValueInfoProto],
        name: str,
        inputs: Sequence[onnx.ValueInfoProto] | None = None,
    ) -> onnx.ModelProto:
        used = {tensor for node in nodes for tensor in node.input}
        initializers = [
            numpy_helper.from_array(array, key) for key, array in self.initializers.items() if key in used
        ]
        graph = helper.make_graph(
            nodes, name, self.inputs if inputs is None else inputs, outputs, initializer=initializers
        )
        return helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name=PRODUCER,
        )

    def _fold_batchnorms(self, probe: np.ndarray) -> None:
        """Give each Conv the output statistics a trained, folded BatchNorm would: per channel, normalise
        its output on the ``probe`` batch to zero mean and unit variance, then scale by gamma, add beta.

        The graph is evaluated node by node in order, so each Conv is measured on inputs that are already
        normalised upstream (the fold is affine, so a folded Conv's new output is computed directly).
        """
        values = {self.inputs[0].name: probe}
        remaining_uses = Counter(tensor for node in self.nodes for tensor in node.input)
        unfolded = set(self._batchnorms)
        for node in self.nodes:
            if not unfolded:  # the rest changes no weights (and a head may fix the batch at 1)
                break
            outputs = self._run_node(node, values)
            if node.name in unfolded:
                outputs = [self._fold_batchnorm(node, outputs[0])]
                unfolded.discard(node.name)
            values.update(zip(node.output, outputs, strict=True))
            remaining_uses.subtract(node.input)
            for tensor in node.input:
                if remaining_uses[tensor] == 0:
                    values.pop(tensor, None)

    def _fold_batchnorm(self, conv: onnx.NodeProto, activation: np.ndarray) -> np.ndarray:
        """Rescale ``conv``'s weight and bias so that its output on the probe, ``activation``, becomes
        gamma * (activation - mean) / std + beta per channel; return that new output."""
        mean = activation.mean(axis=(0, 2, 3))
        std = activation.std(axis=(0, 2, 3)) + 1e-5
        gamma, beta = self._batchnorms[conv.name]
        factor = gamma / std
        shift = beta - mean * factor
        _, weight, bias = conv.input
        self.initializers[weight] = (self.initializers[weight] * factor[:, None, None, None]).astype(
            np.float32
        )
        self.initializers[bias] = (self.initializers[bias] * factor + shift).astype(np.float32)
        return (activation * factor[:, None, None] + shift[:, None, None]).astype(np.float32)

    def _run_node(self, node: onnx.NodeProto, values: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Evaluate one node in onnxruntime on the given values of its variable inputs."""
        feeds = {name: values[name] for name in node.input if name in values}
        inputs = [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)
            for name, array in feeds.items()
        ]
        outputs = [onnx.ValueInfoProto(name=name) for name in node.output]  # any type: Shape gives int64
        model = self._model([node], outputs, node.name, inputs)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(None, feeds)

    # ------------------------------------------------------------------------ weighted layers

    def conv(
        self,
        x: str,
        out_channels: int,
        scope: str,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        bn_scale: float = 1.0,
    ) -> str:
        """Conv with 'same' padding and a bias, as PyTorch exports Conv + BatchNorm in eval mode.

        Weights are random (He-style); ``build`` later folds a BatchNorm into them whose gamma is drawn
        from [0.5, 1.5] and beta from N(0, 0.1), both times ``bn_scale``.
        """
        in_channels = self.channels[x]
        fan_in = in_channels // groups * kernel * kernel
        shape = (out_channels, in_channels // groups, kernel, kernel)
        prefix = scope.replace("/", ".")
        inputs = [
            x,
            self.initializer(
                f"{prefix}.weight", self.rng.normal(0.0, math.sqrt(2.0 / fan_in), shape).astype(np.float32)
            ),
            self.initializer(f"{prefix}.bias", np.zeros(out_channels, np.float32)),
        ]
        (output,) = self.node(
            "Conv",
            inputs,
            scope,
            out_channels,
            dilations=[1, 1],
            group=groups,
            kernel_shape=[kernel, kernel],
            pads=[kernel // 2] * 4,
            strides=[stride, stride],
        )
        gamma = self.rng.uniform(0.5, 1.5, out_channels) * bn_scale
        beta = self.rng.normal(0.0, 0.1, out_channels) * bn_scale
        self._batchnorms[self.nodes[-1].name] = (gamma, beta)
        return output

    def gemm(self, x: str, out_features: int, scope: str) -> str:
        """Fully connected layer as PyTorch exports nn.Linear (Gemm, transB=1)."""
        in_features = self.channels[x]
        weight = self.rng.normal(0.0, 1.0 / math.sqrt(in_features), (out_features, in_features))
        prefix = scope.replace("/", ".")
        inputs = [
            x,
            self.initializer(f"{prefix}.weight", weight.astype(np.float32)),
            self.initializer(f"{prefix}.bias", np.zeros(out_features, np.float32)),
        ]
        (output,) = self.node("Gemm", inputs, scope, out_features, alpha=1.0, beta=1.0, transB=1)
        return output

    # ------------------------------------------------------------------------------ activations

    def relu(self, x: str, scope: str) -> str:
        return self.node("Relu", [x], scope, self.channels[x])[0]

    def relu6(self, x: str, scope: str) -> str:
        """Relu6 as the TorchScript exporter writes it at opset >= 11: Clip with min/max inputs."""
        low = self.initializer("relu6.min", np.array(0.0, np.float32))
        high = self.initializer("relu6.max", np.array(6.0, np.float32))
        return self.node("Clip", [x, low, high], scope, self.channels[x])[0]

    def silu(self, x: str, scope: str) -> str:
        """SiLU as x * Sigmoid(x): two consumers of ``x`` joined again by the Mul."""
        gate = self.sigmoid(x, scope)
        return self.mul(x, gate, scope)

    def sigmoid(self, x: str, scope: str) -> str:
        return self.node("Sigmoid", [x], scope, self.channels[x])[0]

    # ---------------------------------------------------------------------- structure and shape

    def add(self, a: str, b: str, scope: str) -> str:
        return self.node("Add", [a, b], scope, self.channels[a])[0]

    def mul(self, a: str, b: str, scope: str) -> str:
        return self.node("Mul", [a, b], scope, self.channels[a])[0]

    def concat(self, parts: Sequence[str], scope: str, axis: int = 1) -> str:
        channels = sum(self.channels[part] for part in parts) if axis == 1 else self.channels[parts[0]]
        return self.node("Concat", parts, scope, channels, axis=axis)[0]

    def split(self, x: str, sizes: Sequence[int], scope: str, axis: int = 1) -> list[str]:
        """Split with sizes as an input (opset >= 13)."""
        sizes_name = self.initializer(f"{scope.replace('/', '.')}.split", np.array(sizes, np.int64))
        outputs = self.node("Split", [x, sizes_name], scope, None, num_outputs=len(sizes), axis=axis)
        for output, size in zip(outputs, sizes, strict=True):
            self.channels[output] = size if axis == 1 else self.channels[x]
        return outputs

    def max_pool(self, x: str, kernel: int, stride: int, scope: str) -> str:
        padding = kernel // 2
        return self.node(
            "MaxPool",
            [x],
            scope,
            self.channels[x],
            ceil_mode=0,
            dilations=[1, 1],
            kernel_shape=[kernel, kernel],
            pads=[padding] * 4,
            strides=[stride, stride],
        )[0]

    def upsample(self, x: str, scope: str, factor: float = 2.0) -> str:
        """nn.Upsample(mode='nearest') as exported: Resize(x, roi='', scales) with nearest/floor."""
        scales = self.initializer(
            f"{scope.replace('/', '.')}.scales", np.array([1, 1, factor, factor], np.float32)
        )
        return self.node(
            "Resize",
            [x, "", scales],
            scope,
            self.channels[x],
            coordinate_transformation_mode="asymmetric",
            cubic_coeff_a=-0.75,
            mode="nearest",
            nearest_mode="floor",
        )[0]

    def global_average_pool(self, x: str, scope: str) -> str:
        return self.node("GlobalAveragePool", [x], scope, self.channels[x])[0]

    def flatten(self, x: str, scope: str = "") -> str:
        return self.node("Flatten", [x], scope, self.channels[x], axis=1)[0]

    def reshape(self, x: str, shape: Sequence[int], scope: str) -> str:
        shape_name = self.initializer(f"{scope.replace('/', '.')}.shape", np.array(shape, np.int64))
        return self.node("Reshape", [x, shape_name], scope, shape[1])[0]


# ------------------------------------------------------------------------------------ ResNet-18


def _normalized_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A probe batch like ImageNet-normalised images: zero mean, unit variance."""
    return rng.standard_normal((PROBE_BATCH, 3, size, size)).astype(np.float32)


def _basic_block(g: _GraphBuilder, x: str, width: int, stride: int, scope: str) -> str:
    """conv3x3 -> relu -> conv3x3, plus the input (through a 1x1 stride-s projection if needed), relu."""
    out = g.relu(g.conv(x, width, f"{scope}/conv1", kernel=3, stride=stride), f"{scope}/relu")
    out = g.conv(out, width, f"{scope}/conv2", kernel=3, bn_scale=RESIDUAL_SCALE)
    shortcut = x
    if stride != 1 or g.channels[x] != width:
        shortcut = g.conv(x, width, f"{scope}/downsample/downsample.0", stride=stride)
    return g.relu(g.add(out, shortcut, scope), f"{scope}/relu")


def build_resnet18_like(seed: int = 0) -> onnx.ModelProto:
    """ResNet-18 on [1, 3, 224, 224] as a PyTorch eval export: BN folded, GlobalAveragePool -> Flatten -> Gemm."""
    g = _GraphBuilder(seed)
    x = g.input("input", [1, 3, 224, 224])
    x = g.relu(g.conv(x, 64, "conv1", kernel=7, stride=2), "relu")
    x = g.max_pool(x, kernel=3, stride=2, scope="maxpool")
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            stride = 2 if stage > 1 and block == 0 else 1
            x = _basic_block(g, x, width, stride, f"layer{stage}/layer{stage}.{block}")
    logits = g.gemm(g.flatten(g.global_average_pool(x, "avgpool")), 1000, "fc")
    return g.build("resnet18_like", {"output": (logits, [1, 1000])}, probe=_normalized_image(g.rng, 224))


# --------------------------------------------------------------------------------- MobileNetV2

# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper
_MOBILENETV2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _child(scope: str, index: int) -> str:
    """Scope of item ``index`` of an nn.Sequential at ``scope``: ``a/b`` -> ``a/b/b.<index>``."""
    return f"{scope}/{scope.rsplit('/', 1)[-1]}.{index}"


def _conv_relu6(
    g: _GraphBuilder, x: str, out_channels: int, scope: str, kernel: int = 1, stride: int = 1, groups: int = 1
) -> str:
    """torchvision's Conv2dNormActivation with ReLU6, BN folded: Conv -> Clip(0, 6)."""
    out = g.conv(x, out_channels, _child(scope, 0), kernel=kernel, stride=stride, groups=groups)
    return g.relu6(out, _child(scope, 2))


def _inverted_residual(
    g: _GraphBuilder, x: str, expansion: int, out_channels: int, stride: int, scope: str
) -> str:
    """[1x1 expand -> relu6] -> depthwise 3x3 -> relu6 -> 1x1 linear project, Add when shapes match."""
    in_channels = g.channels[x]
    use_residual = stride == 1 and in_channels == out_channels
    hidden = in_channels * expansion
    out, layer = x, 0
    if expansion != 1:
        out = _conv_relu6(g, out, hidden, f"{scope}/conv/conv.{layer}")
        layer += 1
    out = _conv_relu6(g, out, hidden, f"{scope}/conv/conv.{layer}", kernel=3, stride=stride, groups=hidden)
    project_scale = RESIDUAL_SCALE if use_residual else 1.0
    out = g.conv(out, out_channels, f"{scope}/conv/conv.{layer + 1}", bn_scale=project_scale)
    return g.add(x, out, scope) if use_residual else out


def build_mobilenetv2_like(seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2 (width 1.0) on [1, 3, 224, 224]: depthwise convs, Clip as Relu6, residual Adds, Gemm head."""
    g = _GraphBuilder(seed)
    x = g.input("input", [1, 3, 224, 224])
    x = _conv_relu6(g, x, 32, "features/features.0", kernel=3, stride=2)
    index = 1
    for expansion, out_channels, repeats, first_stride in _MOBILENETV2_STAGES:
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            x = _inverted_residual(g, x, expansion, out_channels, stride, f"features/features.{index}")
            index += 1
    x = _conv_relu6(g, x, 1280, f"features/features.{index}")
    logits = g.gemm(g.flatten(g.global_average_pool(x, "")), 1000, "classifier/classifier.1")
    return g.build("mobilenetv2_like", {"output": (logits, [1, 1000])}, probe=_normalized_image(g.rng, 224))


# ------------------------------------------------------------------------------------ YOLO-like

_YOLO_CLASSES = 80
_YOLO_BOX_CHANNELS = 64  # 4 sides x 16 distribution bins, as in YOLOv8's DFL head


def _conv_silu(
    g: _GraphBuilder,
    x: str,
    out_channels: int,
    scope: str,
    kernel: int = 1,
    stride: int = 1,
    bn_scale: float = 1.0,
) -> str:
    """Ultralytics ``Conv``: Conv (BN folded) -> Sigmoid -> Mul."""
    out = g.conv(x, out_channels, f"{scope}/conv", kernel=kernel, stride=stride, bn_scale=bn_scale)
    return g.silu(out, f"{scope}/act")


def _bottleneck(g: _GraphBuilder, x: str, shortcut: bool, scope: str) -> str:
    """Two 3x3 Conv+SiLU, plus the input when ``shortcut``."""
    channels = g.channels[x]
    out = _conv_silu(g, x, channels, f"{scope}/cv1", kernel=3)
    out = _conv_silu(g, out, channels, f"{scope}/cv2", kernel=3, bn_scale=RESIDUAL_SCALE if shortcut else 1.0)
    return g.add(x, out, scope) if shortcut else out


def _c2f(g: _GraphBuilder, x: str, out_channels: int, repeats: int, shortcut: bool, scope: str) -> str:
    """C2f: Conv -> Split(2) -> bottlenecks chained on the last part -> Concat(all parts) -> Conv."""
    hidden = out_channels // 2
    parts = g.split(_conv_silu(g, x, 2 * hidden, f"{scope}/cv1"), [hidden, hidden], scope)
    for repeat in range(repeats):
        parts.append(_bottleneck(g, parts[-1], shortcut, f"{scope}/m.{repeat}"))
    return _conv_silu(g, g.concat(parts, scope), out_channels, f"{scope}/cv2")


def _sppf(g: _GraphBuilder, x: str, out_channels: int, scope: str) -> str:
    """SPPF: Conv -> MaxPool(5, stride 1) x3 -> Concat(4) -> Conv."""
    pooled = [_conv_silu(g, x, g.channels[x] // 2, f"{scope}/cv1")]
    for _ in range(3):
        pooled.append(g.max_pool(pooled[-1], kernel=5, stride=1, scope=f"{scope}/m"))
    return _conv_silu(g, g.concat(pooled, scope), out_channels, f"{scope}/cv2")


def _detect_branch(g: _GraphBuilder, x: str, hidden: int, out_channels: int, scope: str) -> str:
    """Conv3x3+SiLU -> Conv3x3+SiLU -> plain 1x1 Conv with bias."""
    out = _conv_silu(g, x, hidden, _child(scope, 0), kernel=3)
    out = _conv_silu(g, out, hidden, _child(scope, 1), kernel=3)
    return g.conv(out, out_channels, _child(scope, 2))


def _yolov8n_features(g: _GraphBuilder, x: str) -> tuple[str, str, str]:
    """YOLOv8n's backbone (Conv+SiLU, C2f, SPPF) and FPN/PAN neck: the P3, P4, P5 features (64, 128, 256
    channels at strides 8, 16, 32)."""
    # backbone: strides 2, 4, 8 (P3), 16 (P4), 32 (P5)
    x = _conv_silu(g, x, 16, "model.0", kernel=3, stride=2)
    x = _conv_silu(g, x, 32, "model.1", kernel=3, stride=2)
    x = _c2f(g, x, 32, 1, True, "model.2")
    x = _conv_silu(g, x, 64, "model.3", kernel=3, stride=2)
    p3 = _c2f(g, x, 64, 2, True, "model.4")
    x = _conv_silu(g, p3, 128, "model.5", kernel=3, stride=2)
    p4 = _c2f(g, x, 128, 2, True, "model.6")
    x = _conv_silu(g, p4, 256, "model.7", kernel=3, stride=2)
    x = _c2f(g, x, 256, 1, True, "model.8")
    p5 = _sppf(g, x, 256, "model.9")

    # neck, top-down (FPN) then bottom-up (PAN)
    x = g.concat([g.upsample(p5, "model.10"), p4], "model.11")
    n4 = _c2f(g, x, 128, 1, False, "model.12")
    x = g.concat([g.upsample(n4, "model.13"), p3], "model.14")
    out3 = _c2f(g, x, 64, 1, False, "model.15")
    x = g.concat([_conv_silu(g, out3, 64, "model.16", kernel=3, stride=2), n4], "model.17")
    out4 = _c2f(g, x, 128, 1, False, "model.18")
    x = g.concat([_conv_silu(g, out4, 128, "model.19", kernel=3, stride=2), p5], "model.20")
    out5 = _c2f(g, x, 256, 1, False, "model.21")
    return out3, out4, out5


def build_yolo_like(seed: int = 0) -> onnx.ModelProto:
    """A YOLOv8n-shaped detector on ``images`` [1, 3, 320, 320] -> ``output0`` [1, 144, 2100].

    Backbone of Conv+SiLU and C2f blocks with SPPF; FPN/PAN neck with Resize + Concat up and stride-2
    Conv + Concat down; a head per scale (box 64 + class 80 channels) Reshaped to [1, 144, -1],
    Concatenated over the three scales, split into box and class rows, Sigmoid on the classes and
    Concatenated again into the single output (no DFL or box decoding: see ``build_yolov8_like``).
    """
    g = _GraphBuilder(seed)
    x = g.input("images", [1, 3, 320, 320])
    out3, out4, out5 = _yolov8n_features(g, x)

    # head: per scale, box and class branches -> Concat -> Reshape [1, C, -1]; Concat over scales
    head_channels = _YOLO_BOX_CHANNELS + _YOLO_CLASSES
    flattened = []
    for scale, feature in enumerate((out3, out4, out5)):
        box = _detect_branch(g, feature, 64, _YOLO_BOX_CHANNELS, f"model.22/cv2.{scale}")
        cls = _detect_branch(g, feature, 80, _YOLO_CLASSES, f"model.22/cv3.{scale}")
        per_scale = g.concat([box, cls], "model.22")
        flattened.append(g.reshape(per_scale, [1, head_channels, -1], "model.22"))
    predictions = g.concat(flattened, "model.22", axis=2)
    box, cls = g.split(predictions, [_YOLO_BOX_CHANNELS, _YOLO_CLASSES], "model.22")
    output = g.concat([box, g.sigmoid(cls, "model.22")], "model.22")
    anchors = sum((320 // stride) ** 2 for stride in (8, 16, 32))
    probe = g.rng.uniform(0.0, 1.0, (PROBE_BATCH, 3, 320, 320)).astype(np.float32)  # pixels / 255
    return g.build("yolo_like", {"output0": (output, [1, head_channels, anchors])}, probe=probe)


# ------------------------------------------------------------------------- YOLOv8 Detect head

_DFL_BINS = 16  # ultralytics' reg_max: each box side is a distribution over 16 distances
_YOLOV8_STRIDES = (8, 16, 32)


class _HeadBuilder:
    """The small tensors of the ultralytics v8 head: int64 shape constants, float scalars, shape arithmetic."""

    def __init__(self, g: _GraphBuilder, scope: str = "model.22") -> None:
        self.g = g
        self.scope = scope
        self._constants = 0

    def constant(self, values: object, dtype: type = np.int64) -> str:
        """An initializer as the exporter names folded constants (``/model.22/Constant_3_output_0``)."""
        suffix = f"_{self._constants}" if self._constants else ""
        self._constants += 1
        return self.g.initializer(f"/{self.scope}/Constant{suffix}_output_0", np.array(values, dtype))

    def op(self, op_type: str, inputs: Sequence[str], scope: str | None = None, channels: int | None = None,
           **attributes: object) -> str:
        return self.g.node(op_type, inputs, scope or self.scope, channels, **attributes)[0]

    def dims(self, x: str, axes: Sequence[int], scope: str | None = None) -> list[str]:
        """Shape(x) → Gather(axis) per axis: shape-[] int64 scalars computed at run time."""
        shape = self.op("Shape", [x], scope)
        return [self.op("Gather", [shape, self.constant(axis)], scope, axis=0) for axis in axes]

    def as_1d(self, scalar: str, scope: str | None = None) -> str:
        return self.op("Unsqueeze", [scalar, self.constant([0])], scope)


def _computed_anchors(head: _HeadBuilder, height: str, width: str, stride: int) -> tuple[str, str]:
    """ultralytics' ``make_anchors`` for one scale as torch 2.3 exports it, from the feature map's h and w
    (shape-[] scalars): Range + 0.5 per axis, meshgrid (Reshape → Expand), stack (Unsqueeze → Concat) →
    [h·w, 2] anchor points; ``torch.full((h·w, 1), stride)`` as ConstantOfShape(Concat(Unsqueeze(h·w), [1]))
    + stride → [h·w, 1]."""
    centres = []
    for size in (width, height):  # sx, sy
        count = head.op("Cast", [size], to=TensorProto.FLOAT)
        steps = head.op("Range", [head.constant(0.0, np.float32), count, head.constant(1.0, np.float32)])
        centres.append(head.op("Add", [steps, head.constant(0.5, np.float32)]))
    sx, sy = centres
    grid = head.op("Concat", [head.op("Shape", [sy]), head.op("Shape", [sx])], axis=0)
    grid_y = head.op("Expand", [head.op("Reshape", [sy, head.constant([-1, 1])]), grid])
    grid_x = head.op("Expand", [head.op("Reshape", [sx, head.constant([1, -1])]), grid])
    last = head.constant([-1])
    stacked = head.op("Concat", [head.op("Unsqueeze", [grid_x, last]), head.op("Unsqueeze", [grid_y, last])], axis=-1)
    points = head.op("Reshape", [stacked, head.constant([-1, 2])])
    positions = head.op("Mul", [height, width])  # a shape-[] scalar
    filled = head.op("ConstantOfShape", [head.op("Concat", [head.as_1d(positions), head.constant([1])], axis=0)],
                     value=numpy_helper.from_array(np.zeros(1, np.float32)))
    strides = head.op("Add", [filled, head.constant(float(stride), np.float32)])
    return points, strides


def _constant_anchors(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Anchor points [1, 2, A] (cell centres in grid units, x then y) and strides [1, A] of every scale."""
    points, strides = [], []
    for stride in _YOLOV8_STRIDES:
        cells = size // stride
        sy, sx = np.meshgrid(np.arange(cells) + 0.5, np.arange(cells) + 0.5, indexing="ij")
        points.append(np.stack((sx, sy), -1).reshape(-1, 2))
        strides.append(np.full(cells * cells, stride))
    return (np.concatenate(points).T[None].astype(np.float32), np.concatenate(strides)[None].astype(np.float32))


def build_yolov8_like(seed: int = 0, *, size: int = 320, classes: int = 80, dynamic: bool = False) -> onnx.ModelProto:
    """YOLOv8n with the ultralytics v8 ``Detect`` head as exported: ``images`` [1, 3, size, size] ->
    ``output0`` [1, 4 + classes, A] (A anchors over strides 8, 16, 32), boxes as centre x, y, w, h in pixels.

    The backbone and neck are ``build_yolo_like``'s. Per scale, a box branch (cv2: 64 = 4 sides x 16 bins)
    and a class branch (cv3), Concatenated and Reshaped to [1, 64 + classes, -1]; Concat over the scales;
    Split into box and class rows. DFL: Reshape [1, 4, 16, A] -> Transpose -> Softmax over the bins -> a
    fixed 1x1 Conv with weights 0…15 (the expected distance) -> Reshape [1, 4, A]. dist2bbox: Slice into
    left-top and right-bottom, anchors - lt and anchors + rb (Sub, Add), centre = sum / 2 and size =
    difference, Concat, Mul by the strides. Sigmoid on the classes; one Concat of boxes and scores.

    ``dynamic``: as ``yolo export dynamic=True`` writes it (the nudenet 3.4.2 wheel's 320n.onnx, torch 2.3):
    input [batch, 3, height, width], and the anchors, strides and Reshape shapes computed at run time from
    Shape -> Gather (h·w as shape-[] scalars, Range, Expand, ConstantOfShape) — ``size`` is then only the
    probe's. Otherwise they are constants, as an export with static shapes folds them.
    """
    g = _GraphBuilder(seed)
    x = g.input("images", ["batch", 3, "height", "width"] if dynamic else [1, 3, size, size])
    features = _yolov8n_features(g, x)
    head = _HeadBuilder(g)
    outputs = 4 * _DFL_BINS + classes
    box_hidden = max(16, g.channels[features[0]] // 4, 4 * _DFL_BINS)
    class_hidden = max(g.channels[features[0]], min(classes, 100))
    flattened, points, strides = [], [], []
    flat_shape = head.constant([1, outputs, -1])
    for scale, feature in enumerate(features):
        box = _detect_branch(g, feature, box_hidden, 4 * _DFL_BINS, f"model.22/cv2.{scale}")
        cls = _detect_branch(g, feature, class_hidden, classes, f"model.22/cv3.{scale}")
        per_scale = g.concat([box, cls], "model.22")
        if dynamic:
            if scale == 0:  # the batch of the first scale shapes every Reshape, as in the export
                batch, height, width = head.dims(per_scale, (0, 2, 3))
                flat_shape = head.op("Concat", [head.as_1d(batch), head.constant([outputs]), head.constant([-1])], axis=0)
            else:
                height, width = head.dims(per_scale, (2, 3))
            scale_points, scale_strides = _computed_anchors(head, height, width, _YOLOV8_STRIDES[scale])
            points.append(scale_points)
            strides.append(scale_strides)
        flattened.append(head.op("Reshape", [per_scale, flat_shape], channels=outputs))
    anchors = sum((size // stride) ** 2 for stride in _YOLOV8_STRIDES)
    predictions = head.op("Concat", flattened, channels=outputs, axis=2)
    box, cls = g.node("Split", [predictions, head.constant([4 * _DFL_BINS, classes])], "model.22", None,
                      num_outputs=2, axis=1)

    # DFL
    if dynamic:
        batch, positions = (head.as_1d(d, "model.22/dfl") for d in head.dims(box, (0, 2), "model.22/dfl"))
        bins_shape = head.op("Concat", [batch, head.constant([4]), head.constant([_DFL_BINS]), positions],
                             "model.22/dfl", axis=0)
        sides_shape = head.op("Concat", [batch, head.constant([4]), positions], "model.22/dfl", axis=0)
    else:
        bins_shape, sides_shape = head.constant([1, 4, _DFL_BINS, anchors]), head.constant([1, 4, anchors])
    bins = head.op("Reshape", [box, bins_shape], "model.22/dfl")
    bins = head.op("Transpose", [bins], "model.22/dfl", perm=[0, 2, 1, 3])
    weights = head.op("Softmax", [bins], "model.22/dfl", axis=1)
    expected = g.initializer("model.22.dfl.conv.weight", np.arange(_DFL_BINS, dtype=np.float32).reshape(1, -1, 1, 1))
    distance = head.op("Conv", [weights, expected], "model.22/dfl/conv", 1, dilations=[1, 1], group=1,
                       kernel_shape=[1, 1], pads=[0, 0, 0, 0], strides=[1, 1])
    distance = head.op("Reshape", [distance, sides_shape], "model.22/dfl")

    # dist2bbox, scaled by the strides
    if dynamic:
        anchor_points = head.op("Unsqueeze", [head.op("Transpose", [head.op("Concat", points, axis=0)], perm=[1, 0]),
                                              head.constant([0])])
        stride_row = head.op("Transpose", [head.op("Concat", strides, axis=0)], perm=[1, 0])
    else:
        constant_points, constant_strides = _constant_anchors(size)
        anchor_points, stride_row = head.constant(constant_points, np.float32), head.constant(constant_strides, np.float32)
    sides = head.constant([1])
    left_top = head.op("Slice", [distance, head.constant([0]), head.constant([2]), sides])
    right_bottom = head.op("Slice", [distance, head.constant([2]), head.constant([4]), sides])
    top_left = head.op("Sub", [anchor_points, left_top])
    bottom_right = head.op("Add", [anchor_points, right_bottom])
    centre = head.op("Div", [head.op("Add", [top_left, bottom_right]), head.constant(2.0, np.float32)])
    extent = head.op("Sub", [bottom_right, top_left])
    boxes = head.op("Mul", [head.op("Concat", [centre, extent], axis=1), stride_row])
    output = head.op("Concat", [boxes, head.op("Sigmoid", [cls])], axis=1)
    probe = g.rng.uniform(0.0, 1.0, (PROBE_BATCH, 3, size, size)).astype(np.float32)  # pixels / 255
    shape: list[int | str] = ["batch", 4 + classes, "anchors"] if dynamic else [1, 4 + classes, anchors]
    return g.build("yolov8_like" + ("_dynamic" if dynamic else ""), {"output0": (output, shape)}, probe=probe)


# ----------------------------------------------------------------------------------------- CLI

BUILDERS: dict[str, Callable[[int], onnx.ModelProto]] = {
    "resnet18_like": build_resnet18_like,
    "mobilenetv2_like": build_mobilenetv2_like,
    "yolo_like": build_yolo_like,
    "yolov8_like": build_yolov8_like,
}


def write_models(
    out_dir: Path = DEFAULT_OUT, names: Sequence[str] | None = None, seed: int = 0
) -> list[Path]:
    """Build the named benchmark models (all by default) and save them as ``out_dir/<name>.onnx``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names or BUILDERS:
        path = out_dir / f"{name}.onnx"
        onnx.save(BUILDERS[name](seed), str(path))
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: models/bench)")
    parser.add_argument(
        "--only", action="append", choices=sorted(BUILDERS), help="build only this model (repeatable)"
    )
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    args = parser.parse_args(argv)
    for name in args.only or BUILDERS:
        start = time.perf_counter()
        (path,) = write_models(args.out, [name], args.seed)
        print(f"{path}  {path.stat().st_size / 2**20:.1f} MiB  {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
