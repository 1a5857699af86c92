"""ai-toolkit's training sample of a quantized Chroma, built from other parts than the engine.

``tests.reference`` (diffusers' ``ChromaTransformer2DModel`` with a boolean mask, diffusers' T5,
scheduler and post-processor, driven as ai-toolkit's pipeline) with what ``quantize: true``
changes, each written out a second time:

- optimum-quanto 0.2.4 itself quantizes every Linear of the transformer and of T5:
  ``quantize(model, weights=qfloat8)`` then ``freeze(model)``, as ai-toolkit's Chroma loader does,
  after ``.to(dtype)`` (which also casts T5's ``wo``, kept in float32 by ``from_pretrained``);
- LoRAs stay unmerged: ``ToolkitLora`` wraps a quanto ``QLinear`` and computes ai-toolkit's LoRA
  forward with float32 ``lora_down`` / ``lora_up`` Linears. Under diffusers' module names a fused
  LoRA (``qkv``, ``linear1``) becomes one LoRA per projection, each holding its row block of the
  up matrix (the mapping is ``worker.checkpoint.linear_map``);
- the transformer's text mask is cast to the model dtype before its length is summed.

``merge=True`` merges the LoRAs into the weights before quantizing instead: what the preview must
not do (the fused default's order).
"""

from __future__ import annotations

import torch
from optimum.quanto import freeze, qfloat8, quantize
from torch import Tensor, nn

from tests.loras import Pair, diffusers_blocks
from tests.reference import ReferenceChroma
from worker.sources import Sources
from worker.tiny import TINY

# A LoRA stack: per LoRA, its pairs under original module names, multiplier and alpha / rank.
Stack = list[tuple[dict[str, Pair], float, float]]


class ToolkitLora(nn.Module):
    """ai-toolkit's ``LoRAModule`` while sampling: ``org(x) + (up(down(x32)) * scale * m).to(dtype)``."""

    def __init__(self, org: nn.Module, down: Tensor, up: Tensor, multiplier: float, scale: float = 1.0):
        super().__init__()
        self.org = org
        self.lora_down = nn.Linear(down.shape[1], down.shape[0], bias=False, dtype=torch.float32)
        self.lora_up = nn.Linear(up.shape[1], up.shape[0], bias=False, dtype=torch.float32)
        with torch.no_grad():
            self.lora_down.weight.copy_(down)
            self.lora_up.weight.copy_(up)
        self.scale = torch.tensor(scale, dtype=torch.float32)
        self.multiplier = torch.tensor([multiplier], dtype=torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        org = self.org(x)
        lx = self.lora_up(self.lora_down(x.to(torch.float32)))
        lx = lx * self.scale
        lx = lx * self.multiplier.view(-1, *([1] * (lx.ndim - 1)))
        return org + lx.to(org.dtype)


class ReferencePreview(ReferenceChroma):
    def __init__(self, sources: Sources, dtype: torch.dtype, stack: Stack = (), merge: bool = False):
        super().__init__(sources, dtype)
        self.text_encoder.to(dtype)
        projections = [
            (name, pair.down, pair.up[start:stop], multiplier, scale)
            for pairs, multiplier, scale in stack
            for module, pair in pairs.items()
            for name, start, stop in diffusers_blocks(TINY, module)
        ]
        if merge:
            with torch.no_grad():
                for name, down, up, multiplier, scale in projections:
                    weight = self.transformer.get_parameter(f"{name}.weight")
                    weight.copy_(
                        weight + (up.to(weight.dtype) @ down.to(weight.dtype)) * (scale * multiplier)
                    )
        for model in (self.transformer, self.text_encoder):
            quantize(model, weights=qfloat8)
            freeze(model)
        if not merge:
            for name, down, up, multiplier, scale in projections:
                if multiplier != 0:
                    parent, _, attr = name.rpartition(".")
                    holder = self.transformer.get_submodule(parent)
                    setattr(holder, attr, ToolkitLora(getattr(holder, attr), down, up, multiplier, scale))

    def transformer_mask(self, text_mask: Tensor, image_tokens: int) -> Tensor:
        """ai-toolkit: the prompt embeds' ``.to(dtype)`` casts the mask too; then
        ``length = int(mask.sum())`` and ``mask[length:length + 1] = 1``."""
        mask = text_mask.to(self.dtype).clone()
        length = int(mask.sum(dim=-1)[0].item())
        if length < mask.shape[1]:
            mask[0, length : length + 1] = 1
        return torch.cat([mask, torch.ones(1, image_tokens, dtype=mask.dtype)], dim=1).bool()
