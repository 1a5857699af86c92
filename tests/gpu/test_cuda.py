"""What only a CUDA card can check: float8 activations, the Triton kernels compiled for the card.

Marked ``gpu`` and skipped without CUDA; the GPU scripts run them (``bench/queue_bench.sh``,
``python -m pytest tests/gpu``).
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.kernel_checks import rel
from worker.checkpoint import load_transformer
from worker.variants import BaseWeights

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def base(tiny_sources) -> BaseWeights:
    from pathlib import Path

    cfg, state = load_transformer(Path(tiny_sources.transformer))
    return BaseWeights(cfg, state, torch.bfloat16, pin=False)  # float8-fast computes in bfloat16


def test_working_copy_keeps_float8_activation_layers(base):
    """float8-fast: the image stream keeps its float8 matmuls (the same float8 data, as plain
    tensors); only weight-only layers dequantize."""
    from worker.rowwise import Float8RowwiseLinear
    from worker.variants import DequantizedLinear, working_copy

    fast = base.build([], "float8-fast", torch.device("cuda"))
    copy = working_copy(fast)
    block = copy.double_blocks[0]
    assert type(block.img_attn.qkv) is Float8RowwiseLinear
    assert block.img_attn.qkv.qdata.data_ptr() == fast.double_blocks[0].img_attn.qkv.weight.qdata.data_ptr()
    assert block.img_attn.qkv.qdata.dtype == torch.float8_e4m3fn
    assert type(block.txt_attn.qkv) is DequantizedLinear  # the text stream is weight-only
    assert type(copy.single_blocks[0].linear1) is Float8RowwiseLinear
    assert type(copy.distilled_guidance_layer.in_proj) is DequantizedLinear


@torch.inference_mode()
def test_gelu_rows_kernel_on_cuda_quantizes_as_the_plain_ops():
    """At the model's widths, a strided GELU input: the kernel's e4m3 rows and scales against
    rowwise.quantize_rows of the plain ops on the card. Its tanh is computed another way than
    torch's, so a last float32 bit can move a bf16 rounding: nearly every byte is equal."""
    from worker.kernels import gelu_rows_float8
    from worker.rowwise import gelu_rows_reference, quantize_rows

    gen = torch.Generator().manual_seed(0)
    rows = 257
    raw = (torch.randn(rows, 21504, generator=gen) * torch.logspace(-2, 1, rows)[:, None]).cuda().bfloat16()
    first = (torch.randn(rows, 3072, generator=gen) * 3).cuda().bfloat16()
    bias = torch.randn(12288, generator=gen).cuda().bfloat16()
    for f, b in ((first, bias), (None, bias), (first, None)):
        q, scale = gelu_rows_float8(f, raw[:, 9216:], b)
        want_q, want_scale = quantize_rows(gelu_rows_reference(f, raw[:, 9216:], b))
        assert (scale == want_scale).float().mean() > 0.98
        assert (q.view(torch.uint8) == want_q.view(torch.uint8)).float().mean() > 0.995
        assert rel(q.float() * scale, want_q.float() * want_scale) < 5e-3


@torch.inference_mode()
def test_norm_rows_kernel_on_cuda_quantizes_as_the_plain_ops():
    """At the model's width: layer norm, modulation and row-wise quantization in one kernel against
    the plain ops on the card (the norm's float32 statistics are summed in another order, so a last
    bit can move a rounding: nearly every byte is equal)."""
    from worker.kernels import norm_rows_float8
    from worker.rowwise import norm_rows_reference, quantize_rows

    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(1031, 3072, generator=gen) * 4 + torch.randn(1031, 1, generator=gen)).cuda().bfloat16()
    shift, scale = (torch.randn(3072, generator=gen).cuda().bfloat16() for _ in range(2))
    q, q_scale = norm_rows_float8(x, shift, scale)
    want_q, want_scale = quantize_rows(norm_rows_reference(x, shift, scale))
    assert (q_scale == want_scale).float().mean() > 0.98
    assert (q.view(torch.uint8) == want_q.view(torch.uint8)).float().mean() > 0.995
    assert rel(q.float() * q_scale, want_q.float() * want_scale) < 5e-3


@torch.inference_mode()
def test_float8_fast_with_the_kernels_on_cuda(base, monkeypatch):
    """float8-fast's working copy with the kernels (q/k/v and GELU rows) against the plain blocks,
    eager then compiled: the norm and GELU consumers go through the kernels. At float8 noise: the
    single block's linear1 bias reaches the GELU after a bf16 rounding, and rare last bits differ,
    which moves some e4m3 roundings (4e-2 on this random tiny model, measured on an H200 before
    img_mlp.0's bias moved back inside its matmul)."""
    from tests.unit.kernel_checks import model_inputs
    from worker import kernels
    from worker.blocks import Blocks
    from worker.variants import working_copy

    _, _, args = model_inputs(torch.device("cuda"), torch.bfloat16)
    copy = working_copy(base.build([], "float8-fast", torch.device("cuda")))
    calls, norms = [], []
    gelu, norm = kernels.gelu_rows_float8, kernels.norm_rows_float8
    monkeypatch.setattr(kernels, "gelu_rows_float8", lambda *a: calls.append(a[0] is None) or gelu(*a))
    monkeypatch.setattr(kernels, "norm_rows_float8", lambda *a: norms.append(a[0].shape) or norm(*a))
    plain = copy.forward_batch(*args, blocks=Blocks())
    assert calls == [] and norms == []
    eager = copy.forward_batch(*args, blocks=Blocks(kernels=True))
    double, single = len(copy.double_blocks), len(copy.single_blocks)
    assert len(calls) == double + single and sum(calls) == double  # double: no passthrough
    assert len(norms) == 2 * double + single  # qkv and mlp.0; linear1
    assert torch.isfinite(eager).all() and rel(eager, plain) < 6e-2
    torch._dynamo.reset()
    compiled = copy.forward_batch(*args, blocks=Blocks(compile=True, kernels=True))
    assert rel(compiled, plain) < 6e-2


@torch.inference_mode()
def test_kernel_on_cuda_rounds_as_the_reference():
    from tests.unit.kernel_checks import joint_inputs, joint_reference, kernel_inputs, rel
    from worker import kernels

    args = [
        a.cuda() if isinstance(a, torch.Tensor) else a
        for a in kernel_inputs(torch.bfloat16, heads=24, dim=128)
    ]
    got, want = kernels.qkv_heads(*args), kernels.reference(*args)
    assert rel(got, want) < 2e-3
    assert (got != want).float().mean() < 0.02  # a last-bit difference where a multiply-add contracts
    joint = [a.cuda() if isinstance(a, torch.Tensor) else a for a in joint_inputs(torch.bfloat16, 24, 128)]
    got, want = kernels.joint_qkv_heads(*joint), joint_reference(*joint)
    assert rel(got, want) < 2e-3
    assert (got != want).float().mean() < 0.02


@torch.inference_mode()
def test_compiled_working_copy_with_the_kernels_on_cuda():
    """bf16, compiled, the working copy: the kernels against the plain blocks, at bf16 noise."""
    from tests.unit.kernel_checks import model_inputs
    from worker.blocks import Blocks

    _, copy, args = model_inputs(torch.device("cuda"), torch.bfloat16)
    plain = copy.forward_batch(*args, blocks=Blocks(compile=True))
    torch._dynamo.reset()
    fused = copy.forward_batch(*args, blocks=Blocks(compile=True, kernels=True))
    assert rel(fused, plain) < 2e-2
