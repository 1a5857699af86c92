"""Triton kernels for the blocks: their attention inputs (bias, QK RMSNorm, RoPE, head layout),
and, in float8-fast, the rows its row-wise float8 layers read (``norm_rows_float8``,
``gelu_rows_float8``: see ``worker.rowwise``).

Compiled, each block's ``qkv`` goes through three passes per tensor: a reduction for the RMS, a
pointwise pass normalising and rounding to bf16, and, per guidance segment, a pass applying RoPE
and writing the layout attention reads (for the double block, also joining the text and image
streams). Here one kernel does it: each program reads a tile of rows for one head of q, k and v
from the projection's product, adds the bias where the layer adds it after its matmul (rounded to
the activation dtype, as ``DequantizedLinear`` does), normalises q and k (float32 statistics,
weight applied, rounded), rotates them with the RoPE table and writes q, k and v token-major,
(rows, 3, heads, dim): the layout the projection had, so attention (which takes q's layout for
its output) hands its consumer whole rows, and ``as_heads`` gives the (heads, rows, dim) views
attention reads. ``qkv_heads`` is the single block's (one stream, rows in place);
``joint_qkv_heads`` the double block's (two streams with their own weights, each row sent to its
place in ``[text_0, image_0, text_1, image_1, ...]``). The arithmetic is the plain path's, in its
order; only where a float32 multiply-add is contracted can a last bit differ before the bf16
rounding. A layer that adds its bias inside the matmul (an unquantized ``nn.Linear``) keeps doing
so, and the kernel gets no bias.

It runs on CUDA (and in Triton's interpreter, for the CPU tests); ``available`` says whether Triton
can be imported. ``torch.library.triton_op`` makes these operators ``torch.compile`` keeps in the
graph, token counts dynamic.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-6
# Launch shape: rows and warps per program. 8 x 2 was the fastest of 8..64 rows x 2..8 warps at
# both blocks' full-size shapes on an H200 with the earlier head-major output (bench/RESULTS.md,
# run M) and is what the full benches ran (runs N to Q). With the token-major output, 4 x 1
# measured about 10 us faster per call alone (run O); bench/kernel_bench.py measures the choices.
BLOCK_ROWS = 8
NUM_WARPS = 2
# gelu_rows_float8: one program per row, held whole. 8 warps measured fastest of 4..32 at both
# blocks' full-size widths on an H200 (bench/RESULTS.md, run Y).
GELU_WARPS = 8
# norm_rows_float8: one program per row (3072 columns at full size), held whole.
NORM_WARPS = 4

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the blocks keep the plain path
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit(do_not_specialize=["rows"])  # token counts vary: one compiled kernel
    def _heads_kernel(
        raw,  # (rows, >= 3 * heads * dim) product without bias, row stride `raw_stride`
        bias,  # (3 * heads * dim,) or unused
        q_scale,  # (dim,)
        k_scale,  # (dim,)
        dest,  # (rows,) int32: the output row of each input row, or unused (the same row)
        pe,  # (out rows, dim // 2, 2, 2) float32, by output row
        out,  # (out rows, 3, heads, dim)
        rows,
        raw_stride,
        heads,
        HAS_BIAS: tl.constexpr,
        HAS_DEST: tl.constexpr,
        DIM: tl.constexpr,
        BLOCK: tl.constexpr,
        EPS: tl.constexpr,
    ):
        HALF: tl.constexpr = DIM // 2
        # One grid axis (no 65535 limit on row tiles), heads varying fastest: the programs of one
        # row tile run together and share its RoPE rows and the raw rows' memory pages.
        program = tl.program_id(0)
        head, block = program % heads, program // heads
        row = block * BLOCK + tl.arange(0, BLOCK)
        live = row < rows
        col = tl.arange(0, DIM)
        mask = live[:, None]
        out_dtype = out.dtype.element_ty
        if HAS_DEST:  # noqa: SIM108 (a constexpr branch: the other side is not compiled)
            target_row = tl.load(dest + row, mask=live, other=0).to(tl.int64)
        else:
            target_row = row.to(tl.int64)

        # RoPE rotation for these rows: out[2i + j] = pe[i, j, 0] * x[2i] + pe[i, j, 1] * x[2i + 1].
        # The rows' table is read whole (contiguous) and taken apart in registers.
        table = tl.load(
            pe + target_row[:, None] * (HALF * 4) + tl.arange(0, HALF * 4)[None, :], mask=mask, other=0.0
        )
        by_out, by_in = tl.split(tl.reshape(table, (BLOCK, HALF, 2, 2)))  # [..., j, 0], [..., j, 1]
        f00, f10 = tl.split(by_out)
        f01, f11 = tl.split(by_in)

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
            at = (target_row[:, None] * 3 + which) * heads + head
            tl.store(out + at * DIM + col[None, :], x.to(out_dtype), mask=mask)

    def _launch(raw, bias, q_scale, k_scale, dest, pe, out, heads):
        rows, dim = raw.shape[0], q_scale.shape[0]
        torch.library.wrap_triton(_heads_kernel)[(heads * triton.cdiv(rows, BLOCK_ROWS),)](
            raw,
            raw if bias is None else bias,
            q_scale,
            k_scale,
            raw if dest is None else dest,
            pe,
            out,
            rows,
            raw.stride(0),
            heads,
            HAS_BIAS=bias is not None,
            HAS_DEST=dest is not None,
            DIM=dim,
            BLOCK=BLOCK_ROWS,
            EPS=EPS,
            num_warps=NUM_WARPS,
        )

    @torch.library.triton_op("chroma::qkv_heads", mutates_args={})
    def qkv_heads(
        raw: Tensor, bias: Tensor | None, q_scale: Tensor, k_scale: Tensor, pe: Tensor, heads: int
    ) -> Tensor:
        """(rows, >=3*H*D) product, bias, norm scales, (rows, D/2, 2, 2) RoPE -> (rows, 3, H, D)."""
        out = raw.new_empty((raw.shape[0], 3, heads, q_scale.shape[0]))
        _launch(raw, bias, q_scale, k_scale, None, pe, out, heads)
        return out

    @torch.library.triton_op("chroma::joint_qkv_heads", mutates_args={})
    def joint_qkv_heads(
        img_raw: Tensor,
        img_bias: Tensor | None,
        img_q_scale: Tensor,
        img_k_scale: Tensor,
        img_dest: Tensor,
        txt_raw: Tensor,
        txt_bias: Tensor | None,
        txt_q_scale: Tensor,
        txt_k_scale: Tensor,
        txt_dest: Tensor,
        pe: Tensor,
        heads: int,
    ) -> Tensor:
        """The double block's two streams, each with its own weights, into one packed layout.

        Row i of a stream goes to output row ``dest[i]`` (``joint_rows``), rotated with that
        row's RoPE: (rows of both, 3, H, D), each guidance segment's text then image tokens."""
        rows = img_raw.shape[0] + txt_raw.shape[0]
        out = img_raw.new_empty((rows, 3, heads, img_q_scale.shape[0]))
        _launch(img_raw, img_bias, img_q_scale, img_k_scale, img_dest, pe, out, heads)
        _launch(txt_raw, txt_bias, txt_q_scale, txt_k_scale, txt_dest, pe, out, heads)
        return out

    # -- float8-fast: cat(first, gelu(second + bias)) quantized per row (worker.rowwise) ----------
    @triton.jit
    def _gelu_rows_kernel(
        first,  # (rows, n_first) bf16, row stride first_stride; unused without n_first
        second,  # (rows, n_second) bf16, row stride second_stride: the GELU's input
        bias,  # (n_second,) bf16; unused without HAS_BIAS
        out,  # (rows, n_first + n_second) e4m3
        scales,  # (rows,) float32
        first_stride,
        second_stride,
        n_first: tl.constexpr,  # the layer's widths: constant for a block type, one kernel each
        n_second: tl.constexpr,
        FIRST_BLOCK: tl.constexpr,  # the widths rounded up to powers of two: a row in registers
        SECOND_BLOCK: tl.constexpr,
        HAS_BIAS: tl.constexpr,
    ):
        # One program per row, the whole row held: one read, the GELU once, one write.
        row = tl.program_id(0).to(tl.int64)
        col = tl.arange(0, SECOND_BLOCK)
        live = col < n_second
        h = tl.load(second + row * second_stride + col, mask=live, other=0.0)
        if HAS_BIAS:  # the bias added and rounded to bf16, as the plain path's add
            h = (h.to(tl.float32) + tl.load(bias + col, mask=live, other=0.0).to(tl.float32)).to(h.dtype)
        h = h.to(tl.float32)
        tanh = 2.0 * tl.sigmoid(2.0 * (0.7978845608028654 * (h + 0.044715 * h * h * h))) - 1.0
        g = (0.5 * h * (1.0 + tanh)).to(tl.bfloat16).to(tl.float32)  # the GELU rounded to bf16
        peak = tl.max(tl.abs(g), axis=0)  # masked columns read 0, and gelu(0) = 0
        if n_first > 0:
            first_col = tl.arange(0, FIRST_BLOCK)
            first_live = first_col < n_first
            f = tl.load(first + row * first_stride + first_col, mask=first_live, other=0.0).to(tl.float32)
            peak = tl.maximum(peak, tl.max(tl.abs(f), axis=0))
        # The maximum over 448 in bf16 (the activations' dtype), then float32.
        scale = tl.math.div_rn(peak, 448.0).to(tl.bfloat16).to(tl.float32)
        tl.store(scales + row, scale)
        width = n_first + n_second
        if n_first > 0:
            q = tl.clamp(f / scale, -448.0, 448.0)
            tl.store(out + row * width + first_col, q.to(tl.float8e4nv), mask=first_live)
        q = tl.clamp(g / scale, -448.0, 448.0)
        tl.store(out + row * width + n_first + col, q.to(tl.float8e4nv), mask=live)

    @triton.jit
    def _norm_rows_kernel(
        x,  # (rows, n) bf16, row stride x_stride: the residual stream
        shift,  # (n,) the modulation's shift
        scale,  # (n,) the modulation's scale
        out,  # (rows, n) e4m3
        scales,  # (rows,) float32
        x_stride,
        n: tl.constexpr,
        BLOCK: tl.constexpr,
        EPS: tl.constexpr,
        ROUND_MOD: tl.constexpr,  # the modulation is bf16: (1 + scale) rounds to bf16 first
    ):
        # One program per row, held whole: layer norm (float32 statistics, no affine), modulation,
        # the bf16 rounding the float8 layer's input gets, then the row's quantization.
        row = tl.program_id(0).to(tl.int64)
        col = tl.arange(0, BLOCK)
        live = col < n
        v = tl.load(x + row * x_stride + col, mask=live, other=0.0).to(tl.float32)
        mean = tl.sum(v, axis=0) / n
        d = tl.where(live, v - mean, 0.0)
        y = d * tl.rsqrt(tl.sum(d * d, axis=0) / n + EPS)
        m = 1.0 + tl.load(scale + col, mask=live, other=0.0).to(tl.float32)
        if ROUND_MOD:
            m = m.to(tl.bfloat16).to(tl.float32)
        z = m * y + tl.load(shift + col, mask=live, other=0.0).to(tl.float32)
        z = z.to(tl.bfloat16).to(tl.float32)
        q_scale = tl.math.div_rn(tl.max(tl.abs(z), axis=0), 448.0).to(tl.bfloat16).to(tl.float32)
        tl.store(scales + row, q_scale)
        q = tl.clamp(z / q_scale, -448.0, 448.0)
        tl.store(out + row * n + col, q.to(tl.float8e4nv), mask=live)

    @torch.library.triton_op("chroma::norm_rows_float8", mutates_args={})
    def _norm_rows_op(x: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        rows, n = x.shape
        out = x.new_empty((rows, n), dtype=torch.float8_e4m3fn)
        scales = x.new_empty((rows, 1), dtype=torch.float32)
        torch.library.wrap_triton(_norm_rows_kernel)[(rows,)](
            x,
            shift,
            scale,
            out,
            scales,
            x.stride(0),
            n,
            BLOCK=triton.next_power_of_2(n),
            EPS=EPS,
            ROUND_MOD=scale.dtype == torch.bfloat16,
            num_warps=NORM_WARPS,
        )
        return out, scales

    @torch.library.triton_op("chroma::gelu_rows_float8", mutates_args={})
    def _gelu_rows_op(first: Tensor | None, second: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        rows, n_second = second.shape
        n_first = 0 if first is None else first.shape[1]
        out = second.new_empty((rows, n_first + n_second), dtype=torch.float8_e4m3fn)
        scales = second.new_empty((rows, 1), dtype=torch.float32)
        torch.library.wrap_triton(_gelu_rows_kernel)[(rows,)](
            second if first is None else first,
            second,
            second if bias is None else bias,
            out,
            scales,
            0 if first is None else first.stride(0),
            second.stride(0),
            n_first,
            n_second,
            FIRST_BLOCK=triton.next_power_of_2(max(n_first, 1)),
            SECOND_BLOCK=triton.next_power_of_2(n_second),
            HAS_BIAS=bias is not None,
            num_warps=GELU_WARPS,
        )
        return out, scales


def norm_rows_float8(x: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """``rowwise.quantize_rows(modulate(layer_norm(x), shift, scale).to(bf16))`` in one kernel:
    2-D bf16 ``x`` with unit column stride, ``shift`` and ``scale`` over its columns -> e4m3, float32
    scales (rows, 1)."""
    assert x.stride(1) == 1 and shift.shape == scale.shape == x.shape[1:]
    return _norm_rows_op(x, shift.contiguous(), scale.contiguous())


def gelu_rows_float8(first: Tensor | None, second: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """``rowwise.quantize_rows(cat(first, gelu(second + bias)))`` in one kernel: 2-D bf16 ``first``
    (or None) and ``second`` with unit column stride, ``bias`` over ``second``'s columns -> e4m3
    (rows, columns of both), float32 scales (rows, 1)."""
    assert second.stride(1) == 1 and (first is None or first.stride(1) == 1)
    return _gelu_rows_op(first, second, bias)


def joint_rows(text_lengths: list, image_len, device: torch.device) -> tuple[Tensor, Tensor]:
    """Output rows of the image stream (segment after segment) and of the packed text stream,
    for the layout ``[text_0, image_0, text_1, image_1, ...]``."""
    img, txt, offset = [], [], 0
    for length in text_lengths:
        txt.append(torch.arange(length, device=device, dtype=torch.int32) + offset)
        img.append(torch.arange(image_len, device=device, dtype=torch.int32) + (offset + length))
        offset = offset + length + image_len
    return torch.cat(img), torch.cat(txt)


def reference(
    raw: Tensor, bias: Tensor | None, q_scale: Tensor, k_scale: Tensor, pe: Tensor, heads: int
) -> Tensor:
    """What ``qkv_heads`` computes, in plain torch ops (the plain path's arithmetic): (rows, 3, H, D)."""
    dim = q_scale.shape[0]
    x = raw[:, : 3 * heads * dim]
    if bias is not None:
        x = x + bias[: 3 * heads * dim]
    q, k, v = x.view(-1, 3, heads, dim).permute(1, 2, 0, 3)  # (H, rows, D) each
    out = [v]
    for t, scale in ((q, q_scale), (k, k_scale)):
        t = torch.nn.functional.rms_norm(t.float(), (dim,), weight=scale.float(), eps=EPS).to(raw.dtype)
        pairs = t.float().reshape(*t.shape[:-1], -1, 1, 2)
        rotated = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
        out.insert(len(out) - 1, rotated.reshape(t.shape).to(raw.dtype))
    return torch.stack(out).permute(2, 0, 1, 3)


def as_heads(out: Tensor) -> Tensor:
    """The kernels' (rows, 3, H, D) as q, k, v views of (H, rows, D): (3, H, rows, D)."""
    return out.permute(1, 2, 0, 3)
