"""float8-fast's row-wise float8 layers as plain tensors, and the rows its kernels quantize.

"float8-fast" quantizes the image-stream activations per row (torchao's
``Float8DynamicActivationFloat8WeightConfig(PerRow())``): the row's absolute maximum over 448
gives its scale (divided in the activation dtype, then float32), the row is divided by it, clamped
and rounded to e4m3, and ``torch._scaled_mm`` multiplies with the weights' own per-row scales.
``Float8RowwiseLinear`` is that layer with torchao's tensor subclass taken apart (the working copy
builds it from the variant's weights, sharing them), so the op that writes a layer's input can
quantize it too.

Compiled, each layer's quantization was an inductor reduction of its own, and those before the
GELU consumers ran at about a quarter of the card's bandwidth (bench/RESULTS.md, run X: 0.41 ms per
single block at full size). Two Triton kernels (``worker.kernels``) write the e4m3 rows and their
scales directly, one program per row holding the whole row (one read, one write):
``norm_rows_float8`` for the layers after a layer norm and modulation (the image stream's ``qkv``
and ``mlp.0``, the single block's ``linear1``), ``gelu_rows_float8`` for those after the tanh GELU
(the double block's ``img_mlp.2``, the single block's ``linear2`` over ``cat(attn, gelu(mlp))``).
They keep the plain path's roundings in its order (the GELU or the modulated norm rounded to bf16,
the scale divided exactly and rounded to bf16, round-to-nearest-even to e4m3). Three things can
move a last float32 bit, and so, rarely, a bf16 rounding or one e4m3 step: the tanh computed
another way than torch's, a multiply-add contracted, and each value's division by its scale (Triton's,
within 2 ulp). On CUDA more than 99.5% of bytes equal the plain ops' (tests/gpu). In the single
block, ``linear1``'s bias reaches the GELU after the product's bf16 rounding (``product``), as it
already did for the q/k/v kernel; every other bias stays inside ``_scaled_mm``, as torchao adds it.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn as nn
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """torchao's row-wise activation quantization, op for op: (rows, K) -> e4m3 (rows, K) and
    float32 scales (rows, 1)."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).to(torch.float32)
    return (x.to(torch.float32) / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def gelu_rows_reference(first: Tensor | None, second: Tensor, bias: Tensor | None) -> Tensor:
    """The rows ``gelu_rows_float8`` quantizes, in plain torch ops: ``cat(first, gelu(second + bias))``."""
    h = second if bias is None else second + bias
    g = torch.nn.functional.gelu(h, approximate="tanh")
    return g if first is None else torch.cat((first, g), dim=-1)


class Float8RowwiseLinear(nn.Module):
    """A float8-fast layer: e4m3 weights (out, in) with float32 scales (out, 1), activations
    quantized per row on every forward, the bias added by ``_scaled_mm``. ``product`` leaves the
    bias to the caller (``chroma_model.product``)."""

    def __init__(self, qdata: Tensor, scale: Tensor, bias: Tensor | None, fast_accum: bool):
        super().__init__()
        self.register_buffer("qdata", qdata, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.bias = bias
        self.fast_accum = fast_accum
        self.out_features, self.in_features = qdata.shape

    @classmethod
    def from_float8(cls, weight, bias: Tensor | None) -> Float8RowwiseLinear:
        """From torchao's row-wise ``Float8Tensor`` weight, sharing its data."""
        assert reproduces(weight), "a float8 layer whose arithmetic this class does not reproduce"
        return cls(weight.qdata, weight.scale, bias, bool(weight.mm_config.use_fast_accum))

    def matmul(self, xq: Tensor, x_scale: Tensor, bias: Tensor | None) -> Tensor:
        return torch._scaled_mm(
            xq,
            self.qdata.t(),
            x_scale,
            self.scale.t(),
            bias=bias,
            out_dtype=torch.bfloat16,
            use_fast_accum=self.fast_accum,
        )

    def _linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = self.matmul(*quantize_rows(rows), bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self._linear(x, self.bias)

    def product(self, x: Tensor) -> Tensor:
        return self._linear(x, None)

    def norm_forward(self, x: Tensor, shift: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
        """``modulate(layer_norm(x), shift, scale)`` through the layer, the rows quantized by one
        kernel; ``bias`` None leaves the layer's bias to the caller (``product``)."""
        from worker.kernels import norm_rows_float8  # imports Triton: only where the kernel runs

        rows = x.reshape(-1, x.shape[-1])
        out = self.matmul(*norm_rows_float8(rows, shift.reshape(-1), scale.reshape(-1)), bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def gelu_forward(self, first: Tensor | None, second: Tensor, bias: Tensor | None) -> Tensor:
        """``self(cat(first, gelu(second + bias)))`` for 2-D rows, quantized by one kernel."""
        from worker.kernels import gelu_rows_float8  # imports Triton: only where the kernel runs

        return self.matmul(*gelu_rows_float8(first, second, bias), self.bias)


@functools.cache
def _mslk_installed() -> bool:
    """Whether torchao could pick its MSLK kernels (looked up once: every working copy asks)."""
    return importlib.util.find_spec("mslk") is not None


def reproduces(weight) -> bool:
    """Whether ``Float8RowwiseLinear`` computes what torchao computes for this row-wise weight:
    torch's own quantization and ``_scaled_mm`` (not torchao's optional MSLK kernels), no inner
    padding, no bounds on the activations' scale."""
    from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

    kwargs, config = weight.act_quant_kwargs, weight.mm_config
    mslk = _mslk_installed()
    return (
        weight.scale.shape == (weight.qdata.shape[0], 1)
        and config is not None
        and not config.pad_inner_dim
        and kwargs.hp_value_lb is None
        and kwargs.hp_value_ub is None
        and (weight.kernel_preference == KernelPreference.TORCH or not mslk)
        and (kwargs.kernel_preference == KernelPreference.TORCH or not mslk)
    )


def fuses_rows(layer: nn.Module, x: Tensor) -> bool:
    """Whether ``layer``'s input is quantized by a kernel of its producer: a row-wise float8 layer,
    on CUDA (the blocks ask only where their q/k/v kernels run, so Triton is there)."""
    return isinstance(layer, Float8RowwiseLinear) and x.is_cuda


def norm_rows_reference(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """The rows ``kernels.norm_rows_float8`` quantizes, as the blocks compute them under autocast:
    the layer norm in float32, ``(1 + scale) * y + shift``, rounded to bf16 for the float8 layer."""
    y = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=1e-6)
    return ((1 + scale) * y + shift).to(torch.bfloat16)
