"""Shared test fixtures: where the reference models live, and a cache of loaded light models."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import onnx
import pytest

from onnxslim.io import LoadedModel, load_model

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = PROJECT_ROOT / "models"
LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = sorted(LIGHT_DIR.glob("*.onnx"))


@cache
def load_light(name: str) -> LoadedModel:
    """Load (normalize) a light model once per test session: VGG19's weights alone take seconds to fold."""
    return load_model(LIGHT_DIR / name)


# The two biggest light models (VGG19's 548 MB of weights; ZFNet, AlexNet's twin) run only with `-m slow`
# (CI's second pass): AlexNet keeps the same patterns — LRN, two-group convs, Flatten → Gemm — in the default run.
SLOW_LIGHT = frozenset({"light_vgg19.onnx", "light_zfnet512.onnx"})


def light_param(name: str) -> object:
    """A pytest parameter for a light model, marked slow for the biggest ones."""
    return pytest.param(name, marks=pytest.mark.slow) if name in SLOW_LIGHT else name


@pytest.fixture(
    params=[light_param(p.name) for p in LIGHT_MODELS], ids=[p.stem.removeprefix("light_") for p in LIGHT_MODELS]
)
def light_model_name(request: pytest.FixtureRequest) -> str:
    return request.param
