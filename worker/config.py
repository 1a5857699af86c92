"""The engine's settings (``EngineConfig``) and the speed recipe they give on a device (``Recipe``).

Speed recipe (``Recipe``, one flag per optimisation so the benchmark can switch each off):
``drop_padding`` (exact: the masked padding tokens are removed, attention runs unmasked),
``batch_cfg`` (both guidance branches in one pass, see ``ChromaTransformer.forward_batch``),
``compile`` (blocks compiled once per worker, shared by every variant, dynamic token counts),
``attention`` (the fused attention kernel), ``working_copy`` (the variant being rendered keeps
its float8 weight-only weights dequantized, see ``worker.variants.working_copy``), ``kernels``
(each block's q/k/v preparation as one Triton kernel, ``worker.kernels``). None of them
changes the quantization: "float8" stays the reference's weight-only numerics; "float8-fast"
(opt-in, lossy) adds float8 activations. In "float8-fast", ``working_copy`` and ``kernels``
together also let the float8 layers' inputs be quantized by the kernel that writes them
(``worker.rowwise``): the same arithmetic, where a rare value can round one e4m3 step apart, so
a render without the working copy (no room for it) can differ from one with it in those roundings.
Preview mode's qfloat8 base takes the same recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tasks.settings import (
    Attention,
    DType,
    NegativePrompt,
    Quantization,
    Settings,
    SettingsError,
    Switch,
    TextPadding,
    pick,
)
from worker import device as dev
from worker.blocks import Blocks
from worker.sources import Sources


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings; every field but ``sources`` is named like its ``Settings`` field."""

    sources: Sources
    quantization: Quantization = Quantization.FLOAT8
    dtype: DType = DType.AUTO
    device: str = "auto"
    compile: bool = True
    variant_cache_bytes: int = 0
    rope_axes: tuple[int, ...] | None = None
    text_padding: TextPadding = TextPadding.AUTO  # mask on the CPU, drop on CUDA
    batch_cfg: bool = True  # both guidance branches in one pass (needs the padding dropped)
    attention: Attention = Attention.CUDNN  # the SDPA kernel on CUDA
    working_copy: Switch = Switch.AUTO  # the active variant dequantized once (on with CUDA)
    kernels: Switch = Switch.AUTO  # Triton q/k/v kernels (worker.kernels), on with CUDA and Triton
    negative_prompt: NegativePrompt = NegativePrompt.HONOR
    preview: bool = False  # what a request without "preview" gets: ai-toolkit's training preview

    def __post_init__(self) -> None:
        # Plain strings (tests, the bench) become the settings' enums; a wrong one raises here.
        for name, kind in (
            ("quantization", Quantization),
            ("dtype", DType),
            ("text_padding", TextPadding),
            ("attention", Attention),
            ("working_copy", Switch),
            ("kernels", Switch),
            ("negative_prompt", NegativePrompt),
        ):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                choices = ", ".join(member.value for member in kind)
                raise SettingsError(name, f"{value!r}; choose one of {choices}") from None

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineConfig:
        return pick(cls, settings, sources=pick(Sources, settings))


@dataclass(frozen=True)
class Recipe:
    """How the denoising loop runs; every flag keeps the quantization's numerics (for
    "float8-fast", ``kernels`` adds the image layers' bias after the float8 matmul's rounding
    rather than inside it: a difference at bf16 rounding, see ``chroma_model.product``)."""

    drop_padding: bool
    batch_cfg: bool
    compile: bool
    attention: Attention
    working_copy: bool = False
    kernels: bool = False

    def blocks(self) -> Blocks:
        """A block runner for this recipe (compiled graphs are traced on its first use)."""
        return Blocks(self.compile, self.attention, self.kernels)


def make_recipe(config: EngineConfig, device: torch.device) -> Recipe:
    """The recipe the settings ask for on this device; refuses what the device cannot run."""
    cuda = device.type == "cuda"
    if config.kernels is Switch.ON and not (cuda and dev.triton_available()):
        raise SettingsError(
            "kernels",
            f"'on' needs a CUDA device and Triton (it comes with CUDA builds of torch) and the device is "
            f"{device}; use 'auto' (on where they run) or 'off'",
        )
    padding = config.text_padding
    return Recipe(
        # Dropping the masked padding tokens is exact arithmetic and lets attention run unmasked
        # (fast kernels); masking all 512 reproduces the reference's rounding bit for bit.
        drop_padding=padding is TextPadding.DROP or (padding is TextPadding.AUTO and cuda),
        batch_cfg=config.batch_cfg,
        compile=config.compile and cuda,
        attention=config.attention if cuda else Attention.AUTO,  # kernel names mean nothing on a CPU
        # An unquantized model has nothing to dequantize.
        working_copy=config.quantization.is_float8
        and (config.working_copy is Switch.ON or (config.working_copy is Switch.AUTO and cuda)),
        kernels=config.kernels is Switch.ON
        or (config.kernels is Switch.AUTO and cuda and dev.triton_available()),
    )
