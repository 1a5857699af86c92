"""The device: which one, which dtype, what it can do, and what its failures mean.

Device failures are translated here, once: out-of-memory frees memory and becomes ``OutOfMemory``
(the request fails, the worker goes on); a sticky CUDA error becomes ``DeviceLost`` (the process
exits so it can be replaced). Settings the device cannot serve raise ``SettingsError`` naming the
setting, so a worker refuses them at start instead of failing every task.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TypeVar

import torch

from tasks.errors import DeviceLost, OutOfMemory
from tasks.settings import DType, SettingsError

DTYPES = {DType.FLOAT32: torch.float32, DType.BFLOAT16: torch.bfloat16, DType.FLOAT16: torch.float16}

DEVICE_LOST_MARKERS = (
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "CUDA error: an illegal instruction",
    "misaligned address",
    "uncorrectable ECC",
    "CUDA-capable device(s) is/are busy or unavailable",
    "context is destroyed",
)

T = TypeVar("T")


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA where there is one), ``cpu``, ``cuda`` or ``cuda:N`` on a card that exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SettingsError(
                "device", f"{name!r} asks for CUDA and this machine has no CUDA device; use cpu"
            )
        if (device.index or 0) >= count:
            raise SettingsError(
                "device", f"{name!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
            )
    return device


def pick_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    if dtype is DType.AUTO:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def has_float8_matmul(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def triton_available() -> bool:
    from worker import kernels  # imports Triton: only when the kernels are asked for

    return kernels.available()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


HOST_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"


def guard(device: torch.device, fn: Callable[[], T], release: Callable[[], object] | None = None) -> T:
    """Run device work; map OOM (the device's, or the host's on the CPU) to ``OutOfMemory`` (after
    ``release``, which frees cached memory by default) and broken contexts to ``DeviceLost``."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        pass  # leave the except block first: its traceback holds the failed work's tensors
    except RuntimeError as exc:
        if device.type == "cuda" and is_device_lost(exc):
            raise DeviceLost(f"CUDA context is unusable: {exc}") from exc
        if HOST_OUT_OF_MEMORY not in str(exc):  # the CPU's allocator raises a plain RuntimeError
            raise
    release() if release is not None else release_memory(device)
    raise OutOfMemory("the request did not fit in device memory; use a smaller width/height or fewer LoRAs")


def is_device_lost(exc: BaseException) -> bool:
    """A sticky CUDA error (or a failing probe) means this process can do no more device work."""
    text = str(exc)
    if any(marker in text for marker in DEVICE_LOST_MARKERS):
        return True
    return "CUDA error" in text and not probe_device()


def probe_device() -> bool:
    """Synchronize and run one tiny operation; False when the context is poisoned."""
    try:
        torch.cuda.synchronize()
        value = (torch.ones(1, device="cuda") + 1).item()
        return value == 2.0
    except RuntimeError:
        return False


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """The most device memory held in tensors since ``reset_peak_memory``, or None off CUDA."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
