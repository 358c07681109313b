"""One exception hierarchy for every user-facing failure.

Each class carries the process exit code the CLI uses for it (docs/ARCHITECTURE.md, "Exit codes and errors"):
1 the model or data given is unreadable, invalid or unsupported; 2 a usage error;
4 onnxslim produced something that failed its own validation (a bug in onnxslim).
"""

from __future__ import annotations

__all__ = [
    "OnnxSlimError",
    "ModelLoadError",
    "UnsupportedModelError",
    "DataError",
    "UsageError",
    "OutputError",
    "ValidationError",
    "StagedRunError",
    "first_line",
]

ISSUE_URL = "the onnxslim issue tracker"


class OnnxSlimError(Exception):
    """Base of every error onnxslim raises on purpose; its message is meant for the user."""

    exit_code: int = 1


class ModelLoadError(OnnxSlimError):
    """The model file cannot be read: missing, not ONNX, truncated, unsafe or missing external data."""


class UnsupportedModelError(OnnxSlimError):
    """The model is valid ONNX but uses something onnxslim cannot handle (too old an opset, ...)."""


class DataError(OnnxSlimError):
    """Calibration or evaluation data is unreadable or does not match the model's inputs."""


class UsageError(OnnxSlimError):
    """An option value that does not fit the model (unknown input name, wrong rank, ...)."""

    exit_code = 2


class OutputError(UsageError):
    """An output path that cannot be written (no such folder, read-only, not a folder ...): the user's to fix.

    Checked before any work starts; a write that still fails (a full disk) raises it too, never exit 4.
    """


class StagedRunError(UnsupportedModelError):
    """The staged runner (activations.StagedRunner) cannot run a range of the model on its own, though the
    whole model runs: a value it cannot hold between ranges, or an onnxruntime failure on the range alone.
    Recovery catches it and runs the whole model instead."""


class ValidationError(OnnxSlimError):
    """A model onnxslim produced failed its own validation. This is a bug in onnxslim; nothing is written."""

    exit_code = 4

    def __init__(self, message: str) -> None:
        super().__init__(
            f"{message}\nThis is a bug in onnxslim, not in your model: nothing was written. "
            f"Please report it on {ISSUE_URL} with the command line and, if you can, the model."
        )


def first_line(error: BaseException) -> str:
    """The first line of an error's message (library errors can be pages long), or its type when empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
