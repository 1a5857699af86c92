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
    """float8-fast: the image stream keeps its float8 matmuls; only weight-only layers dequantize."""
    from worker.chroma_model import CastInputLinear
    from worker.variants import DequantizedLinear, is_weight_only_float8, working_copy

    fast = base.build([], "float8-fast", torch.device("cuda"))
    copy = working_copy(fast)
    block = copy.double_blocks[0]
    assert block.img_attn.qkv.weight is fast.double_blocks[0].img_attn.qkv.weight  # shared, float8
    assert hasattr(block.img_attn.qkv.weight, "qdata") and not is_weight_only_float8(
        block.img_attn.qkv.weight
    )
    assert type(block.img_attn.qkv) is CastInputLinear
    assert type(block.txt_attn.qkv) is DequantizedLinear  # the text stream is weight-only
    assert type(copy.single_blocks[0].linear1) is CastInputLinear
    assert type(copy.distilled_guidance_layer.in_proj) is DequantizedLinear


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
