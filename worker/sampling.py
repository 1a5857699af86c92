"""Text encoding, the denoising loop and decoding, as ai-toolkit samples Chroma.

Every choice here changes pixels when violated (docs/sampling.md gives each with its evidence):
T5 runs on 512 padded tokens WITHOUT its attention mask; the transformer sees the real tokens plus
one padding token; the unconditional branch is the negative prompt encoded the same way (the
engine decides which text, ``Engine.unconditional``); distilled guidance is 0; the
timestep is ``t`` cast to the latent dtype, then divided by 1000; FlowMatch Euler with ai-toolkit's
scheduler config and ``sigmas = linspace(1, 1/steps, steps)``; noise from a CPU generator in the
latent dtype, shape (1, 16, H/8, W/8), packed 2x2; decode ``latents / scaling + shift``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from tasks.errors import NonFiniteOutput
from tasks.schemas import uses_guidance
from worker.attention import position_embedding

__all__ = ["uses_guidance"]  # re-exported: the one guidance rule, from the contract

MAX_TEXT_TOKENS = 512
LATENT_CHANNELS = 16
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}

# (img, txt, pe, timestep, guidance, text_mask) -> velocity
ModelFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, "Tensor | None"], Tensor]
# (img, texts, pes, timestep, guidance) -> one velocity per text, stacked (S, N, C); no mask
BatchFn = Callable[[Tensor, tuple[Tensor, ...], tuple[Tensor, ...], Tensor, Tensor], Tensor]
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class TextEmbedding:
    embeds: Tensor  # (1, 512, context) from T5 without its mask
    attended: int  # the leading tokens that attend: real tokens + one padding token (capped at 512)
    extra: int | None = None  # a padding token further on that attends instead (see ``attended_tokens``)

    def for_transformer(self, drop_padding: bool) -> tuple[Tensor, Tensor | None]:
        """The text stream and its mask: the attended tokens alone, or all 512 with a boolean mask."""
        if drop_padding:
            kept = self.embeds[:, : self.attended]
            if self.extra is not None:
                kept = torch.cat([kept, self.embeds[:, self.extra : self.extra + 1]], dim=1)
            return kept, None
        mask = torch.zeros(1, self.embeds.shape[1], dtype=torch.bool, device=self.embeds.device)
        mask[:, : self.attended] = True
        if self.extra is not None:
            mask[:, self.extra] = True
        return self.embeds, mask


def attended_tokens(token_mask: Tensor, mask_dtype: torch.dtype | None = None) -> tuple[int, int | None]:
    """(leading tokens that attend, a later padding token that attends or None).

    ai-toolkit reads the length as ``int(mask.sum())`` and unmasks the one token at that index. The
    reference service sums the tokenizer's int64 mask: the real tokens plus the next one. ai-toolkit's
    training sampler casts the mask to the model dtype first (``mask_dtype``); a bf16 sum is exact up
    to 256 and rounds to even above, so a longer prompt attends either no padding token (rounded
    down: the unmasked index is a real token) or one a token further on (rounded up).
    """
    real = int(token_mask.sum())
    length = int(token_mask.to(mask_dtype).sum(dim=-1)[0]) if mask_dtype is not None else real
    if length >= MAX_TEXT_TOKENS or length < real:
        return real, None
    if length == real:
        return real + 1, None
    return real, length


@torch.inference_mode()
def encode_text(tokenizer, text_encoder, prompt: str, mask_dtype: torch.dtype | None = None) -> TextEmbedding:
    """T5 on the 512 padded tokens without its mask; which tokens the transformer sees is
    ``attended_tokens`` (``mask_dtype``: the preview's mask in the model dtype)."""
    tokens = tokenizer(
        [prompt],
        padding="max_length",
        max_length=MAX_TEXT_TOKENS,
        truncation=True,
        return_length=False,
        return_overflowing_tokens=False,
        return_tensors="pt",
    )
    device = text_encoder.device
    embeds = text_encoder(tokens.input_ids.to(device), output_hidden_states=False)[0]
    attended, extra = attended_tokens(tokens.attention_mask, mask_dtype)
    return TextEmbedding(embeds.to(text_encoder.dtype), attended, extra)


def latent_size(height: int, width: int) -> tuple[int, int]:
    return 2 * (height // 16), 2 * (width // 16)


def initial_noise(seed: int, height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Unpacked noise drawn on the CPU in ``dtype`` (as diffusers' randn_tensor does), then moved."""
    lh, lw = latent_size(height, width)
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, LATENT_CHANNELS, lh, lw), generator=generator, dtype=dtype).to(device)


def pack(latents: Tensor) -> Tensor:
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(latents: Tensor, height: int, width: int) -> Tensor:
    b, _, channels = latents.shape
    lh, lw = latent_size(height, width)
    latents = latents.view(b, lh // 2, lw // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, lh, lw)


def image_ids(height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    lh, lw = latent_size(height, width)
    ids = torch.zeros(lh // 2, lw // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(lh // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(lw // 2)[None, :]
    return ids.reshape(1, -1, 3).to(device=device, dtype=dtype)


def rope_for(text_len: int, img_ids: Tensor, axes_dim: tuple[int, ...], theta: int = 10_000) -> Tensor:
    txt_ids = torch.zeros(1, text_len, 3, device=img_ids.device, dtype=img_ids.dtype)
    return position_embedding(torch.cat([txt_ids, img_ids], dim=1), axes_dim, theta)


def make_scheduler(steps: int, image_seq_len: int, device: torch.device):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    cfg = scheduler.config
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    mu = image_seq_len * slope + (cfg.base_shift - slope * cfg.base_image_seq_len)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    return scheduler


def autocast_for(device: torch.device, dtype: torch.dtype):
    """The reference samples under CUDA autocast in its dtype; float32 and CPU run plain."""
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


@torch.inference_mode()
def denoise(
    model: ModelFn,
    latents: Tensor,
    cond: TextEmbedding,
    uncond: TextEmbedding | None,
    guidance_scale: float,
    scheduler,
    axes_dim: tuple[int, ...],
    img_ids: Tensor,
    *,
    drop_padding: bool = True,
    batch: BatchFn | None = None,
    on_step: StepCallback | None = None,
) -> Tensor:
    """The Euler loop; classifier-free guidance runs only where ``uses_guidance`` says so, with
    ``uncond`` as the unconditional branch.

    With ``batch`` (and padding dropped) both guidance branches run in one transformer pass per
    step (``ChromaTransformer.forward_batch``): the same function, each weight read once.
    """
    use_cfg = uses_guidance(guidance_scale)
    txt, txt_mask = cond.for_transformer(drop_padding)
    pe = rope_for(txt.shape[1], img_ids, axes_dim)
    if use_cfg:
        assert uncond is not None
        u_txt, u_mask = uncond.for_transformer(drop_padding)
        u_pe = rope_for(u_txt.shape[1], img_ids, axes_dim)
    guidance = torch.zeros(latents.shape[0], device=latents.device, dtype=torch.float32)
    timesteps = scheduler.timesteps
    batched = use_cfg and drop_padding and batch is not None and latents.shape[0] == 1
    for i, t in enumerate(timesteps):
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
        if batched:
            noise, noise_uncond = batch(latents, (txt, u_txt), (pe, u_pe), timestep, guidance).split(1)
            noise = noise_uncond + guidance_scale * (noise - noise_uncond)
        else:
            noise = model(latents, txt, pe, timestep, guidance, txt_mask)
            if use_cfg:
                noise_uncond = model(latents, u_txt, u_pe, timestep, guidance, u_mask)
                noise = noise_uncond + guidance_scale * (noise - noise_uncond)
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return latents


# The denoised latents live at the VAE's normalized scale (about unit variance); ten thousand is a
# model gone wrong (a LoRA alpha of 1e20 left them at 7.5e17, finite).
MAX_LATENT = 1e4


def check_finite(values: Tensor, what: str, index: int, limit: float | None = None) -> None:
    """A render with NaN or infinity, or with values past ``limit``, is never an image: fail the
    request, naming the prompt."""
    if limit is None:  # a mask of the values, no copy of them
        peak = 0.0 if bool(torch.isfinite(values).all()) else math.inf
    else:
        peak = float(values.detach().abs().amax().float())  # NaN and infinity carry through
    if not math.isfinite(peak):
        raise NonFiniteOutput(
            f"the {what} hold NaN or infinite values: the model left the range of its number format. "
            "Lower the LoRAs' network_multiplier or check the LoRA files (weights far outside the usual "
            "scale do this)",
            field=f"prompts.{index}",
        )
    if limit is not None and peak > limit:
        raise NonFiniteOutput(
            f"the {what} reached {peak:.3g}, past {limit:g} (they sit near 1): the model diverged and "
            "would render one flat image whatever the prompt. Lower the LoRAs' network_multiplier or "
            "check the LoRA files (weights far outside the usual scale do this)",
            field=f"prompts.{index}",
        )


@torch.inference_mode()
def decode(vae, latents: Tensor, height: int, width: int, index: int = 0) -> Image.Image:
    latents = unpack(latents, height, width)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    check_finite(image, "decoded pixels", index)
    image = (image * 0.5 + 0.5).clamp(0, 1)
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()[0]
    return Image.fromarray((array * 255).round().astype("uint8"))
