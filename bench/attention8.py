"""An 8-bit attention kernel for float8-fast, measured as a speed lever and NOT adopted (its
figures: bench/RESULTS.md, run Z; re-measure with ``python bench/levers.py --only attention8``).

Why it was tried: attention is about a third of a float8-fast step at full size (45 of 146 ms),
its two products run in bf16, and Hopper multiplies 8-bit types at about twice that rate. PyTorch
2.11 sends float8 ``scaled_dot_product_attention`` only to FlashAttention 3's own package, which
does not install here. Why it is not used: on an H200 this Triton kernel is slower than cuDNN's
bf16 attention at every launch shape tried (1.44 ms at best for a step's two segments of a
single block, against cuDNN's 0.74 ms, plus 0.22 ms to quantize k and v), because its 8-bit
variants spill registers (12 to 300 spills a thread); the same kernel with bf16 products does not
spill and reaches 0.89 ms, still behind cuDNN.

What it computes, over the q/k/v kernels' output (rows, 3, heads, dim) with each guidance
segment a contiguous row range that attends only within itself (one launch per segment):

- q @ k^T in int8 (``QK_INT8``): q and k rows (token, head) scaled by their absolute maximum over
  127 and rounded half away from zero; a logit is ``dot(q8, k8) * q_scale[row] * k_scale[column]``
  with the softmax scale and log2(e) folded into q's. int8 rather than e4m3: on random rows of
  spread 3 the attention output moves 4.8% from exact against 11.8% with e4m3 (CPU, D=128).
- p @ v in e4m3 (``PV_FP8``): v rows scaled by their maximum over 448 and written transposed
  (head, dim, tokens), as Hopper's 8-bit products read both operands along the reduced axis. v's
  row scales cannot leave the product, so each key tile's probabilities take them in:
  ``p * v_scale[column] / c`` with ``c`` the tile's largest v scale over 448, and the accumulator
  is kept in units of ``c`` (its online-softmax rescaling gains the scalar ``c_old / c_new``).
- Either product can run in bf16 instead (the options above), which is how the levers bench
  separates the products' cost from the quantization's.

The row sum adds the float32 probabilities; the output is ``acc * c / l`` rounded to the input's
dtype, token-major (rows, heads * dim). ``reference`` is the same arithmetic in torch ops in the
kernel's tile order (the interpreter checks in tests/unit hold the kernel to it bit for bit).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

E4M3_MAX = 448.0
INT8_MAX = 127.0
LOG2E = 1.4426950408889634
# Launch shape (query rows x key rows per tile, warps, pipeline stages): the fastest of those
# bench/levers.py tried for both 8-bit products (run Z).
BLOCK_M = 64
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 2
# _kv_kernel: rows per program.
KV_ROWS = 64

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install
    triton = None


if triton is not None:

    @triton.jit
    def _int8_rows(x):
        """Rows to int8, each scaled by its absolute maximum over 127, rounded half away from zero."""
        peak = tl.max(tl.abs(x), axis=1)
        scale = tl.where(peak > 0, peak / 127.0, 1.0)
        y = x / scale[:, None]
        return tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8), scale

    @triton.jit(do_not_specialize=["start", "length"])
    def _kv_kernel(
        heads,  # (rows, 3, H, D) bf16: q, k, v per token (worker.kernels)
        k8,  # (H, rows, D) int8
        k_scales,  # (H, rows) float32
        v8t,  # (H, D, padded) e4m3: v transposed, each segment from a 16-aligned column
        v_scales,  # (H, padded) float32
        start,  # the segment's first row
        length,  # its rows
        rows,
        v_start,  # its first column in v8t (a multiple of 16)
        padded,
        H: tl.constexpr,
        DIM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        block, head = tl.program_id(0), tl.program_id(1)
        index = block * BLOCK + tl.arange(0, BLOCK)
        live = index < length
        row = start + index
        col = tl.arange(0, DIM)
        src = heads + row[:, None].to(tl.int64) * (3 * H * DIM) + head * DIM + col[None, :]
        k = tl.load(src + H * DIM, mask=live[:, None], other=0.0).to(tl.float32)
        k8_rows, scale = _int8_rows(k)
        at = head.to(tl.int64) * rows + row
        tl.store(k8 + at[:, None] * DIM + col[None, :], k8_rows, mask=live[:, None])
        tl.store(k_scales + at, scale, mask=live)

        v = tl.load(src + 2 * H * DIM, mask=live[:, None], other=0.0).to(tl.float32)
        peak = tl.max(tl.abs(v), axis=1)
        scale = tl.where(peak > 0, peak / 448.0, 1.0)
        v8 = tl.clamp(v / scale[:, None], -448.0, 448.0).to(tl.float8e4nv)
        column = v_start + index
        dest = v8t + (head.to(tl.int64) * DIM + col[None, :]) * padded + column[:, None]
        tl.store(dest, v8, mask=live[:, None])
        tl.store(v_scales + head.to(tl.int64) * padded + column, scale, mask=live)

    @triton.jit
    def _tile(
        acc, m_i, l_i, c_i, q_op, q_scale, k_ptrs, ks_ptrs, v_ptrs, vs_ptrs, key, length,
        MASKED: tl.constexpr, QK_INT8: tl.constexpr, PV_FP8: tl.constexpr,
    ):  # fmt: skip
        if MASKED:
            live = key < length
            k = tl.load(k_ptrs, mask=live[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=live[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        if QK_INT8:
            ks = tl.load(ks_ptrs, mask=live, other=0.0) if MASKED else tl.load(ks_ptrs)
            s = tl.dot(q_op, tl.trans(k)).to(tl.float32) * q_scale[:, None] * ks[None, :]
        else:
            s = tl.dot(q_op, tl.trans(k)) * q_scale[:, None]
        if MASKED:
            s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if PV_FP8:
            vs = tl.load(vs_ptrs, mask=live, other=0.0) if MASKED else tl.load(vs_ptrs)
            c = tl.maximum(tl.max(vs, axis=0), 1e-30) / 448.0
            p_op = (p * (vs / c)[None, :]).to(tl.float8e4nv)
            c_new = tl.zeros_like(m_i) + c  # a vector: the loop carries it with m_i and l_i
            acc = acc * (alpha * (c_i / c_new))[:, None]
        else:
            p_op = p.to(v.dtype)
            c_new = c_i
            acc = acc * alpha[:, None]
        acc = tl.dot(p_op, v, acc)
        return acc, m_new, l_i, c_new

    @triton.jit(do_not_specialize=["start", "length", "whole", "rows"])
    def _attention_kernel(
        heads,  # (rows, 3, H, D) bf16: q (and, where not quantized, k and v) read from here
        k8,  # (H, rows, D) int8
        k_scales,  # (H, rows) float32
        v8t,  # (H, D, padded) e4m3
        v_scales,  # (H, padded) float32
        out,  # (rows, H * D) bf16
        start,  # the segment's first row
        length,  # its rows
        whole,  # its rows in whole key tiles
        rows,
        v_start,  # its first column in v8t (a multiple of 16)
        padded,
        H: tl.constexpr,
        DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        QK_SCALE: tl.constexpr,  # softmax scale * log2(e)
        QK_INT8: tl.constexpr = True,  # q @ k^T in int8 (else bf16: bench/levers.py compares)
        PV_FP8: tl.constexpr = True,  # p @ v in e4m3 (else bf16)
    ):
        block, head = tl.program_id(0), tl.program_id(1)
        query = block * BLOCK_M + tl.arange(0, BLOCK_M)
        live = query < length
        row = (start + query).to(tl.int64)
        col = tl.arange(0, DIM)
        stride: tl.constexpr = 3 * H * DIM
        q = tl.load(heads + row[:, None] * stride + head * DIM + col[None, :], mask=live[:, None], other=0.0)
        key = tl.arange(0, BLOCK_N)
        k_head = head.to(tl.int64) * rows + start
        ks_ptrs = k_scales + k_head + key
        if QK_INT8:
            q_op, q_row = _int8_rows(q.to(tl.float32))
            q_scale = q_row * QK_SCALE
            k_ptrs = k8 + (k_head + key[:, None]) * DIM + col[None, :]
            k_step: tl.constexpr = BLOCK_N * DIM
        else:
            q_op = q
            q_scale = tl.full((BLOCK_M,), QK_SCALE, tl.float32)
            k_ptrs = (
                heads + (start + key[:, None]).to(tl.int64) * stride + H * DIM + head * DIM + col[None, :]
            )
            k_step: tl.constexpr = BLOCK_N * stride
        vs_ptrs = v_scales + head.to(tl.int64) * padded + v_start + key
        if PV_FP8:
            v_ptrs = v8t + (head.to(tl.int64) * DIM + col[None, :]) * padded + (v_start + key)[:, None]
            v_step: tl.constexpr = BLOCK_N
        else:
            v_ptrs = (
                heads + (start + key[:, None]).to(tl.int64) * stride + 2 * H * DIM + head * DIM + col[None, :]
            )
            v_step: tl.constexpr = BLOCK_N * stride

        acc = tl.zeros((BLOCK_M, DIM), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        c_i = tl.full((BLOCK_M,), 1.0, tl.float32)
        for _ in range(0, whole, BLOCK_N):
            acc, m_i, l_i, c_i = _tile(
                acc, m_i, l_i, c_i, q_op, q_scale, k_ptrs, ks_ptrs, v_ptrs, vs_ptrs, key, length,
                False, QK_INT8, PV_FP8,
            )  # fmt: skip
            k_ptrs += k_step
            ks_ptrs += BLOCK_N
            v_ptrs += v_step
            vs_ptrs += BLOCK_N
        if whole < length:
            acc, m_i, l_i, c_i = _tile(
                acc, m_i, l_i, c_i, q_op, q_scale, k_ptrs, ks_ptrs, v_ptrs, vs_ptrs, key + whole, length,
                True, QK_INT8, PV_FP8,
            )  # fmt: skip
        result = acc * (c_i / l_i)[:, None]
        dest = out + row[:, None] * (H * DIM) + head * DIM + col[None, :]
        tl.store(dest, result.to(out.dtype.element_ty), mask=live[:, None])

    def _padded(rows: int) -> int:
        return (rows + 15) // 16 * 16  # each segment's columns of v8t start 16-byte aligned

    def quantize_kv(heads: Tensor, lengths: list[int]):
        """k as int8 rows, v as e4m3 rows transposed, and their scales (``_kv_kernel``)."""
        rows, _, n_heads, dim = heads.shape
        padded = sum(_padded(length) for length in lengths)
        k8 = heads.new_empty((n_heads, rows, dim), dtype=torch.int8)
        k_scales = heads.new_empty((n_heads, rows), dtype=torch.float32)
        v8t = heads.new_empty((n_heads, dim, padded), dtype=torch.float8_e4m3fn)
        v_scales = heads.new_empty((n_heads, padded), dtype=torch.float32)
        start, v_start = 0, 0
        for length in lengths:
            torch.library.wrap_triton(_kv_kernel)[(triton.cdiv(length, KV_ROWS), n_heads)](
                heads, k8, k_scales, v8t, v_scales, start, length, rows, v_start, padded,
                H=n_heads, DIM=dim, BLOCK=KV_ROWS,
            )  # fmt: skip
            start, v_start = start + length, v_start + _padded(length)
        return k8, k_scales, v8t, v_scales

    def attend(
        heads: Tensor, lengths: list[int], k8, k_scales, v8t, v_scales, qk_int8=True, pv_fp8=True
    ) -> Tensor:
        """``_attention_kernel`` over each segment -> (rows, H * D)."""
        rows, _, n_heads, dim = heads.shape
        padded = v8t.shape[2]
        out = heads.new_empty((rows, n_heads * dim))
        start, v_start = 0, 0
        for length in lengths:
            torch.library.wrap_triton(_attention_kernel)[(triton.cdiv(length, BLOCK_M), n_heads)](
                heads, k8, k_scales, v8t, v_scales, out, start, length, length // BLOCK_N * BLOCK_N, rows,
                v_start, padded,
                H=n_heads, DIM=dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, QK_SCALE=LOG2E / math.sqrt(dim),
                QK_INT8=qk_int8, PV_FP8=pv_fp8, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
            )  # fmt: skip
            start, v_start = start + length, v_start + _padded(length)
        return out

    @torch.library.triton_op("chroma::attention_8bit", mutates_args={})
    def _attention_op(heads: Tensor, lengths: list[int]) -> Tensor:
        return attend(heads, lengths, *quantize_kv(heads, lengths))


def attention_8bit(heads: Tensor, lengths: list) -> Tensor:
    """int8 ``q @ k^T`` and e4m3 ``p @ v`` over the q/k/v kernels' output: (rows, 3, H, D) with the
    segments' row counts ``lengths`` (summing to rows) -> (rows, H * D), each segment attending
    only within itself. The rows already carry RoPE and the QK norm (``worker.kernels``)."""
    assert heads.is_contiguous() and heads.shape[1] == 3
    return _attention_op(heads, list(lengths))


def _rows_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    peak = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(peak > 0, peak / INT8_MAX, torch.ones_like(peak))
    y = x / scale
    return torch.where(y >= 0, y + 0.5, y - 0.5).trunc(), scale


def _rows_e4m3(x: Tensor) -> tuple[Tensor, Tensor]:
    peak = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(peak > 0, peak / E4M3_MAX, torch.ones_like(peak))
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float(), scale


def reference(heads: Tensor, lengths: list, block_n: int = BLOCK_N) -> Tensor:
    """What ``attention_8bit`` computes, in float32 torch ops and the kernel's order (key tiles of
    ``block_n``, the online softmax): (rows, 3, H, D) -> (rows, H * D)."""
    rows, _, n_heads, dim = heads.shape
    out, start = [], 0
    for length in lengths:
        q, k, v = heads[start : start + length].float().permute(1, 2, 0, 3)  # (H, n, D) each
        q8, q_row = _rows_int8(q)
        k8, k_row = _rows_int8(k)
        v8, v_row = _rows_e4m3(v)
        q_scale = q_row * (LOG2E / math.sqrt(dim))  # (H, n, 1)
        acc = torch.zeros(n_heads, length, dim)
        m = torch.full((n_heads, length, 1), float("-inf"))
        total = torch.zeros(n_heads, length, 1)
        c_old = torch.ones(n_heads, 1, 1)
        for first in range(0, length, block_n):
            keys = slice(first, first + block_n)
            s = (q8 @ k8[:, keys].transpose(1, 2)) * q_scale * k_row[:, keys].transpose(1, 2)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            p = torch.exp2(s - m_new)
            alpha = torch.exp2(m - m_new)
            total = total * alpha + p.sum(dim=-1, keepdim=True)
            vs = v_row[:, keys].transpose(1, 2)  # (H, 1, n)
            c = vs.amax(dim=-1, keepdim=True).clamp_min(1e-30) / E4M3_MAX
            p8 = (p * (vs / c)).to(torch.float8_e4m3fn).float()
            acc = acc * (alpha * (c_old / c)) + p8 @ v8[:, keys]
            m, c_old = m_new, c
        out.append((acc * (c_old / total)).to(heads.dtype).permute(1, 0, 2).reshape(length, n_heads * dim))
        start += length
    return torch.cat(out)
