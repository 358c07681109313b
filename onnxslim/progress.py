"""How long work says where it is: a callback `(stage, done, total)` that the library calls and only the
command line draws (click progress bars on stderr). One alias for every step that reports progress."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Progress"]

Progress = Callable[[str, int, int], None]  # (stage, done, total)
