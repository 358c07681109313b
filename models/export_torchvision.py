"""Export torchvision architectures to ONNX as PyTorch users do, to check onnxslim on real exporter output.

    pip install torch==2.13.0 torchvision==0.28.0      # in a venv of its own; not onnxslim's dependencies
    python models/export_torchvision.py [--out models/torchvision] [--only NAME ...]
    python -m benchmarks.real_exports models/torchvision

No weights are downloaded: every model is built with `weights=None` and given seeded random weights that
keep activations alive through the depth (He-scaled convs and linears, BatchNorm statistics drawn around
identity, ConvNeXt's layer scale at 1). With torchvision's own initialisation several of these models
output values around 1e-9, and a check of a pruned model against its oracle means little at that scale.
BatchNorm is folded into the convs by the exporter (PyTorch eval exports); one export keeps it.

Exports (opset 17, TorchScript exporter, symbolic batch, input [batch, 3, 224, 224]) unless listed:
classifiers, a segmentation model (LRASPP), opsets 11 and 13 for three models, one with BatchNormalization
kept, and two with the dynamo exporter at opset 18 (fixed batch 1). The files (1.2 GB, half of it VGG-11)
are not committed; exporting all takes about a minute.

torchvision 0.28.0 on the package registry is a CUDA build, whose compiled ops do not load next to the CPU
build of torch; the models themselves are pure Python, so `_import_torchvision` makes the registration of
the compiled ops' shape functions a no-op while torchvision is imported. Nothing here runs those ops.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# (name, opset, how): how is "ts" (TorchScript exporter), "bn" (BatchNormalization kept) or "dynamo"
EXPORTS: list[tuple[str, int, str]] = [
    *(
        (name, 17, "ts")
        for name in (
            "resnet18", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
            "regnet_y_400mf", "shufflenet_v2_x0_5", "squeezenet1_1", "densenet121", "googlenet", "mnasnet0_5",
            "convnext_tiny", "vgg11", "lraspp_mobilenet_v3_large",
        )
    ),
    *((name, opset, "ts") for name in ("resnet18", "mobilenet_v3_small", "efficientnet_b0") for opset in (11, 13)),
    ("mobilenet_v3_small", 17, "bn"),
    ("resnet18", 18, "dynamo"),
    ("mobilenet_v3_small", 18, "dynamo"),
]


def _import_torchvision() -> Any:
    import torch.library

    register_fake = torch.library.register_fake

    def skip_torchvision_ops(op: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(op, str) and op.startswith("torchvision::"):
            return (lambda function: function) if not args else None
        return register_fake(op, *args, **kwargs)

    torch.library.register_fake = skip_torchvision_ops
    try:
        import torchvision
    finally:
        torch.library.register_fake = register_fake
    return torchvision


def build(name: str) -> Any:
    """The torchvision model `name` with live random weights, in eval mode."""
    import torch
    from torch import nn

    torchvision = _import_torchvision()
    if name == "googlenet":
        model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    elif name == "lraspp_mobilenet_v3_large":
        model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)
    else:
        model = getattr(torchvision.models, name)(weights=None)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                module.weight.normal_(0.0, math.sqrt(2.0 / module.weight[0].numel()))
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.1)
            elif isinstance(module, nn.BatchNorm2d | nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.normal_(0.0, 0.2)
                    module.running_var.uniform_(0.5, 1.5)
            if hasattr(module, "layer_scale"):
                module.layer_scale.fill_(1.0)
    return model.eval()


def export(name: str, opset: int, how: str, out: Path) -> Path:
    import torch

    torch.manual_seed(0)
    model = build(name)
    x = torch.randn(1, 3, 224, 224)
    path = out / f"{name}_op{opset}{'' if how == 'ts' else '_' + how}.onnx"
    names: dict[str, Any] = {"input_names": ["input"], "output_names": ["output"]}
    if how == "dynamo":
        torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=opset, external_data=False, **names)
        return path
    options: dict[str, Any] = {"do_constant_folding": False, "training": torch.onnx.TrainingMode.PRESERVE} if how == "bn" else {}
    torch.onnx.export(
        model, x, str(path), dynamo=False, opset_version=opset,
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, **names, **options,
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "torchvision")
    parser.add_argument("--only", nargs="*", default=None, help="model names to export (default: all)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, opset, how in EXPORTS:
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        path = export(name, opset, how, args.out)
        print(f"{path.name}  {path.stat().st_size / 2**20:.1f} MiB  {time.perf_counter() - start:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
