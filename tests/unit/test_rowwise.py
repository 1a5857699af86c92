"""float8-fast's row-wise layers as plain tensors (``worker.rowwise``) compute what torchao's
float8 layers compute: the same activation quantization and the same ``_scaled_mm``, bit for bit
on the CPU. The row kernels are checked in Triton's interpreter (``test_kernels.py``) and on CUDA,
byte for byte but for rare last-step roundings (``tests/gpu``)."""

from __future__ import annotations

import pytest
import torch

from worker.chroma_model import CastInputLinear, product
from worker.rowwise import Float8RowwiseLinear, quantize_rows
from worker.tiny import TINY
from worker.variants import BaseWeights, is_rowwise_float8, working_copy


@pytest.fixture(autouse=True)
def float8_fast_on_the_cpu(monkeypatch):
    """torchao refuses to build float8-fast layers without a float8-capable card; the layers
    themselves (and ``_scaled_mm``) run on the CPU, so the check is lifted for these tests."""
    import torchao.quantization.quant_api as quant_api

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)


def fast_layer(seed: int = 0, **options) -> CastInputLinear:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    torch.manual_seed(seed)
    layer = CastInputLinear(64, 96).to(torch.bfloat16)
    config = Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow(), set_inductor_config=False, **options
    )
    quantize_(layer, config)
    return layer


def test_layers_whose_arithmetic_differs_stay_torchaos():
    """Bounds on the activations' scale or inner padding change torchao's arithmetic: such a
    layer is not rebuilt as a plain one (the working copy keeps torchao's)."""
    from torchao.float8.inference import Float8MMConfig

    from worker.rowwise import reproduces

    assert reproduces(fast_layer().weight)
    assert not reproduces(fast_layer(activation_value_ub=100.0).weight)
    padded = Float8MMConfig(use_fast_accum=True, pad_inner_dim=True)
    assert not reproduces(fast_layer(mm_config=padded).weight)


@torch.inference_mode()
def test_quantize_rows_is_torchaos_activation_quantization():
    from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8

    x = (torch.randn(33, 200) * torch.logspace(-3, 2, 33)[:, None]).to(torch.bfloat16)
    q, scale = quantize_rows(x)
    want_scale = _choose_scale_float8(x, block_size=[1, 200])
    want = _quantize_affine_float8(x, want_scale)
    assert torch.equal(scale, want_scale.reshape(33, 1))
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))


@torch.inference_mode()
def test_rowwise_layer_gives_the_float8_fast_layers_bits():
    layer = fast_layer()
    assert is_rowwise_float8(layer.weight)
    plain = Float8RowwiseLinear.from_float8(layer.weight, layer.bias)
    assert plain.qdata.data_ptr() == layer.weight.qdata.data_ptr()  # shared, not copied
    x = torch.randn(2, 19, 64)  # float32, as the norms give under autocast
    assert torch.equal(plain(x), layer(x))
    moved = plain.to("cpu")  # an nn.Module still: .to() and friends work, the data untouched
    assert moved is plain and plain.qdata.dtype == torch.float8_e4m3fn
    got, bias = product(plain, x)
    assert bias is layer.bias
    assert torch.equal(got, torch.nn.functional.linear(x.to(torch.bfloat16), layer.weight))


@torch.inference_mode()
def test_working_copy_of_a_float8_fast_variant_renders_the_same():
    """The tiny model's float8-fast variant on the CPU, eager: its working copy (row-wise layers as
    plain tensors, weight-only layers dequantized once) gives the variant's output exactly."""
    from tests.unit.kernel_checks import model_inputs

    model, _, args = model_inputs(torch.device("cpu"), torch.bfloat16)
    variant = BaseWeights(TINY, model.state_dict(), torch.bfloat16, pin=False).build(
        [], "float8-fast", torch.device("cpu")
    )
    copy = working_copy(variant)
    rowwise = [m for m in copy.modules() if isinstance(m, Float8RowwiseLinear)]
    assert len(rowwise) == sum(isinstance(m, CastInputLinear) for m in variant.modules()) > 0
    assert not any(isinstance(m, CastInputLinear) for m in copy.modules())
    shared = variant.double_blocks[0].img_mlp[2].weight.qdata
    assert copy.double_blocks[0].img_mlp[2].qdata.data_ptr() == shared.data_ptr()
    want = variant.forward_batch(*args)
    got = copy.forward_batch(*args)
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)


if __name__ == "__main__":
    pytest.main([__file__])
