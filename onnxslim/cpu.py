"""What the CPU offers for int8, and the quantization defaults that follow from it.

Why it matters: on x86 without VNNI, onnxruntime's u8 x s8 kernels multiply with VPMADDUBSW, which adds
two u8*s8 products into a *saturating* int16: 2 * 255 * 127 = 64770 does not fit in 32767, so large
activations times large weights are clipped and accuracy drops (measured: the MNIST ResNet lost 0.7 pt on
an AVX2-only EPYC and kept its accuracy there with 7-bit weights). VNNI (VPDPBUSD, AVX512-VNNI or AVX-VNNI)
and AMX accumulate in int32 and do not saturate. With `reduce_range` (weights in [-64, 63]) the pair sum is
at most 2 * 255 * 64 = 32640 < 32767: nothing can saturate, so the integer results are exactly the same on
both kinds of CPU, and fidelity measured on a VNNI machine holds on one without it. onnxruntime's own
quantization documentation gives the same advice (reduce_range, or U8U8, on non-VNNI x86).

Detection reads `/proc/cpuinfo` flags (Linux). Elsewhere the CPU is reported unknown and the defaults stay
conservative (reduce_range), since an int8 model is often deployed on another machine than the one that
made it. The result is injected (`QuantizeOptions.cpu`), so tests can simulate any CPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["INT8_FLAGS", "CpuFeatures", "CpuChoice", "detect_cpu", "cpu_from_flags", "choose_for_cpu"]

logger = logging.getLogger(__name__)

# The flags that decide how int8 runs: what /proc/cpuinfo calls them.
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "asimd", "asimddp", "i8mm")
_NO_SATURATION = ("avx512_vnni", "avx_vnni", "amx_int8")  # int32 accumulation of u8 x s8 products
_ARM_DOT = ("asimddp", "i8mm")  # ARM int8 dot products: no int16 saturation either


@dataclass(frozen=True)
class CpuFeatures:
    """The int8-relevant flags seen, where they came from, and whether u8 x s8 products can saturate.

    `vnni` is True when the CPU accumulates int8 products in int32 (VNNI, AMX, ARM dot products), False on
    x86 without them, None when unknown."""

    flags: tuple[str, ...]
    source: str
    vnni: bool | None


@dataclass(frozen=True)
class CpuChoice:
    """The defaults chosen for this CPU and why (reported as `cpu` in `quantize --json`)."""

    cpu: CpuFeatures
    reduce_range: bool
    reason: str
    overridden: bool = False  # the user set --reduce-range/--no-reduce-range


def cpu_from_flags(flags: set[str] | frozenset[str], source: str) -> CpuFeatures:
    """CpuFeatures from a set of /proc/cpuinfo-style flags."""
    seen = tuple(flag for flag in INT8_FLAGS if flag in flags)
    if any(flag in flags for flag in (*_NO_SATURATION, *_ARM_DOT)):
        vnni: bool | None = True
    elif "avx2" in flags or "sse4_1" in flags or "ssse3" in flags:
        vnni = False
    else:
        vnni = None
    return CpuFeatures(seen, source, vnni)


def detect_cpu(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> CpuFeatures:
    """The CPU's int8 features from `cpuinfo` (Linux); unknown when it cannot be read."""
    path = Path(cpuinfo)
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        logger.info("cannot read %s (%s): CPU features unknown", path, e)
        return CpuFeatures((), "unknown (no /proc/cpuinfo)", None)
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
            break  # every core lists the same flags
    if not flags:
        return CpuFeatures((), f"unknown ({path} lists no flags)", None)
    return cpu_from_flags(flags, str(path))


def choose_for_cpu(cpu: CpuFeatures, reduce_range: bool | None = None) -> CpuChoice:
    """reduce_range on CPUs whose u8 x s8 products can saturate, and when unknown; the user's choice wins."""
    if reduce_range is not None:
        return CpuChoice(cpu, reduce_range, f"{'--reduce-range' if reduce_range else '--no-reduce-range'} given", True)
    if cpu.vnni:
        found = ", ".join(f for f in cpu.flags if f in (*_NO_SATURATION, *_ARM_DOT))
        return CpuChoice(cpu, False, f"the CPU accumulates int8 products in int32 ({found}): full 8-bit weights")
    if cpu.vnni is False:
        return CpuChoice(
            cpu, True,
            "no VNNI/AMX: u8 x s8 products would saturate in int16 (VPMADDUBSW), so weights are 7-bit "
            "(reduce_range), which cannot saturate and gives the same results on every x86 CPU",
        )
    return CpuChoice(
        cpu, True,
        "CPU features unknown: 7-bit weights (reduce_range), which cannot saturate on any x86 CPU",
    )
