"""Where and how computations run: device choice, mixed-precision dtype, the CPU allocator setting.

One place for what training, evaluation and the pictures all ask: which device ``--device`` means on this
machine (with a clear error when it is not there), which autocast dtype ``--precision`` means on it, and the
opt-in glibc setting that keeps freed memory for reuse on CPU (called by the ``train`` command, never as a
side effect of building something).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from typing import Literal

import torch

from cribo import distributed

__all__ = ["Precision", "autocast", "autocast_dtype", "keep_freed_memory", "resolve_device"]

Precision = Literal["auto", "fp32", "fp16", "bf16"]


def resolve_device(name: str) -> torch.device:
    """The torch device for ``--device NAME``.

    ``auto`` picks this process's accelerator (CUDA at the local rank under torchrun, or another torch
    accelerator) when one is present, else the CPU. An explicit name must be a device this machine has.

    Raises:
        ValueError: ``name`` is not a device name, or names a device type or index this machine lacks.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", distributed.launch_info().local_rank)
        accelerator = getattr(torch, "accelerator", None)
        if accelerator is not None and accelerator.is_available():
            current = accelerator.current_accelerator()
            if current is not None:
                return torch.device(current)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device name (valid: auto, cpu, cuda, cuda:N, mps)") from err
    _check_available(device)
    return device


def _check_available(device: torch.device) -> None:
    """Raise a ValueError naming ``--device`` when ``device`` is not usable on this machine."""
    if device.type == "cpu":
        return
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: this machine has no CUDA device; use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        return
    backend = getattr(torch.backends, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if callable(is_available) and not is_available():
        raise ValueError(f"--device {device}: not available on this machine; use --device cpu (or auto)")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--precision`` on ``device`` (None = full fp32).

    ``auto`` is fp32 on CPU and bf16 (fp16 where bf16 is unsupported) on CUDA; ``fp16`` on CPU runs bf16, the
    half type CPU autocast supports.
    """
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision context for ``dtype`` on ``device`` (a no-op for fp32, i.e. ``dtype`` None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# mallopt parameter numbers (glibc malloc.h)
GLIBC_M_TRIM_THRESHOLD = -1
GLIBC_M_MMAP_THRESHOLD = -3
KEEP_FREED_BYTES = 2**31 - 1  # the largest threshold mallopt takes: in effect, never give freed memory back


def keep_freed_memory() -> bool:
    """Ask glibc malloc to keep freed memory in the heap for reuse, for the whole process.

    By default glibc serves each allocation above 32 MiB with a fresh ``mmap`` and returns it to the system on
    free (and trims the heap), so the same large tensors are page-faulted and zeroed again at every step; on a
    2-core CPU that costs 5-10 % of a step. Raising ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` keeps that
    memory: the resident set stays at its peak (the step's peak is unchanged, about +40 MiB in the benchmarks).
    ``cribo train`` calls it on CPU unless ``--keep_freed_memory false``. Returns whether it applied (Linux with
    glibc only).
    """
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(name)
        limit = ctypes.c_int(KEEP_FREED_BYTES)
        return bool(libc.mallopt(GLIBC_M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(GLIBC_M_TRIM_THRESHOLD, limit))
    except (OSError, AttributeError):
        return False
