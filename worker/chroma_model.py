"""The Chroma transformer in the checkpoint's own layout (fused ``qkv`` and ``linear1``).

Parameter names are the original ones (``double_blocks.0.img_attn.qkv.weight``), so the single-file
Chroma1-Base checkpoint and ai-toolkit LoRAs (``diffusion_model.<same names>.lora_A.weight``) load
and merge without renaming, and each fused projection stays one matrix product. The arithmetic
follows ai-toolkit's Chroma module op for op (bf16 rounding of the timestep, float32 RoPE, the
modulation layout), so it is the same function in float32 and the same rounding in bf16.

Text padding: ai-toolkit lets every real text token, plus one padding token, attend; the other
padding tokens are masked out as both queries and keys, so they never touch the image. Dropping
them before the transformer computes the same output without any mask and is how the engine runs
on CUDA; ``text_mask`` keeps the masked full-length form (bit-identical to the reference).

Segments (batched classifier-free guidance): ``forward_batch`` runs one latent under several text
conditions in ONE pass. Every per-token operation (norms, modulation, every Linear, the gated
residuals) runs once over all segments' tokens packed together, so each weight is read (and, for
float8 weight-only, dequantized) once per step instead of once per branch; only attention is split,
each segment attending over its own ``[text, image]`` tokens. That is the same function as one pass
per branch: the cond and uncond texts differ in length, so batching them any other way would need
padding and a mask again. A segment's length is read from its RoPE tensor (``pe.shape[2]``).

``worker.blocks.Blocks`` says how the blocks run (eagerly, or compiled once for every variant).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.attention import (
    image_tokens,
    join_streams,
    joint_attention,
    packed_attention,
    packed_joint_attention,
)
from worker.blocks import EAGER, Blocks, KernelTables
from worker.rowwise import Float8RowwiseLinear, fuses_rows

APPROXIMATOR_IN = 64  # 16 timestep + 16 guidance + 32 modulation-index channels


@dataclass(frozen=True)
class ChromaConfig:
    in_channels: int = 64
    context_dim: int = 4096
    hidden_size: int = 3072
    num_heads: int = 24
    mlp_ratio: float = 4.0
    depth: int = 19
    depth_single: int = 38
    approximator_hidden: int = 5120
    approximator_depth: int = 5
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def num_modulations(self) -> int:
        return 3 * self.depth_single + 2 * 6 * self.depth + 2


def default_axes(head_dim: int) -> tuple[int, ...]:
    """RoPE split for a head size: Chroma's (16, 56, 56) at 128, scaled when that stays even."""
    if head_dim % 16 == 0 and (head_dim * 7 // 16) % 2 == 0:
        return (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16)
    quarter = head_dim // 4
    return (quarter, quarter, head_dim - 2 * quarter)


def infer_config(shapes: dict[str, tuple[int, ...]], axes_dim: tuple[int, ...] | None = None) -> ChromaConfig:
    """Architecture from tensor shapes (original key names), so tiny and full-size load alike."""

    def count(prefix: str) -> int:
        ids = {int(k.split(".")[1]) for k in shapes if k.startswith(prefix + ".")}
        return max(ids) + 1 if ids else 0

    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    approx_layers = {int(k.split(".")[2]) for k in shapes if k.startswith("distilled_guidance_layer.layers.")}
    axes = tuple(axes_dim) if axes_dim else default_axes(head_dim)
    if sum(axes) != head_dim or any(a % 2 for a in axes):
        raise ValueError(f"RoPE axes {axes} must be even and sum to the head size {head_dim}")
    return ChromaConfig(
        in_channels=in_channels,
        context_dim=shapes["txt_in.weight"][1],
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        mlp_ratio=shapes["double_blocks.0.img_mlp.0.weight"][0] / hidden,
        depth=count("double_blocks"),
        depth_single=count("single_blocks"),
        approximator_hidden=shapes["distilled_guidance_layer.in_proj.weight"][0],
        approximator_depth=max(approx_layers) + 1,
        axes_dim=axes,
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.scale.shape, weight=self.scale, eps=1e-6)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Holds the weights only; the double block runs the joint attention itself."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class MLPEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.in_layer = nn.Linear(dim, dim, bias=True)
        self.out_layer = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class Approximator(nn.Module):
    """Maps (timestep, guidance, modulation index) to every block's shift/scale/gate vector."""

    def __init__(self, out_dim: int, hidden: int, depth: int):
        super().__init__()
        self.in_proj = nn.Linear(APPROXIMATOR_IN, hidden, bias=True)
        self.layers = nn.ModuleList([MLPEmbedder(hidden) for _ in range(depth)])
        self.norms = nn.ModuleList([RMSNorm(hidden) for _ in range(depth)])
        self.out_proj = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.in_proj(x.to(self.in_proj.weight.dtype))
        for layer, norm in zip(self.layers, self.norms, strict=True):
            x = x + layer(norm(x))
        return self.out_proj(x)


@functools.cache
def _frequencies(half: int, max_period: float, device: torch.device) -> Tensor:
    """Computed on the CPU, as the reference does, and copied to ``device`` once, not every step."""
    with torch.inference_mode(False):
        return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(device)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000, time_factor: float = 1000.0) -> Tensor:
    t = time_factor * t  # in t's own dtype: a bf16 timestep rounds here, as in the reference
    args = t[:, None].float() * _frequencies(dim // 2, max_period, t.device)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return embedding.to(t) if torch.is_floating_point(t) else embedding


class CastInputLinear(nn.Linear):
    """A Linear that casts its input to its weights' dtype first: "float8-fast"'s image-stream
    layers. Their float8 matmul writes its output in the input's dtype, and under autocast the
    norms before them give float32; cast, the activations are quantized from bf16 and the matmul
    writes bf16 (half the bytes for every pass that reads them), as a bf16 model's would."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.to(self.weight.dtype))


def product(layer: nn.Linear, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """``layer(x)`` as (product, bias still to add), so a fused consumer adds the bias instead of a
    pass of its own. The bias is left to the caller where the layer adds it after its matmul:
    the working copy's ``DequantizedLinear`` (``bias_after_matmul``) and torchao's float8
    weight-only layers, whose arithmetic this keeps. A float8 row-wise layer ("float8-fast", lossy)
    would add it inside the float8 matmul before rounding; here it is added to the rounded
    product, a difference at bf16 rounding. An ``nn.Linear`` keeps its bias: (output, None)."""
    if isinstance(layer, Float8RowwiseLinear):
        return layer.product(x), layer.bias
    if layer.bias is None:
        return layer(x), None
    if getattr(layer, "bias_after_matmul", False):
        weight = layer.weight  # read once: a preview layer dequantizes it on every read
        return torch.matmul(x.to(weight.dtype), weight.t()), layer.bias
    if type(layer.weight).__name__ == "Float8Tensor":  # torchao's float8 weights
        if isinstance(layer, CastInputLinear):
            x = x.to(layer.weight.dtype)
        return F.linear(x, layer.weight), layer.bias
    return layer(x), None


def norm_product(
    layer: nn.Linear, x: Tensor, shift: Tensor, scale: Tensor, keep_bias: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``product(layer, modulated_norm(x, shift, scale))``, or with ``keep_bias`` the layer's whole
    output and no bias left. For float8-fast's row-wise layers with one modulation for every row,
    the norm, the modulation and the row-wise quantization are one kernel
    (``Float8RowwiseLinear.norm_forward``)."""
    if fuses_rows(layer, x) and shift.numel() == x.shape[-1]:
        if keep_bias:
            return layer.norm_forward(x, shift, scale, layer.bias), None
        return layer.norm_forward(x, shift, scale, None), layer.bias
    rows = modulated_norm(x, shift, scale)
    return (layer(rows), None) if keep_bias else product(layer, rows)


def fused_mlp(mlp: nn.Sequential, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``mlp(modulated_norm(x, shift, scale))`` (Linear, tanh GELU, Linear) for float8-fast's image
    MLP: the norm and the GELU each quantize their rows in one kernel; both biases stay inside
    their float8 matmuls, as torchao adds them."""
    h, _ = norm_product(mlp[0], x, shift, scale, keep_bias=True)
    out = mlp[2].gelu_forward(None, h.reshape(-1, h.shape[-1]), None)
    return out.reshape(*x.shape[:-1], -1)


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3*H*D) -> three (B, H, L, D)."""
    batch, length, _ = qkv.shape
    q, k, v = qkv.view(batch, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return (1 + scale) * x + shift


def modulated_norm(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """The blocks' pre-norm: layer norm without affine weights, then the modulation."""
    return modulate(F.layer_norm(x, (x.shape[-1],), eps=1e-6), shift, scale)


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: ChromaConfig):
        super().__init__()
        dim, mlp = cfg.hidden_size, cfg.mlp_hidden
        self.num_heads = cfg.num_heads
        self.img_attn = SelfAttention(dim, cfg.num_heads)
        self.txt_attn = SelfAttention(dim, cfg.num_heads)
        self.img_mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, dim))
        self.txt_mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, dim))

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        pes: tuple[Tensor, ...],
        img_mod: Tensor,
        txt_mod: Tensor,
        mask: Tensor | None,
        tables: KernelTables | None = None,
    ) -> tuple[Tensor, Tensor]:
        # *_mod: (B, 6, dim) = shift1, scale1, gate1, shift2, scale2, gate2
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = img_mod.split(1, dim=1)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = txt_mod.split(1, dim=1)
        txt_in = modulated_norm(txt, t_shift1, t_scale1)

        if tables is not None and txt.shape[0] == 1 and img.shape[0] == len(pes):
            # One kernel for both streams' bias, QK norm, RoPE and the joint layout (worker.kernels).
            from worker.kernels import as_heads, joint_qkv_heads  # imports Triton: only where it runs

            rope, img_rows, txt_rows = tables
            image_len = img.shape[1]
            lengths = [pe.shape[2] - image_len for pe in pes]
            img_raw, img_bias = norm_product(self.img_attn.qkv, img, i_shift1, i_scale1)
            txt_raw, txt_bias = product(self.txt_attn.qkv, txt_in)
            heads = joint_qkv_heads(
                img_raw.reshape(-1, img_raw.shape[-1]),
                img_bias,
                self.img_attn.norm.query_norm.scale,
                self.img_attn.norm.key_norm.scale,
                img_rows,
                txt_raw.reshape(-1, txt_raw.shape[-1]),
                txt_bias,
                self.txt_attn.norm.query_norm.scale,
                self.txt_attn.norm.key_norm.scale,
                txt_rows,
                rope,
                self.num_heads,
            )
            q, k, v = as_heads(heads).unsqueeze(1).unbind(0)
            txt_attn, img_attn = packed_joint_attention(q, k, v, lengths, image_len)
        else:
            img_in = modulated_norm(img, i_shift1, i_scale1)
            img_q, img_k, img_v = split_heads(self.img_attn.qkv(img_in), self.num_heads)
            img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)
            txt_q, txt_k, txt_v = split_heads(self.txt_attn.qkv(txt_in), self.num_heads)
            txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)
            txt_attn, img_attn = joint_attention((txt_q, txt_k, txt_v), (img_q, img_k, img_v), pes, mask)

        img = img + i_gate1 * self.img_attn.proj(img_attn)
        if tables is not None and fuses_rows(self.img_mlp[2], img):
            img = img + i_gate2 * fused_mlp(self.img_mlp, img, i_shift2, i_scale2)
        else:
            img_in = modulated_norm(img, i_shift2, i_scale2)
            img = img + i_gate2 * self.img_mlp(img_in)
        txt = txt + t_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + t_gate2 * self.txt_mlp(modulated_norm(txt, t_shift2, t_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, cfg: ChromaConfig):
        super().__init__()
        dim, mlp = cfg.hidden_size, cfg.mlp_hidden
        self.num_heads = cfg.num_heads
        self.linear1 = nn.Linear(dim, dim * 3 + mlp)
        self.linear2 = nn.Linear(dim + mlp, dim)
        self.norm = QKNorm(cfg.head_dim)

    def forward(
        self,
        x: Tensor,
        pes: tuple[Tensor, ...],
        mod: Tensor,
        mask: Tensor | None,
        tables: KernelTables | None = None,
    ) -> Tensor:
        shift, scale, gate = mod.split(1, dim=1)
        dim = x.shape[-1]
        if tables is not None and x.shape[0] == 1:
            # One kernel for bias, QK norm, RoPE and the head layout (worker.kernels).
            from worker.kernels import as_heads, qkv_heads  # imports Triton: only where the kernel runs

            raw, bias = norm_product(self.linear1, x, shift, scale)
            rows = raw.shape[1]
            heads = qkv_heads(
                raw.reshape(rows, -1),
                bias,
                self.norm.query_norm.scale,
                self.norm.key_norm.scale,
                tables[0],
                self.num_heads,
            )
            q, k, v = as_heads(heads).unsqueeze(1).unbind(0)
            attn = packed_attention(q, k, v, pes, None, rotated=True)
            if fuses_rows(self.linear2, x):  # float8-fast: the GELU and its quantization, one kernel
                out = self.linear2.gelu_forward(
                    attn.reshape(rows, -1).contiguous(),
                    raw.reshape(rows, -1)[:, 3 * dim :],
                    None if bias is None else bias[3 * dim :],
                )
                return x + gate * out.reshape(1, rows, -1)
            mlp = raw[..., 3 * dim :] if bias is None else raw[..., 3 * dim :] + bias[3 * dim :]
        else:
            x_mod = modulated_norm(x, shift, scale)
            qkv, mlp = torch.split(
                self.linear1(x_mod), [3 * dim, self.linear1.out_features - 3 * dim], dim=-1
            )
            q, k, v = split_heads(qkv, self.num_heads)
            q, k = self.norm(q, k, v)
            attn = packed_attention(q, k, v, pes, mask)
        return x + gate * self.linear2(torch.cat((attn, F.gelu(mlp, approximate="tanh")), 2))


class LastLayer(nn.Module):
    def __init__(self, cfg: ChromaConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.hidden_size, cfg.in_channels, bias=True)

    def forward(self, x: Tensor, mod: Tensor) -> Tensor:
        shift, scale = mod[:, 0:1], mod[:, 1:2]
        return self.linear(modulated_norm(x, shift, scale))


class ChromaTransformer(nn.Module):
    def __init__(self, cfg: ChromaConfig):
        super().__init__()
        self.cfg = cfg
        self.img_in = nn.Linear(cfg.in_channels, cfg.hidden_size, bias=True)
        self.txt_in = nn.Linear(cfg.context_dim, cfg.hidden_size)
        self.distilled_guidance_layer = Approximator(
            cfg.hidden_size, cfg.approximator_hidden, cfg.approximator_depth
        )
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(cfg) for _ in range(cfg.depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(cfg) for _ in range(cfg.depth_single)])
        self.final_layer = LastLayer(cfg)
        self.register_buffer("mod_index", torch.arange(cfg.num_modulations), persistent=False)

    def modulations(self, timestep: Tensor, guidance: Tensor) -> Tensor:
        """(B,) timestep/1000 and guidance -> (B, num_modulations, hidden)."""
        batch = timestep.shape[0]
        t_emb = timestep_embedding(timestep, 16)
        g_emb = timestep_embedding(guidance, 16)
        index = timestep_embedding(self.mod_index, 32).unsqueeze(0).repeat(batch, 1, 1)
        tg = torch.cat([t_emb, g_emb], dim=1).unsqueeze(1).repeat(1, self.cfg.num_modulations, 1)
        return self.distilled_guidance_layer(torch.cat([tg, index], dim=-1))

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        pe: Tensor,
        timestep: Tensor,
        guidance: Tensor,
        text_mask: Tensor | None = None,
        blocks: Blocks | None = None,
    ) -> Tensor:
        """img (B, N, C) packed latents; txt (B, T, context); pe from ``position_embedding``.

        ``text_mask`` (B, T) bool, already including the one extra padding token; None means every
        text token given attends (the caller dropped the rest).
        """
        mask = None
        if text_mask is not None:
            tokens = torch.cat([text_mask, text_mask.new_ones(img.shape[0], img.shape[1])], dim=1)
            mask = (tokens[:, :, None] & tokens[:, None, :]).unsqueeze(1)
        return self._run(self.img_in(img), txt, (pe,), timestep, guidance, mask, blocks or EAGER)

    def forward_batch(
        self,
        img: Tensor,
        txts: tuple[Tensor, ...],
        pes: tuple[Tensor, ...],
        timestep: Tensor,
        guidance: Tensor,
        blocks: Blocks | None = None,
    ) -> Tensor:
        """One latent (1, N, C) under each text (1, T_s, context), padding dropped -> (S, N, C).

        Output s equals ``forward(img, txts[s], pes[s], ...)``: the segments share every weight
        read but never attend to each other.
        """
        assert img.shape[0] == 1 and timestep.shape[0] == 1 and len(txts) == len(pes)
        img = self.img_in(img).repeat(len(txts), 1, 1)
        return self._run(img, torch.cat(txts, dim=1), tuple(pes), timestep, guidance, None, blocks or EAGER)

    def _run(
        self,
        img: Tensor,
        txt: Tensor,
        pes: tuple[Tensor, ...],
        timestep: Tensor,
        guidance: Tensor,
        mask: Tensor | None,
        blocks: Blocks,
    ) -> Tensor:
        cfg = self.cfg
        txt = self.txt_in(txt)
        mods = self.modulations(timestep, guidance)
        single_end = 3 * cfg.depth_single
        img_mods = mods[:, single_end : single_end + 6 * cfg.depth]
        txt_mods = mods[:, single_end + 6 * cfg.depth : single_end + 12 * cfg.depth]

        tables = blocks.tables(pes, img.shape[1], mask)
        with blocks.context():
            for i, block in enumerate(self.double_blocks):
                img_mod, txt_mod = img_mods[:, 6 * i : 6 * i + 6], txt_mods[:, 6 * i : 6 * i + 6]
                img, txt = blocks.double(block, img, txt, pes, img_mod, txt_mod, mask, tables)
            x = join_streams(txt, img, pes)
            for i, block in enumerate(self.single_blocks):
                x = blocks.single(block, x, pes, mods[:, 3 * i : 3 * i + 3], mask, tables)
        return self.final_layer(image_tokens(x, img.shape[1], pes), mods[:, -2:])
