"""One Triton kernel for the single block's attention inputs: bias, QK RMSNorm, RoPE, head layout.

Compiled, the single block's ``qkv`` goes through three passes per tensor: a reduction for the
RMS, a pointwise pass normalising and rounding to bf16, and, per guidance segment, a pass applying
RoPE and writing the layout attention reads. ``qkv_heads`` does it in one: each program reads a
tile of rows for one head of q, k and v from the ``linear1`` product, adds the bias (rounded to the
activation dtype, as the unfused add is), normalises q and k (float32 statistics, weight applied,
rounded), rotates them with the packed RoPE table and writes q, k and v as (3, heads, rows, dim).
The arithmetic is the plain path's, in its order; only where a float32 multiply-add is contracted
can a last bit differ before the bf16 rounding.

It runs on CUDA (and in Triton's interpreter, for the CPU tests); ``available`` says whether Triton
can be imported. ``torch.library.triton_op`` makes it an operator ``torch.compile`` keeps in the
graph, token counts dynamic.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-6
BLOCK_ROWS = 32

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the blocks keep the plain path
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _qkv_heads_kernel(
        raw,  # (rows, >= 3 * heads * dim) product without bias, row stride `raw_stride`
        bias,  # (3 * heads * dim,) or unused
        q_scale,  # (dim,)
        k_scale,  # (dim,)
        pe,  # (rows, dim // 2, 2, 2) float32
        out,  # (3, heads, rows, dim)
        rows,
        raw_stride,
        heads,
        HAS_BIAS: tl.constexpr,
        DIM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        HALF: tl.constexpr = DIM // 2
        block, head = tl.program_id(0), tl.program_id(1)
        row = block * BLOCK + tl.arange(0, BLOCK)
        live = row < rows
        col = tl.arange(0, DIM)
        half = tl.arange(0, HALF)
        mask = live[:, None]
        out_dtype = out.dtype.element_ty

        # RoPE rotation for these rows: out[2i + j] = pe[i, j, 0] * x[2i] + pe[i, j, 1] * x[2i + 1]
        table = pe + row[:, None].to(tl.int64) * (HALF * 4) + half[None, :] * 4
        f00 = tl.load(table + 0, mask=mask, other=0.0)
        f01 = tl.load(table + 1, mask=mask, other=0.0)
        f10 = tl.load(table + 2, mask=mask, other=0.0)
        f11 = tl.load(table + 3, mask=mask, other=0.0)

        for which in tl.static_range(3):  # q, k, v
            start = (which * heads + head) * DIM
            x = tl.load(
                raw + row[:, None].to(tl.int64) * raw_stride + start + col[None, :], mask=mask, other=0.0
            )
            if HAS_BIAS:
                x = (x.to(tl.float32) + tl.load(bias + start + col).to(tl.float32)[None, :]).to(out_dtype)
            x = x.to(tl.float32)
            if which < 2:
                if which == 0:
                    scale = tl.load(q_scale + col).to(tl.float32)
                else:
                    scale = tl.load(k_scale + col).to(tl.float32)
                rms = tl.rsqrt(tl.sum(x * x, axis=1) / DIM + EPS)
                y = (x * rms[:, None] * scale[None, :]).to(out_dtype).to(tl.float32)
                even, odd = tl.split(tl.reshape(y, (BLOCK, HALF, 2)))
                x = tl.reshape(tl.join(f00 * even + f01 * odd, f10 * even + f11 * odd), (BLOCK, DIM))
            target = out + ((which * heads + head).to(tl.int64) * rows + row[:, None]) * DIM + col[None, :]
            tl.store(target, x.to(out_dtype), mask=mask)

    @torch.library.triton_op("chroma::qkv_heads", mutates_args={})
    def qkv_heads(
        raw: Tensor, bias: Tensor | None, q_scale: Tensor, k_scale: Tensor, pe: Tensor, heads: int
    ) -> Tensor:
        """(rows, >=3*H*D) product, bias, norm scales, (rows, D/2, 2, 2) RoPE -> (3, H, rows, D)."""
        rows, dim = raw.shape[0], q_scale.shape[0]
        out = raw.new_empty((3, heads, rows, dim))
        grid = (triton.cdiv(rows, BLOCK_ROWS), heads)
        torch.library.wrap_triton(_qkv_heads_kernel)[grid](
            raw,
            raw if bias is None else bias,
            q_scale,
            k_scale,
            pe,
            out,
            rows,
            raw.stride(0),
            heads,
            HAS_BIAS=bias is not None,
            DIM=dim,
            BLOCK=BLOCK_ROWS,
        )
        return out


def reference(
    raw: Tensor, bias: Tensor | None, q_scale: Tensor, k_scale: Tensor, pe: Tensor, heads: int
) -> Tensor:
    """What ``qkv_heads`` computes, in plain torch ops (the plain path's arithmetic)."""
    dim = q_scale.shape[0]
    x = raw[:, : 3 * heads * dim]
    if bias is not None:
        x = x + bias
    q, k, v = x.view(-1, 3, heads, dim).permute(1, 2, 0, 3)  # (H, rows, D) each
    out = [v]
    for t, scale in ((q, q_scale), (k, k_scale)):
        t = torch.nn.functional.rms_norm(t.float(), (dim,), weight=scale.float(), eps=EPS).to(raw.dtype)
        pairs = t.float().reshape(*t.shape[:-1], -1, 1, 2)
        rotated = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
        out.insert(len(out) - 1, rotated.reshape(t.shape).to(raw.dtype))
    return torch.stack(out)
