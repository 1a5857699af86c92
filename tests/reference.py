"""An independent implementation of ai-toolkit's Chroma sampling, for fidelity tests.

Built from other parts than the engine: diffusers' own ``ChromaTransformer2DModel`` (fed a
BOOLEAN mask over all 512 text tokens, as ai-toolkit's module masks them), diffusers' scheduler
driven through ``retrieve_timesteps`` as ai-toolkit's pipeline does, diffusers' randn_tensor and
image post-processor. Each fact of docs/sampling.md is written out here a second time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import AutoTokenizer, T5EncoderModel

from worker.checkpoint import load_transformer, original_to_diffusers
from worker.sources import Sources


class ReferenceChroma:
    def __init__(self, sources: Sources, dtype: torch.dtype = torch.float32):
        cfg, state = load_transformer(Path(sources.transformer))
        self.dtype = dtype
        self.transformer = ChromaTransformer2DModel(
            in_channels=cfg.in_channels,
            num_layers=cfg.depth,
            num_single_layers=cfg.depth_single,
            attention_head_dim=cfg.head_dim,
            num_attention_heads=cfg.num_heads,
            joint_attention_dim=cfg.context_dim,
            axes_dims_rope=cfg.axes_dim,
            approximator_hidden_dim=cfg.approximator_hidden,
            approximator_layers=cfg.approximator_depth,
        )
        self.transformer.load_state_dict(original_to_diffusers(state, cfg), strict=True)
        for norm in self.transformer.distilled_guidance_layer.norms:
            norm.eps = 1e-6  # ai-toolkit's RMSNorm epsilon
        self.transformer.to(dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(sources.tokenizer)
        self.text_encoder = T5EncoderModel.from_pretrained(sources.text_encoder, torch_dtype=dtype).eval()
        self.vae = AutoencoderKL.from_pretrained(sources.vae, torch_dtype=dtype).eval()
        self.scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_image_seq_len=256,
            max_image_seq_len=4096,
            base_shift=0.5,
            max_shift=1.15,
        )

    def embed(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(
            [prompt], padding="max_length", max_length=512, truncation=True, return_tensors="pt"
        )
        # ai-toolkit calls T5 with input ids only: no attention mask.
        embeds = self.text_encoder(tokens.input_ids, output_hidden_states=False)[0]
        return embeds.to(self.dtype), tokens.attention_mask

    @staticmethod
    def transformer_mask(text_mask: torch.Tensor, image_tokens: int) -> torch.Tensor:
        mask = text_mask.clone()
        length = int(mask.sum())
        if length < mask.shape[1]:
            mask[0, length] = 1  # one extra padding token attends
        return torch.cat([mask, torch.ones(1, image_tokens, dtype=mask.dtype)], dim=1).bool()

    @torch.inference_mode()
    def __call__(
        self, prompt: str, width: int, height: int, steps: int, guidance: float, seed: int, neg: str = ""
    ) -> Image.Image:
        """ai-toolkit's sample: ``neg`` is the unconditional branch's text (its ``encode_prompt``)."""
        cond, cond_mask = self.embed(prompt)
        uncond, uncond_mask = self.embed(neg)
        lh, lw = 2 * (height // 16), 2 * (width // 16)
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = randn_tensor(
            (1, 16, lh, lw), generator=generator, device=torch.device("cpu"), dtype=self.dtype
        )
        latents = FluxPipeline._pack_latents(noise, 1, 16, lh, lw)
        img_ids = FluxPipeline._prepare_latent_image_ids(1, lh // 2, lw // 2, "cpu", self.dtype)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(latents.shape[1], 256, 4096, 0.5, 1.15)
        timesteps, _ = retrieve_timesteps(self.scheduler, steps, "cpu", None, sigmas, mu=mu)
        c_mask = self.transformer_mask(cond_mask, latents.shape[1])
        u_mask = self.transformer_mask(uncond_mask, latents.shape[1])
        txt_ids = torch.zeros(512, 3, dtype=self.dtype)
        for t in timesteps:
            timestep = t.expand(1).to(latents.dtype) / 1000
            args = {"hidden_states": latents, "timestep": timestep, "img_ids": img_ids, "txt_ids": txt_ids}
            noise_pred = self.transformer(encoder_hidden_states=cond, attention_mask=c_mask, **args)[0]
            if guidance > 1.00001:
                noise_uncond = self.transformer(encoder_hidden_states=uncond, attention_mask=u_mask, **args)[
                    0
                ]
                noise_pred = noise_uncond + guidance * (noise_pred - noise_uncond)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        latents = FluxPipeline._unpack_latents(latents, height, width, 8)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return VaeImageProcessor(vae_scale_factor=16).postprocess(image, output_type="pil")[0]


def psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    assert x.shape == y.shape, (x.shape, y.shape)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
