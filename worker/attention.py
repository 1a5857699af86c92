"""Positions and attention for the Chroma transformer: RoPE tables, joint attention over
``[text, image]``, and the packed layout of several guidance segments in one stream.

A segment (batched classifier-free guidance, ``ChromaTransformer.forward_batch``) is one text
condition with its own copy of the image tokens; its length is read from its RoPE tensor
(``pe.shape[2]``). Segments share every per-token operation but never attend to each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    out = pos.to(torch.float64)[..., None] * omega
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).float()


def position_embedding(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> Tensor:
    """(B, L, 3) position ids -> (B, 1, L, head_dim/2, 2, 2) rotation matrices."""
    emb = torch.cat([rope(ids[..., i], axes_dim[i], theta) for i in range(ids.shape[-1])], dim=-3)
    return emb.unsqueeze(1)


def apply_rope(xq: Tensor, xk: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs[..., 0] * xq_[..., 0] + freqs[..., 1] * xq_[..., 1]
    xk_out = freqs[..., 0] * xk_[..., 0] + freqs[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor | None, mask: Tensor | None) -> Tensor:
    """Joint attention; ``pe`` None means q and k are already rotated."""
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


def joint_attention(
    txt_qkv: tuple[Tensor, Tensor, Tensor],
    img_qkv: tuple[Tensor, Tensor, Tensor],
    pes: tuple[Tensor, ...],
    mask: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Attention over ``[text, image]``: text (1|B, H, T, D) packed per segment, image (S|B, H, N, D)."""
    if len(pes) == 1:
        q, k, v = (torch.cat((t, i), dim=2) for t, i in zip(txt_qkv, img_qkv, strict=True))
        out = attention(q, k, v, pes[0], mask)
        split = txt_qkv[0].shape[2]
        return out[:, :split], out[:, split:]
    assert mask is None, "segments run without a mask (padding dropped)"
    image_len = img_qkv[0].shape[2]
    txt_out, img_out, start = [], [], 0
    for s, pe in enumerate(pes):
        length = pe.shape[2] - image_len
        q, k, v = (
            torch.cat((t[:, :, start : start + length], i[s : s + 1]), dim=2)
            for t, i in zip(txt_qkv, img_qkv, strict=True)
        )
        out = attention(q, k, v, pe, None)
        txt_out.append(out[:, :length])
        img_out.append(out[:, length:])
        start += length
    return torch.cat(txt_out, dim=1), torch.cat(img_out, dim=0)


def packed_attention(
    q: Tensor, k: Tensor, v: Tensor, pes: tuple[Tensor, ...], mask: Tensor | None, rotated: bool = False
) -> Tensor:
    """Attention over a packed single stream: segment s is the next ``pes[s].shape[2]`` tokens.

    ``rotated``: q and k already carry RoPE (``kernels.qkv_heads``)."""
    if len(pes) == 1:
        return attention(q, k, v, None if rotated else pes[0], mask)
    assert mask is None, "segments run without a mask (padding dropped)"
    sizes = [pe.shape[2] for pe in pes]
    parts = zip(q.split(sizes, dim=2), k.split(sizes, dim=2), v.split(sizes, dim=2), pes, strict=True)
    return torch.cat(
        [attention(qs, ks, vs, None if rotated else pe, None) for qs, ks, vs, pe in parts], dim=1
    )


def packed_joint_attention(
    q: Tensor, k: Tensor, v: Tensor, text_lengths: list, image_len
) -> tuple[Tensor, Tensor]:
    """``joint_attention`` over q/k/v already rotated and packed ``[text_0, image_0, text_1, ...]``
    (1, H, rows, D) -> text (1, T, H*D) packed, image (segments, N, H*D)."""
    txt_out, img_out, start = [], [], 0
    for length in text_lengths:
        end = start + length + image_len
        out = attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], None, None)
        txt_out.append(out[:, :length])
        img_out.append(out[:, length:])
        start = end
    return torch.cat(txt_out, dim=1), torch.cat(img_out, dim=0)


def join_streams(txt: Tensor, img: Tensor, pes: tuple[Tensor, ...]) -> Tensor:
    """Double-block streams -> the single-block stream ``[text_0, image_0, text_1, image_1, ...]``."""
    if len(pes) == 1:
        return torch.cat((txt, img), 1)
    parts, start = [], 0
    for s, pe in enumerate(pes):
        length = pe.shape[2] - img.shape[1]
        parts += [txt[:, start : start + length], img[s : s + 1]]
        start += length
    return torch.cat(parts, dim=1)


def image_tokens(x: Tensor, image_len: int, pes: tuple[Tensor, ...]) -> Tensor:
    """The image tokens of each segment of the single-block stream, stacked on the batch axis."""
    if len(pes) == 1:
        return x[:, x.shape[1] - image_len :]
    parts, start = [], 0
    for pe in pes:
        end = start + pe.shape[2]
        parts.append(x[:, end - image_len : end])
        start = end
    return torch.cat(parts, dim=0)
