"""Device memory budget: how many bytes a variant, the working copy and the reserve take.

Plain functions of the base weights and the card's figures, so the rules can be read and tested
without a card. The variant cache gets what is free after loading, less the working copy and a
reserve for activations and the VAE (the larger of 8 GiB and 10% of the card).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tasks.settings import Quantization
from worker.components import quantizes_activations

GIB = 2**30
CPU_VARIANT_BUDGET = 8 * GIB


def reserve_bytes(total: int) -> int:
    """Kept free for activations and the VAE: the larger of 8 GiB and 10% of the card."""
    return max(8 * GIB, total // 10)


def variant_bytes(state: Mapping[str, torch.Tensor], quantization: Quantization, dtype: torch.dtype) -> int:
    """Device bytes of one fused variant: a byte per weight in float8, else the compute dtype's."""
    per_weight = 1 if quantization.is_float8 else dtype.itemsize
    return sum(t.numel() for t in state.values()) * per_weight


def working_copy_bytes(
    state: Mapping[str, torch.Tensor], quantization: Quantization, dtype: torch.dtype
) -> int:
    """Device bytes of a working copy: each float8 weight-only Linear weight in the compute dtype
    ("float8-fast" keeps its float8-activation layers quantized)."""
    if not quantization.is_float8:
        return 0
    fast = quantization is Quantization.FLOAT8_FAST
    count = sum(
        t.numel()
        for name, t in state.items()
        if name.endswith(".weight") and not (fast and quantizes_activations(name.removesuffix(".weight")))
    )
    return count * dtype.itemsize


def working_copy_fits(free: int, total: int, working: int, variant: int) -> bool:
    """Whether the card holds a working copy next to one variant and the reserve."""
    return free >= working + variant + reserve_bytes(total)


def variant_budget(free: int, total: int, working: int, variant: int) -> int:
    """Bytes for cached variants on a card: free memory less the working copy and the reserve,
    and never less than one variant."""
    return max(free - working - reserve_bytes(total), variant)
