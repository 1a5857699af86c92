"""Checks of ``worker.kernels`` run in Triton's interpreter: ``python -m tests.unit.kernel_checks``.

The interpreter is chosen when Triton is imported (``TRITON_INTERPRET=1``), so these run in their
own process (``test_kernels.py`` starts it) and print one JSON object of measured differences.

Where Triton 3.6's interpreter differs from the GPU or fails, it is set right first (``mend_interpreter``):
a loop over a runtime bound (``range(0, n, step)``) takes the bound with ``int()`` of a one-element
array, which numpy 2.4 refuses; and its float-to-float conversions truncate to bf16 and can carry
an e4m3 rounding into the wrong binade (128 written as 64), where the GPU rounds to nearest even,
and it multiplies bf16 operands as their raw 16-bit patterns. Mended, the conversions are torch's
(round to nearest even, as the GPU's ``cvt.rn``) and bf16 products widen first.
"""

from __future__ import annotations

import json
import os

import torch

from worker import sampling
from worker.blocks import Blocks
from worker.chroma_model import ChromaTransformer, default_axes
from worker.tiny import TINY
from worker.variants import BaseWeights, working_copy


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def kernel_inputs(dtype: torch.dtype, heads: int = 4, dim: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = sampling.image_ids(80, 64, torch.float32, torch.device("cpu"))  # 20 image tokens
    pe = torch.cat(
        [sampling.rope_for(n, ids, default_axes(dim)).reshape(-1, dim // 2, 2, 2) for n in (15, 5)]
    )
    rows = pe.shape[0]
    raw = torch.randn(rows, 3 * heads * dim + 64, generator=gen).to(dtype)  # + 64 MLP columns, skipped
    bias = torch.randn(3 * heads * dim, generator=gen).to(dtype)
    q_scale, k_scale = (
        (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype),
        torch.rand(dim, generator=gen).to(dtype),
    )
    return raw, bias, q_scale, k_scale, pe, heads


def joint_inputs(dtype: torch.dtype, heads: int = 4, dim: int = 32, seed: int = 1):
    """A double block's two streams: 2 segments of 20 image rows, texts of 15 and 5 rows."""
    from worker.kernels import joint_rows

    gen = torch.Generator().manual_seed(seed)
    ids = sampling.image_ids(80, 64, torch.float32, torch.device("cpu"))
    lengths, image_len = [15, 5], 20
    pe = torch.cat(
        [sampling.rope_for(n, ids, default_axes(dim)).reshape(-1, dim // 2, 2, 2) for n in lengths]
    )
    img_rows, txt_rows = joint_rows(lengths, image_len, torch.device("cpu"))
    width = 3 * heads * dim

    def stream(rows: int):
        raw = torch.randn(rows, width, generator=gen).to(dtype)
        bias = torch.randn(width, generator=gen).to(dtype)
        return (
            raw,
            bias,
            (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype),
            torch.rand(dim, generator=gen).to(dtype),
        )

    return (*stream(2 * image_len), img_rows, *stream(sum(lengths)), txt_rows, pe, heads)


def joint_reference(*args) -> torch.Tensor:
    """Each stream through ``kernels.reference`` with its rows' RoPE, placed at its output rows."""
    from worker.kernels import reference

    *img, img_rows = args[:5]
    *txt, txt_rows = args[5:10]
    pe, heads = args[10:]
    out = torch.empty(pe.shape[0], 3, heads, img[2].shape[0], dtype=img[0].dtype, device=pe.device)
    for (raw, bias, q_scale, k_scale), rows in ((img, img_rows), (txt, txt_rows)):
        out[rows.long()] = reference(raw, bias, q_scale, k_scale, pe[rows.long()], heads)
    return out


def model_inputs(device: torch.device, dtype: torch.dtype):
    """The tiny model (random float32 weights, on the CPU), its float8 working copy on ``device``
    and ``forward_batch`` inputs for two guidance segments (texts of 9 and 2 tokens, 80x64 pixels)."""
    torch.manual_seed(0)
    model = ChromaTransformer(TINY).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    base = BaseWeights(TINY, model.state_dict(), dtype, pin=False)
    copy = working_copy(base.build([], "float8", device))
    gen = torch.Generator().manual_seed(1)
    ids = sampling.image_ids(80, 64, torch.float32, device)
    img = torch.randn(1, ids.shape[1], TINY.in_channels, generator=gen).to(device, dtype)
    txts = tuple(torch.randn(1, n, TINY.context_dim, generator=gen).to(device, dtype) for n in (9, 2))
    pes = tuple(sampling.rope_for(n, ids, TINY.axes_dim) for n in (9, 2))
    timestep = torch.tensor([0.4], device=device, dtype=dtype)
    return model, copy, (img, txts, pes, timestep, torch.zeros(1, device=device))


def mend_interpreter() -> None:
    import numpy as np
    from triton import language as tl
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    floats = {
        tl.float32: torch.float32,
        tl.bfloat16: torch.bfloat16,
        tl.float16: torch.float16,
        tl.float8e4nv: torch.float8_e4m3fn,
        tl.float8e5: torch.float8_e5m2,
    }
    builder = interpreter.InterpreterBuilder
    cast, fp_to_fp = builder.cast_impl, builder.create_fp_to_fp

    def convert(src, dst_type):
        source, target = floats[src.dtype.scalar], floats[dst_type.scalar]
        data = np.ascontiguousarray(src.data)
        x = torch.from_numpy(data.reshape(-1).view(np.uint8).copy()).view(source)
        y = x.to(target).view(torch.uint8).numpy().view(interpreter._get_np_dtype(dst_type))
        return interpreter.TensorHandle(y.reshape(data.shape), dst_type.scalar)

    def exact_cast(self, src, dst_type):
        if src.dtype.scalar in floats and dst_type.scalar in floats:
            return convert(src, dst_type)
        return cast(self, src, dst_type)

    def exact_fp_to_fp(self, src, dst_type, rounding_mode):
        if rounding_mode in (None, interpreter._ir.ROUNDING_MODE.RTNE):
            return convert(src, dst_type)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    dot = builder.create_dot

    def bf16_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):  # bf16 is held as uint16: widen first
            a, b = (convert(x, tl.block_type(tl.float32, list(x.data.shape))) for x in (a, b))
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.cast_impl, builder.create_fp_to_fp = exact_cast, exact_fp_to_fp
    builder.create_dot = bf16_dot


@torch.inference_mode()
def main() -> dict:
    from worker import kernels

    mend_interpreter()

    out: dict = {"interpreter": os.environ.get("TRITON_INTERPRET") == "1", "available": kernels.available()}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        args = kernel_inputs(dtype)
        got = kernels.qkv_heads(*args)
        out[f"shape_{name}"] = list(got.shape)
        out[f"kernel_vs_reference_{name}"] = rel(got, kernels.reference(*args))
        no_bias = (args[0], None, *args[2:])
        out[f"no_bias_vs_reference_{name}"] = rel(kernels.qkv_heads(*no_bias), kernels.reference(*no_bias))
        # The comparison can fail: q and k scales swapped, or the RoPE table of the wrong rows.
        swapped = (args[0], args[1], args[3], args[2], *args[4:])
        out[f"swapped_scales_vs_reference_{name}"] = rel(
            kernels.qkv_heads(*swapped), kernels.reference(*args)
        )
        shifted = (*args[:4], args[4].roll(1, 0), args[5])
        out[f"shifted_rope_vs_reference_{name}"] = rel(kernels.qkv_heads(*shifted), kernels.reference(*args))

    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        args = joint_inputs(dtype)
        got = kernels.joint_qkv_heads(*args)
        out[f"joint_shape_{name}"] = list(got.shape)
        out[f"joint_vs_reference_{name}"] = rel(got, joint_reference(*args))
        # The comparison can fail: the streams' norm scales exchanged, image rows one place off.
        exchanged = (*args[:2], args[7], args[8], args[4], *args[5:7], args[2], args[3], *args[9:])
        out[f"joint_exchanged_scales_vs_reference_{name}"] = rel(
            kernels.joint_qkv_heads(*exchanged), joint_reference(*args)
        )
        shifted = (*args[:4], args[4].roll(1), *args[5:])
        out[f"joint_shifted_rows_vs_reference_{name}"] = rel(
            kernels.joint_qkv_heads(*shifted), joint_reference(*args)
        )

    # float8-fast's GELU rows (kernels.gelu_rows_float8) against rowwise.quantize_rows of the plain
    # ops, with and without the passthrough columns and the bias; the GELU input a strided view.
    from worker.rowwise import gelu_rows_reference, quantize_rows

    gen = torch.Generator().manual_seed(3)
    rows = 21
    first = (torch.randn(rows, 48, generator=gen) * 2).to(torch.bfloat16)
    wide = (torch.randn(rows, 400, generator=gen) * torch.logspace(-2, 1, rows)[:, None]).to(torch.bfloat16)
    second, bias = wide[:, 48:368], torch.randn(320, generator=gen).to(torch.bfloat16)
    for label, f, b in (("cat_bias", first, bias), ("bias", None, bias), ("cat", first, None)):
        q, scale = kernels.gelu_rows_float8(f, second, b)
        values = gelu_rows_reference(f, second, b)
        want_q, want_scale = quantize_rows(values)
        out[f"gelu_rows_shape_{label}"] = list(q.shape) + list(scale.shape)
        out[f"gelu_rows_scale_{label}"] = float(((scale - want_scale).abs() / want_scale).max())
        out[f"gelu_rows_vs_values_{label}"] = rel(q.float() * scale, values)
        out[f"gelu_rows_vs_reference_{label}"] = rel(q.float() * scale, want_q.float() * want_scale)
    # The comparison can fail: the bias left out, the passthrough columns run through the GELU.
    q, scale = kernels.gelu_rows_float8(first, second, None)
    out["gelu_rows_without_bias_vs_values"] = rel(q.float() * scale, gelu_rows_reference(first, second, bias))
    q, scale = kernels.gelu_rows_float8(None, torch.cat((first, second), 1), None)
    out["gelu_rows_all_gelu_vs_values"] = rel(q.float() * scale, gelu_rows_reference(first, second, None))

    # float8-fast's norm rows (kernels.norm_rows_float8): layer norm, modulation, quantization.
    from worker.rowwise import norm_rows_reference

    x = (torch.randn(rows, 96, generator=gen) * 3 + torch.randn(rows, 1, generator=gen)).to(torch.bfloat16)
    shift, scale = (torch.randn(96, generator=gen).to(torch.bfloat16) for _ in range(2))
    q, q_scale = kernels.norm_rows_float8(x, shift, scale)
    values = norm_rows_reference(x, shift, scale)
    want_q, want_scale = quantize_rows(values)
    out["norm_rows_shape"] = list(q.shape) + list(q_scale.shape)
    out["norm_rows_scale"] = float(((q_scale - want_scale).abs() / want_scale).max())
    out["norm_rows_vs_reference"] = rel(q.float() * q_scale, want_q.float() * want_scale)
    q, q_scale = kernels.norm_rows_float8(x, shift, -scale)  # the comparison can fail
    out["norm_rows_negated_scale_vs_reference"] = rel(q.float() * q_scale, want_q.float() * want_scale)

    # The 8-bit attention kernel measured as a speed lever (bench/attention8.py, not adopted): the
    # kernel against its torch reference (same quantization, same tile order), then against exact
    # attention; two segments, the second ending inside a key tile, and one of 300 rows.
    from bench import attention8

    for label, lengths, spread in (("two", [150, 37], 1.0), ("one", [300], 3.0)):
        heads = (torch.randn(sum(lengths), 3, 2, 32, generator=gen) * spread).to(torch.bfloat16)
        got = attention8.attention_8bit(heads, lengths)
        out[f"attention8_shape_{label}"] = list(got.shape)
        out[f"attention8_vs_reference_{label}"] = rel(got, attention8.reference(heads, lengths))
        out[f"attention8_vs_exact_{label}"] = rel(got, exact_attention(heads, lengths))
    # The comparison can fail: the segments attending across each other.
    heads = (torch.randn(187, 3, 2, 32, generator=gen)).to(torch.bfloat16)
    out["attention8_joined_segments_vs_reference"] = rel(
        attention8.attention_8bit(heads, [150, 37]), attention8.reference(heads, [187])
    )

    # The whole model: blocks with the kernels against the plain blocks, two segments.
    calls = {"qkv_heads": 0, "joint_qkv_heads": 0}
    bias_seen: list[bool] = []
    for op in calls:
        real = getattr(kernels, op)

        def counted(*a, _real=real, _op=op):
            calls[_op] += 1
            bias_seen.append(a[1] is not None)
            return _real(*a)

        setattr(kernels, op, counted)
    model, copy, args = model_inputs(torch.device("cpu"), torch.float32)
    img, txts, pes, t, g = args
    plain = model.forward_batch(img, txts, pes, t, g, blocks=Blocks())
    fused = model.forward_batch(img, txts, pes, t, g, blocks=Blocks(kernels=True))
    out["model_kernels_vs_plain_float32"] = rel(fused, plain)
    out["kernel_calls_per_forward"] = dict(calls)
    one = model(img, txts[0], pes[0], t, g, blocks=Blocks(kernels=True))
    out["model_one_segment_kernels_vs_plain_float32"] = rel(one, model(img, txts[0], pes[0], t, g))
    out["kernel_calls_after_one_segment"] = dict(calls)

    # The working copy (float8 weight-only, dequantized once): its layers add the bias after the
    # matmul, so the kernels add it; the same numbers as the plain blocks on the same copy.
    plain = copy.forward_batch(*args, blocks=Blocks())
    bias_seen.clear()
    out["working_copy_kernels_vs_plain_float32"] = rel(
        copy.forward_batch(*args, blocks=Blocks(kernels=True)), plain
    )
    out["working_copy_bias_in_kernel"] = list(bias_seen)

    # torchao's float8 weight-only layers (no working copy) also add the bias after the matmul.
    variant = BaseWeights(TINY, model.state_dict(), torch.float32, pin=False).build([], "float8", img.device)
    plain = variant.forward_batch(*args, blocks=Blocks())
    bias_seen.clear()
    out["float8_kernels_vs_plain_float32"] = rel(
        variant.forward_batch(*args, blocks=Blocks(kernels=True)), plain
    )
    out["float8_bias_in_kernel"] = list(bias_seen)
    return out


def exact_attention(heads: torch.Tensor, lengths: list) -> torch.Tensor:
    """Float32 attention per segment over (rows, 3, H, D) -> (rows, H * D)."""
    out, start = [], 0
    for length in lengths:
        q, k, v = heads[start : start + length].float().permute(1, 2, 0, 3)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out.append(o.permute(1, 0, 2).reshape(length, -1))
        start += length
    return torch.cat(out)


if __name__ == "__main__":
    print(json.dumps(main()))
