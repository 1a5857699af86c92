"""Fused variants: base weights + LoRA deltas, merged, then quantized; cached least-recently-used.

The base transformer weights stay resident in (pinned) host memory, so a new (LoRA, multiplier)
variant is built part by part (each double/single block, then the small outer layers): copy the
part's base weights to the device, add the LoRA deltas that land in it, load them into a module
built on the meta device (no initialisation, no checkpoint read), quantize. Only one part is ever
held in the compute dtype, so the transient memory is one block (~0.45 GB), not a second
unquantized transformer. T5, tokenizer and VAE are not here: they do not depend on the LoRA.

Working copy: float8 weight-only means every forward dequantizes each weight to the compute dtype
and multiplies in that dtype. ``working_copy`` does that dequantization once, for the variant
being rendered, and keeps the result: the same weights, the same matmul, the bias added after it
as torchao does: the same arithmetic, minus one read of the float8 data and one write of the
dequantized weight per Linear per step. Run eagerly the output is bit-identical; compiled, inductor
may lay the weight out differently and cuBLAS pick another kernel, a bf16 rounding difference
(8.7e-3 relative at full size, the size of the bf16 noise floor there). The cache keeps holding
float8 variants; only the active one has a working copy (the dequantized weights, ~17.8 GB at full
size in bf16).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tasks.settings import Quantization
from worker.chroma_model import CastInputLinear, ChromaConfig, ChromaTransformer
from worker.components import quantize_transformer_part
from worker.lora import LoraLayer, ParsedLora, merge_into
from worker.rowwise import Float8RowwiseLinear, reproduces

log = logging.getLogger(__name__)


# The quantization of preview mode's base (worker.preview): quanto qfloat8, no LoRA merged.
PREVIEW_QUANTIZATION = "qfloat8-preview"


@dataclass(frozen=True)
class VariantKey:
    base: str  # transformer fingerprint
    quantization: str
    dtype: str
    loras: tuple[tuple[str, float], ...]  # ordered (LoRA sha256, multiplier)


@dataclass
class Variant:
    key: VariantKey
    model: ChromaTransformer
    nbytes: int
    build_seconds: float
    layers_merged: list[int] = field(default_factory=list)
    # Preview mode: LoRA layers applied unmerged at render time (target Linear -> its layers).
    attached: dict[str, list] = field(default_factory=dict)

    @property
    def preview(self) -> bool:
        """Whether this renders as ai-toolkit's training preview (worker.preview)."""
        return self.key.quantization == PREVIEW_QUANTIZATION


class BaseWeights:
    """The base transformer under original names, resident on the host in the compute dtype.

    With ``pin``, ``start_pinning`` moves each weight to page-locked memory in a background thread
    (``pinned`` is set when all have), so a new variant's copies to the device run at full speed.
    Until then a build reads the weights where they are (the checkpoint's mapped pages): the worker
    does not wait for the 15-20 s that page-locking 17.8 GB takes before it serves. A weight is
    replaced whole, under the GIL, so a build never sees half of one.
    """

    def __init__(self, cfg: ChromaConfig, state: dict[str, Tensor], dtype: torch.dtype, pin: bool):
        self.cfg = cfg
        self.state = {name: tensor.to(dtype).contiguous() for name, tensor in state.items()}
        self.pinned = threading.Event()
        self.pin_seconds = 0.0
        self._pinning: threading.Thread | None = None
        if not pin:
            self.pinned.set()

    def start_pinning(self) -> None:
        """Page-lock the weights in a background thread (once; nothing to do without ``pin``)."""
        if self.pinned.is_set() or self._pinning is not None:
            return
        self._pinning = threading.Thread(target=self._pin_all, name="pin-base-weights", daemon=True)
        self._pinning.start()

    def _pin_all(self) -> None:
        start = time.perf_counter()
        try:
            for name in list(self.state):
                self.state[name] = self.state[name].pin_memory()
        except RuntimeError as exc:  # no room to page-lock: builds copy from pageable memory
            log.warning("base weights stay in pageable memory: %s", exc)
        self.pin_seconds = time.perf_counter() - start
        self.pinned.set()
        log.info("base weights pinned in %.1f s", self.pin_seconds)

    def build(
        self, loras: list[tuple[ParsedLora, float]], quantization: Quantization | str, device: torch.device
    ) -> ChromaTransformer:
        def quantize(part: str, module: torch.nn.Module) -> None:
            quantize_transformer_part(part, module, quantization)

        return self.build_with(quantize, loras, device)

    def build_with(
        self,
        quantize: Callable[[str, torch.nn.Module], torch.nn.Module | None],
        loras: list[tuple[ParsedLora, float]],
        device: torch.device,
    ) -> ChromaTransformer:
        """The base with ``loras`` merged, each part quantized by ``quantize(part name, module)``,
        in place, or replaced by the module it returns."""
        with torch.device("meta"):
            model = ChromaTransformer(self.cfg)
        for part, module in _parts(model):
            prefix = part + "."
            weights = {
                name: tensor.to(device, non_blocking=True, copy=True)
                for name, tensor in self.state.items()
                if name.startswith(prefix)
            }
            merge_into(weights, [(_only(parsed, prefix), mult) for parsed, mult in loras])
            module.load_state_dict(
                {name[len(prefix) :]: t for name, t in weights.items()}, strict=True, assign=True
            )
            del weights
            replacement = quantize(part, module)
            if replacement is not None and replacement is not module:
                parent, _, attr = part.rpartition(".")
                setattr(model.get_submodule(parent), attr, replacement)
        model.mod_index = torch.arange(self.cfg.num_modulations, device=device)
        return model.eval().requires_grad_(False)


def _parts(model: ChromaTransformer) -> list[tuple[str, torch.nn.Module]]:
    """Each block, then each outer layer: the units a variant is built (and quantized) in."""
    parts = []
    for name, child in model.named_children():
        if isinstance(child, torch.nn.ModuleList):
            parts += [(f"{name}.{i}", block) for i, block in enumerate(child)]
        else:
            parts.append((name, child))
    return parts


def _only(parsed: ParsedLora, prefix: str) -> ParsedLora:
    layers: tuple[LoraLayer, ...] = tuple(
        layer for layer in parsed.layers if f"{layer.target}.".startswith(prefix)
    )
    return ParsedLora(layers, parsed.field)


class DequantizedLinear(torch.nn.Linear):
    """A float8 weight-only Linear with its weight dequantized once: torchao's arithmetic.

    torchao computes ``matmul(x, dequantize(W).t())`` and adds the bias afterwards (two bf16
    roundings), not ``F.linear``'s fused bias; this keeps that order so the output is the same.
    """

    bias_after_matmul = True  # worker.chroma_model.product leaves the bias to a fused consumer

    def forward(self, x: Tensor) -> Tensor:
        out = torch.matmul(x, self.weight.t())
        return out if self.bias is None else out + self.bias


def is_weight_only_float8(tensor: Tensor) -> bool:
    """A torchao Float8Tensor whose activations stay unquantized (float8 weight-only)."""
    return hasattr(tensor, "qdata") and getattr(tensor, "act_quant_kwargs", True) is None


def is_rowwise_float8(tensor: Tensor) -> bool:
    """A torchao Float8Tensor whose activations are quantized too ("float8-fast")."""
    return hasattr(tensor, "qdata") and getattr(tensor, "act_quant_kwargs", None) is not None


def working_copy(model: ChromaTransformer) -> ChromaTransformer:
    """``model`` with every float8 weight-only weight dequantized once (see the module docstring).

    Everything else (biases, norms, float8 weights whose activations are quantized too) is shared,
    not copied. Layers become ``DequantizedLinear``; float8-fast's row-wise layers become
    ``rowwise.Float8RowwiseLinear`` on the same data (the same arithmetic, the weights as plain
    tensors). A model with neither comes back unchanged.
    """
    if not any(is_weight_only_float8(p) or is_rowwise_float8(p) for p in model.parameters()):
        return model
    with torch.device("meta"):
        copy = ChromaTransformer(model.cfg)
    source = dict(model.named_modules())
    for name, module in copy.named_modules():
        original = source[name]
        for pname, param in original.named_parameters(recurse=False):
            if is_weight_only_float8(param):
                assert isinstance(original, torch.nn.Linear) and pname == "weight", name
                param = torch.nn.Parameter(param.dequantize(), requires_grad=False)
                module.__class__ = DequantizedLinear
            setattr(module, pname, param)
        for bname, buffer in original.named_buffers(recurse=False):
            setattr(module, bname, buffer)
        if isinstance(original, CastInputLinear) and module.__class__ is not DequantizedLinear:
            module.__class__ = CastInputLinear  # a float8-activation layer
    for name, module in list(copy.named_modules()):
        weight = getattr(module, "weight", None)
        if isinstance(module, CastInputLinear) and is_rowwise_float8(weight) and reproduces(weight):
            parent, _, attr = name.rpartition(".")
            setattr(copy.get_submodule(parent), attr, Float8RowwiseLinear.from_float8(weight, module.bias))
    return copy.eval().requires_grad_(False)


class ActiveCopy:
    """The working copy of the variant being rendered: one at a time, so switching variants never
    holds two (the previous one is dropped before the next is made)."""

    def __init__(self) -> None:
        self._held: tuple[VariantKey, torch.nn.Module] | None = None

    @property
    def key(self) -> VariantKey | None:
        return None if self._held is None else self._held[0]

    def drop(self) -> None:
        self._held = None

    def get(
        self,
        variant: Variant,
        make: Callable[[ChromaTransformer], torch.nn.Module],
        release: Callable[[], None],
    ) -> torch.nn.Module:
        """``variant``'s working copy, made by ``make`` unless held; the variant's own model when
        the copy does not fit (``release`` then frees what the attempt left)."""
        if self._held is not None and self._held[0] == variant.key:
            return self._held[1]
        self._held = None
        try:
            copy = make(variant.model)
        except torch.OutOfMemoryError:
            copy = None  # leave the except block before freeing: its traceback holds the partial copy
        if copy is None:
            log.warning("no room for the working copy; this render dequantizes per forward")
            release()
            return variant.model
        self._held = (variant.key, copy)
        return copy


def module_bytes(model: torch.nn.Module) -> int:
    """Device bytes held by a module's weights (quantized tensors count their packed data)."""
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        inner = [getattr(tensor, name) for name in ("qdata", "scale") if hasattr(tensor, name)]
        total += (
            sum(t.numel() * t.element_size() for t in inner)
            if inner
            else tensor.numel() * tensor.element_size()
        )
    return total


class VariantCache:
    """Least-recently-used fused variants within a byte budget (the newest always stays)."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._variants: OrderedDict[VariantKey, Variant] = OrderedDict()
        self.evictions = 0

    def __contains__(self, key: VariantKey) -> bool:
        return key in self._variants

    def __len__(self) -> int:
        return len(self._variants)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self._variants.values())

    def get(self, key: VariantKey) -> Variant | None:
        variant = self._variants.get(key)
        if variant is not None:
            self._variants.move_to_end(key)
        return variant

    def describe(self, variant: Variant, hit: bool) -> dict:
        """What result.json says of the variant that rendered (``tasks.results.VariantResult``)."""
        key = variant.key
        return {
            "cache_hit": hit,
            "build_seconds": round(variant.build_seconds, 4),
            "variants_cached": len(self),
            "cache_bytes": self.nbytes,
            "evictions": self.evictions,
            "key": {
                "base": key.base,
                "quantization": key.quantization,
                "dtype": key.dtype,
                "loras": [list(item) for item in key.loras],
            },
        }

    def make_room(self, incoming_bytes: int) -> None:
        """Evict least-recently-used variants so ``incoming_bytes`` more fits the budget."""
        self._evict(lambda: self.nbytes + incoming_bytes <= self.budget_bytes)

    def put(self, variant: Variant) -> None:
        self._variants[variant.key] = variant
        self._variants.move_to_end(variant.key)
        self._evict(lambda: self.nbytes <= self.budget_bytes, keep=variant.key)

    def clear(self) -> None:
        self._variants.clear()

    def keep_only(self, key: VariantKey) -> int:
        """Evict every variant but ``key``; returns how many went."""
        return self._evict(lambda: False, keep=key)

    def _evict(self, done, keep: VariantKey | None = None) -> int:
        """Evict least recently used first (never ``keep``) until ``done()``; returns how many went."""
        count = 0
        for key in [k for k in self._variants if k != keep]:
            if done():
                break
            nbytes = self._variants.pop(key).nbytes
            count += 1
            log.info("evicting variant %s (%.1f MB)", _short(key), nbytes / 2**20)
        self.evictions += count
        return count


def timed_build(
    base: BaseWeights,
    key: VariantKey,
    loras: list[tuple[ParsedLora, float]],
    device: torch.device,
) -> Variant:
    layers = [p.num_layers for p, _ in loras]
    return timed(key, device, lambda: base.build(loras, key.quantization, device), layers)


def timed(
    key: VariantKey, device: torch.device, build: Callable[[], ChromaTransformer], layers: list[int]
) -> Variant:
    """``build()`` as the variant ``key``, with its build time and device bytes."""
    start = time.perf_counter()
    model = build()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return Variant(key, model, module_bytes(model), seconds, layers)


def _short(key: VariantKey) -> str:
    loras = ",".join(f"{sha[:8]}x{mult:g}" for sha, mult in key.loras) or "base"
    return f"{key.base[:8]}/{key.quantization}/{loras}"
