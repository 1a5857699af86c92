"""Preview mode: the LoRA rendered the way ai-toolkit's training sampler showed it.

docs/sampling.md ("How ai-toolkit itself samples during training") gives each fact and its source.
The fused default merges the LoRAs and quantizes with torchao, as the reference service does; a
training sample differs in two ways, which this module reproduces:

- optimum-quanto 0.2.4 ``qfloat8`` on every ``nn.Linear`` of the transformer and of T5 (embeddings
  and norms stay in the model dtype). Per output row ``scale = amax(|W|) / 448`` and
  ``data = e4m3(clamp(W / scale, ±448))``, both in the weight's dtype with the torch ops quanto
  uses (so the device rounds them as it rounds quanto's); forward ``x.to(scale.dtype)``,
  ``W' = scale * data.to(scale.dtype)``, ``matmul(x, W'.T)``, then ``+ bias``. A row of zeros is
  0 / 0 = NaN there, as in quanto (``PreviewParts`` refuses such a base up front).
- LoRAs are never merged: each LoRA'd Linear computes
  ``org(x) + (up(down(x.float())) * scale * multiplier).to(org(x).dtype)`` with float32 factors
  (``LoraLinear``); a split projection (diffusers names) adds to its rows of the fused output;
  several LoRAs add one after another.

What is kept: the quantized base (built once from the resident base weights, cached like a variant
under the quantization ``qfloat8-preview``), the quanto T5 (``load_text_encoder``, on the first
preview request), the float32 LoRA factors of the last stack on the device. A render wraps the
LoRA'd layers of the base (or of its working copy) in ``LoraLinear`` inside a shallow copy of the
module tree (``with_loras``): no base weight is copied, and a new multiplier or LoRA builds nothing.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.errors import InvalidLora, InvalidRequest
from worker.chroma_model import ChromaTransformer
from worker.components import TextEncoder
from worker.lora import ParsedLora
from worker.variants import PREVIEW_QUANTIZATION, BaseWeights, module_bytes

__all__ = ["PREVIEW_QUANTIZATION"]

log = logging.getLogger(__name__)

QFLOAT8_MAX = 448.0  # quanto's qfloat8 qmax: torch.finfo(torch.float8_e4m3fn).max


# -- optimum-quanto 0.2.4 qfloat8 ----------------------------------------------------------------


def qfloat8_scale(weight: Tensor) -> Tensor:
    """quanto's absmax scale: per output row ``amax(|W|) / 448`` in W's dtype, shape (out, 1); a
    one-row weight is quantized per tensor (a 0-dim scale), as quanto does."""
    magnitude = torch.abs(weight)
    if weight.shape[0] == 1:
        return torch.max(magnitude) / QFLOAT8_MAX
    return torch.amax(magnitude, dim=list(range(1, weight.ndim)), keepdim=True) / QFLOAT8_MAX


def qfloat8_data(weight: Tensor, scale: Tensor) -> Tensor:
    """quanto's ``quantize_symmetric`` for a float qtype: ``W / scale`` in W's dtype (one rounding),
    clamped to ±448, cast to e4m3fn (round to nearest even)."""
    return torch.clamp(weight / scale, min=-QFLOAT8_MAX, max=QFLOAT8_MAX).to(torch.float8_e4m3fn)


class QFloat8Linear(nn.Module):
    """An ``nn.Linear`` as quanto 0.2.4's frozen ``QLinear`` with qfloat8 weights computes it."""

    bias_after_matmul = True  # worker.chroma_model.product may leave the bias to a fused consumer

    def __init__(self, data: Tensor, scale: Tensor, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = data.shape
        self.register_buffer("data", data)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def quantize(cls, linear: nn.Linear, device: torch.device | None = None) -> QFloat8Linear:
        """Quantize ``linear``'s weight on ``device`` (its own by default) in the weight's dtype."""
        weight = linear.weight.detach().to(device or linear.weight.device)
        scale = qfloat8_scale(weight)
        bias = None if linear.bias is None else linear.bias.detach().to(weight.device)
        return cls(qfloat8_data(weight, scale), scale, bias)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (quanto's ``dequantize()``); code that reads ``.weight.dtype``
        sees the scale's dtype, as it does with quanto."""
        return self.scale * self.data.to(self.scale.dtype)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.matmul(x.to(self.scale.dtype), self.weight.t())
        return out if self.bias is None else out + self.bias


class DequantizedQFloat8Linear(nn.Module):
    """The working copy of a ``QFloat8Linear``: ``scale * data`` computed once and kept, the same
    matmul, the bias added after it (the same arithmetic: bit-identical eagerly)."""

    bias_after_matmul = True  # worker.chroma_model.product may leave the bias to a fused consumer

    def __init__(self, layer: QFloat8Linear):
        super().__init__()
        self.out_features, self.in_features = layer.out_features, layer.in_features
        self.register_buffer("weight", layer.weight)
        self.register_buffer("bias", layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.matmul(x.to(self.weight.dtype), self.weight.t())
        return out if self.bias is None else out + self.bias


def quantize_linears(module: nn.Module, device: torch.device | None = None) -> tuple[nn.Module, list[str]]:
    """``module`` with every ``nn.Linear`` in it (itself included) replaced by its ``QFloat8Linear``
    (in place below the top), and the names of the layers with an all-zero weight row (quanto
    makes them NaN)."""
    zero: list[tuple[str, Tensor]] = []
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Linear):
            layer = QFloat8Linear.quantize(child, device)
            zero.append((name, (layer.scale == 0).any()))
            if not name:
                module = layer
                break
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent), attr, layer)
    flags = torch.stack([flag for _, flag in zero]).cpu().tolist() if zero else []  # one sync
    return module, [name for (name, _), flag in zip(zero, flags, strict=True) if flag]


def build_base(base: BaseWeights, device: torch.device) -> tuple[ChromaTransformer, list[str]]:
    """The preview's transformer: the base weights, every Linear qfloat8 (quantized on ``device``,
    part by part); and the layers with an all-zero weight row."""
    zero: list[str] = []

    def quantize(part: str, module: nn.Module) -> nn.Module:
        module, rows = quantize_linears(module)
        zero.extend(f"{part}.{name}".rstrip(".") for name in rows)
        return module

    return base.build_with(quantize, [], device), zero


def load_text_encoder(path: Path, dtype: torch.dtype, device: torch.device):
    """T5 as ai-toolkit samples with it: in ``dtype`` throughout (its ``.to(device, dtype)`` casts
    ``wo`` too, which transformers keeps in float32 on load for float16), every Linear qfloat8,
    quantized on ``device``. Returns (model, names of layers with an all-zero row)."""
    from transformers import T5EncoderModel

    model = T5EncoderModel.from_pretrained(str(path), torch_dtype=dtype).to(dtype)
    model, zero = quantize_linears(model, device)  # one weight on the device at a time
    return model.to(device).eval().requires_grad_(False), zero


def working_copy(model: ChromaTransformer) -> ChromaTransformer:
    """``model`` with every ``QFloat8Linear`` dequantized once (``DequantizedQFloat8Linear``);
    everything else shared."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QFloat8Linear)}
    return replace_modules(model, {name: DequantizedQFloat8Linear(m) for name, m in layers.items()})


class PreviewParts:
    """What preview mode keeps beside the variant cache: the quanto T5 (loaded on first use), the
    float32 LoRA factors of the last stack, and why this base cannot render a preview, if it cannot."""

    def __init__(self, device: torch.device, dtype: torch.dtype, texts_kept: int = 16):
        self.device, self.dtype, self.texts_kept = device, dtype, texts_kept
        self.factors = LoraFactors(device)
        self.texts: TextEncoder | None = None
        self.refused: str | None = None

    def build_base(self, base: BaseWeights) -> ChromaTransformer:
        self._check()
        model, zero_rows = build_base(base, self.device)
        self._refuse(zero_rows)
        return model

    def text_encoder(self, path: Path, tokenizer) -> tuple[TextEncoder, int]:
        """(the preview's T5 with its embedding cache, the device bytes it took if it loaded now)."""
        self._check()
        if self.texts is not None:
            return self.texts, 0
        model, zero_rows = load_text_encoder(path, self.dtype, self.device)
        self._refuse(zero_rows)
        self.texts = TextEncoder(tokenizer, model, self.dtype, self.texts_kept)
        nbytes = module_bytes(model)
        log.info("preview text encoder loaded: %.1f MB on %s", nbytes / 2**20, self.device)
        return self.texts, nbytes

    def attach(self, stack: list[tuple[str, ParsedLora, float]]) -> dict[str, list[LoraAdapter]]:
        return self.factors.attach(stack)

    def _check(self) -> None:
        if self.refused:
            raise InvalidRequest(self.refused, field="preview")

    def _refuse(self, zero_rows: list[str]) -> None:
        if zero_rows:
            shown = ", ".join(zero_rows[:3]) + (
                f" and {len(zero_rows) - 3} more" if len(zero_rows) > 3 else ""
            )
            self.refused = (
                f"the base weights have an all-zero row in {shown}: ai-toolkit's qfloat8 divides it by a "
                "zero scale (NaN), so its training samples could not be rendered from this base either; "
                "send the request without preview"
            )
            self._check()


# -- LoRA layers, unmerged ------------------------------------------------------------------------


class LoraAdapter(nn.Module):
    """One LoRA layer as ai-toolkit holds it while sampling: float32 factors, ``scale`` (alpha /
    rank, 1 for its own files) and the multiplier as float32 tensors; it adds to output rows
    [start, stop) of its Linear (all of them for ai-toolkit's own files)."""

    def __init__(self, down: Tensor, up: Tensor, scale: Tensor, multiplier: Tensor, start: int, stop: int):
        super().__init__()
        self.register_buffer("down", down)
        self.register_buffer("up", up)
        self.register_buffer("scale", scale)
        self.register_buffer("multiplier", multiplier)
        self.start, self.stop = start, stop


class LoraLinear(nn.Module):
    """A Linear with LoRA layers beside it: ai-toolkit's forward (``ToolkitModuleMixin.forward``)."""

    def __init__(self, base: nn.Module, adapters: list[LoraAdapter]):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleList(adapters)
        self.out_features, self.in_features = base.out_features, base.in_features

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        for lora in self.adapters:
            lx = F.linear(F.linear(x.to(torch.float32), lora.down), lora.up)
            lx = lx * lora.scale
            lx = lx * lora.multiplier
            if lora.stop - lora.start == self.out_features:
                out = out + lx.to(out.dtype)
            else:  # a split projection: its rows of the fused output
                out[..., lora.start : lora.stop] += lx.to(out.dtype)
        return out


# A LoRA's layers on the device: (target Linear, rows start, rows stop, down, up, scale) in float32.
DeviceLayers = list[tuple[str, int, int, Tensor, Tensor, Tensor]]


class LoraFactors:
    """The float32 factors of the LoRAs last attached, on the device, by content hash: the same
    LoRA at a new multiplier copies nothing."""

    def __init__(self, device: torch.device):
        self.device = device
        self._kept: dict[str, DeviceLayers] = {}

    def attach(self, stack: list[tuple[str, ParsedLora, float]]) -> dict[str, list[LoraAdapter]]:
        """Target Linear -> its LoRA layers, in stack order, for ``with_loras``. A multiplier of 0
        attaches nothing (ai-toolkit skips the LoRA path). Factors that are not finite in float32
        (float64 values beyond its range) are an ``InvalidLora`` naming the keys."""
        kept = {sha: self._kept.get(sha) or self._to_device(parsed) for sha, parsed, _ in stack}
        self._kept = kept
        attached: dict[str, list[LoraAdapter]] = {}
        for sha, _, multiplier in stack:
            if multiplier == 0:
                continue
            factor = torch.tensor([multiplier], dtype=torch.float32, device=self.device)
            for target, start, stop, down, up, scale in kept[sha]:
                adapter = LoraAdapter(down, up, scale, factor, start, stop)
                attached.setdefault(target, []).append(adapter)
        return attached

    def _to_device(self, parsed: ParsedLora) -> DeviceLayers:
        layers, finite = [], []
        for layer in parsed.layers:
            down = layer.down.to(self.device, torch.float32)
            up = layer.up.to(self.device, torch.float32)
            scale = torch.tensor(layer.scale, dtype=torch.float32, device=self.device)
            layers.append((layer.target, layer.start, layer.stop, down, up, scale))
            finite.append(torch.isfinite(down).all() & torch.isfinite(up).all() & torch.isfinite(scale))
        if layers:
            ok = torch.stack(finite).cpu()  # one sync per file
            if not bool(ok.all()):
                layer = parsed.layers[int((~ok).nonzero()[0])]
                raise InvalidLora(
                    f"keys {', '.join(repr(k) for k in layer.keys)} hold values (or an alpha) beyond "
                    "float32's range, in which ai-toolkit computes a LoRA; save it in float16 or float32",
                    field=parsed.field,
                )
        return layers


def with_loras(model: nn.Module, attached: dict[str, list[LoraAdapter]]) -> nn.Module:
    """``model`` with each LoRA'd Linear wrapped in ``LoraLinear``; ``model`` itself is unchanged."""
    if not attached:
        return model
    return replace_modules(
        model, {name: LoraLinear(model.get_submodule(name), adapters) for name, adapters in attached.items()}
    )


def replace_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A copy of ``model`` with the named submodules replaced. Only the modules on the way to a
    replacement are copied, and shallowly: every parameter and buffer is shared."""
    on_path = {""}
    for name in replacements:
        parts = name.split(".")
        on_path.update(".".join(parts[:i]) for i in range(1, len(parts)))

    def rebuild(module: nn.Module, name: str) -> nn.Module:
        if name in replacements:
            return replacements[name]
        if name not in on_path:
            return module
        clone = copy.copy(module)
        clone._parameters, clone._buffers = dict(module._parameters), dict(module._buffers)
        clone._modules = {
            child: rebuild(sub, f"{name}.{child}" if name else child)
            for child, sub in module._modules.items()
        }
        return clone

    return rebuild(model, "")
