"""LoRA files: parse, check against the model, and merge into the base weights.

Accepted layouts (all safetensors; nothing pickled is ever read):

- ai-toolkit / PEFT with the checkpoint's names:
  ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` + ``lora_B`` (+ optional ``alpha``);
- diffusers names: ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` (or ``lora.down``/
  ``lora.up``), where a split projection lands on its row block of the fused weight;
- kohya: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` + ``lora_up`` + ``alpha``.

Merge: ``W[rows] += multiplier * (alpha / rank) * (B @ A)`` in the weight dtype (the reference's
order and rounding; float32 weights give the float32 sum), alpha = rank when absent. Each LoRA of a
stack adds its own delta. A file whose keys match nothing, match only partly, have wrong shapes,
rank 0, alpha 0, non-floating-point or non-finite values, or hold another adapter type, is an
``InvalidLora`` naming the keys: never a silent no-op and never an untranslated exception.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from tasks.errors import InvalidLora
from tasks.request_text import quoted
from worker.checkpoint import RowBlock, linear_map
from worker.chroma_model import ChromaConfig

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
_SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_A.default.weight": "down",  # PEFT with its adapter name
    ".lora_B.default.weight": "up",
    ".alpha": "alpha",
}
_OTHER_ADAPTERS = re.compile(
    r"(lokr_w|hada_w|hada_t|oft_|\.diff$|\.diff_b$|dora_scale|lora_magnitude|\.magnitude|glora_|"
    r"lora_A\.bias|lora_B\.bias|lora_up\.bias|lora_down\.bias|\.w_norm|\.b_norm)"
)
_TEXT_ENCODER = re.compile(r"^(lora_te\d?_|text_encoder|lora_te_)")
# What a LoRA matrix may hold: float8/float4 or complex tensors cannot be checked or multiplied.
# A LoRA's change to a layer, as a multiple of the layer's own weights (Frobenius norms): trained
# LoRAs change them by a fraction; a hundred times is an alpha or values gone wrong.
MAX_DELTA_RATIO = 100.0
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ALPHA_DTYPES = _WEIGHT_DTYPES + (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass(frozen=True)
class LoraLayer:
    """One low-rank update: rows [start, stop) of ``target`` += scale * up @ down."""

    target: str
    start: int
    stop: int
    down: Tensor  # (rank, in)
    up: Tensor  # (stop - start, rank)
    scale: float  # alpha / rank
    keys: tuple[str, ...]


@dataclass(frozen=True)
class ParsedLora:
    layers: tuple[LoraLayer, ...]
    field: str = "loras"  # the request field that named the file, for errors

    @property
    def num_layers(self) -> int:
        return len(self.layers)


@functools.cache
def module_table(cfg: ChromaConfig) -> dict[str, RowBlock]:
    """Every name a LoRA may use for a Linear (original, diffusers, kohya) -> its row block.

    Cached per architecture: callers must not change the table."""
    diffusers = linear_map(cfg)
    rows: dict[str, RowBlock] = {}
    for block in diffusers.values():
        if block.target not in rows or block.stop > rows[block.target].stop:
            rows[block.target] = block
    table = {target: RowBlock(target, 0, block.stop, block.in_features) for target, block in rows.items()}
    table.update(diffusers)
    for name, block in list(table.items()):
        table.setdefault(name.replace(".", "_"), block)
    return table


def parse_lora(path: Path, cfg: ChromaConfig, *, field: str = "lora") -> ParsedLora:
    """Read and check a LoRA file against the model; every problem is an InvalidLora naming keys."""
    tensors = _read(path, field)
    if not tensors:
        raise InvalidLora("the file holds no tensors; upload a LoRA saved by ai-toolkit", field=field)
    foreign = sorted(k for k in tensors if _OTHER_ADAPTERS.search(k))
    if foreign:
        raise InvalidLora(
            f"unsupported adapter type (LoKr/LoHa/DoRA/OFT/full diff or LoRA biases) in keys "
            f"{_few(foreign)}; only plain LoRA (lora_A/lora_B, lora_down/lora_up) can be fused",
            field=field,
        )
    text = sorted(k for k in tensors if _TEXT_ENCODER.match(k))
    if text:
        raise InvalidLora(
            f"text-encoder LoRA keys {_few(text)} are not supported; train the transformer only", field=field
        )

    table = module_table(cfg)
    groups: dict[str, dict[str, str]] = {}
    unmatched: list[str] = []
    for key in tensors:
        module, kind = _split_key(key)
        if module is None:
            unmatched.append(key)
            continue
        if module not in table:
            unmatched.append(key)
            continue
        slot = groups.setdefault(module, {})
        if kind in slot:
            raise InvalidLora(
                f"keys {quoted(slot[kind])} and {quoted(key)} name the same weight", field=field
            )
        slot[kind] = key
    if not groups:
        raise InvalidLora(
            f"none of its {len(tensors)} keys names a Chroma transformer layer "
            f"(e.g. {_few(sorted(tensors))}); is it a LoRA for another model?",
            field=field,
        )
    if unmatched:
        raise InvalidLora(
            f"{len(unmatched)} of {len(tensors)} keys match no Chroma transformer layer: "
            f"{_few(sorted(unmatched))}",
            field=field,
        )

    layers = [_layer(module, keys, tensors, table[module], field) for module, keys in sorted(groups.items())]
    _check_overlaps(layers, field)
    return ParsedLora(tuple(layers), field)


def merge_into(weights: dict[str, Tensor], loras: list[tuple[ParsedLora, float]]) -> None:
    """Add every LoRA delta to ``weights`` (original names, any device) in place.

    The order of operations is the reference's, in the weight dtype: ``delta = B @ A``, then
    ``W + delta * (alpha / rank * multiplier)``; float32 weights give the exact sum. A merge whose
    result is not finite (factors or an alpha that overflow the weight dtype), or whose change is
    more than ``MAX_DELTA_RATIO`` times the rows it changes (finite, yet the model would render
    one flat image whatever the prompt), is an ``InvalidLora`` naming the keys. The checks cost
    one device sync per call, not one per layer.
    """
    merged: list[tuple[Tensor, LoraLayer, ParsedLora, float]] = []
    for parsed, multiplier in loras:
        if multiplier == 0:  # exactly the base weights, even where a delta would overflow the dtype
            continue
        for layer in parsed.layers:
            weight = weights[f"{layer.target}.weight"]
            rows = weight[layer.start : layer.stop]
            up = layer.up.to(rows.device, rows.dtype)
            down = layer.down.to(rows.device, rows.dtype)
            base = torch.linalg.vector_norm(rows, dtype=torch.float32)
            delta = (up @ down) * (layer.scale * multiplier)
            rows.copy_(rows + delta)
            # (finite, size of the change, size of the rows): read for every layer at once below
            check = torch.stack(
                [
                    torch.isfinite(rows).all().float(),
                    torch.linalg.vector_norm(delta, dtype=torch.float32),
                    base,
                ]
            )
            merged.append((check, layer, parsed, multiplier))
            del delta  # before the next layer's product
    if not merged:
        return
    finite, changed, own = torch.stack([check for check, *_ in merged]).cpu().unbind(1)
    finite = finite == 1
    if not bool(finite.all()):
        _, layer, parsed, multiplier = merged[int((~finite).nonzero()[0])]
        raise InvalidLora(
            f"merging keys {_few(list(layer.keys))} at multiplier {multiplier:g} gives NaN or infinite "
            f"weights in {quoted(layer.target)}: its values (or its alpha) are far outside a LoRA's usual "
            "scale; re-export the LoRA or lower network_multiplier",
            field=parsed.field,
        )
    too_big = ~(changed <= MAX_DELTA_RATIO * own)  # rows of zeros may stay zeros, nothing more
    if bool(too_big.any()):
        index = int(too_big.nonzero()[0])
        _, layer, parsed, multiplier = merged[index]
        ratio = float(changed[index] / own[index]) if own[index] > 0 else float("inf")
        raise InvalidLora(
            f"merging keys {_few(list(layer.keys))} at multiplier {multiplier:g} changes "
            f"{quoted(layer.target)} by {ratio:.3g} times its own weights (a LoRA changes "
            f"them by a fraction; more than {MAX_DELTA_RATIO:g} times renders one flat image whatever the "
            "prompt): its values (or its alpha) are far outside a LoRA's usual scale; re-export the LoRA "
            "or lower network_multiplier",
            field=parsed.field,
        )


def _read(path: Path, field: str) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a mapping)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InvalidLora(
            f"not a readable safetensors file ({quoted(str(exc), 300)}); upload the .safetensors file",
            field=field,
        ) from exc


def _split_key(key: str) -> tuple[str | None, str]:
    suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
    if suffix is None:
        return None, ""
    module, kind = key[: -len(suffix)], _SUFFIXES[suffix]
    for prefix in _KOHYA_PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix) :], kind
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if module.startswith(prefix):
                module = module[len(prefix) :]
                changed = True
    return module, kind


def _layer(
    module: str, keys: dict[str, str], tensors: dict[str, Tensor], block: RowBlock, field: str
) -> LoraLayer:
    if "down" not in keys or "up" not in keys:
        have = _few(sorted(keys.values()))
        missing = "down (lora_A)" if "down" not in keys else "up (lora_B)"
        raise InvalidLora(f"layer {quoted(module)} lacks its {missing} matrix (has {have})", field=field)
    down, up = tensors[keys["down"]], tensors[keys["up"]]
    names = tuple(sorted(keys.values()))
    for key in names:
        t = tensors[key]
        is_alpha = key == keys.get("alpha")
        if t.dtype not in (_ALPHA_DTYPES if is_alpha else _WEIGHT_DTYPES):
            kinds = "float16, bfloat16, float32 or float64" + (" or an integer" if is_alpha else "")
            raise InvalidLora(
                f"key {quoted(key)} has dtype {str(t.dtype).removeprefix('torch.')}; "
                f"{'an alpha' if is_alpha else 'LoRA weights'} must be {kinds}",
                field=field,
            )
        if not torch.isfinite(t).all():
            raise InvalidLora(
                f"key {quoted(key)} holds NaN or infinite values; the file is corrupt", field=field
            )
    if down.ndim == 4 and down.shape[2:] == (1, 1):
        down = down.flatten(1)
    if up.ndim == 4 and up.shape[2:] == (1, 1):
        up = up.flatten(1)
    rows = block.stop - block.start
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise InvalidLora(
            f"layer {quoted(module)}: shapes {tuple(down.shape)} (down) and {tuple(up.shape)} (up) "
            "do not form a low-rank pair (down: rank x in, up: out x rank)",
            field=field,
        )
    rank = down.shape[0]
    if rank == 0:
        raise InvalidLora(
            f"layer {quoted(module)} has rank 0 (empty {_few(list(names))}); it would change nothing",
            field=field,
        )
    if up.shape[0] != rows or down.shape[1] != block.in_features:
        raise InvalidLora(
            f"layer {quoted(module)}: delta shape {(up.shape[0], down.shape[1])} does not fit the model's "
            f"{(rows, block.in_features)}; the LoRA was trained for a different model size",
            field=field,
        )
    scale = 1.0
    if "alpha" in keys:
        alpha = tensors[keys["alpha"]]
        if alpha.numel() != 1:
            raise InvalidLora(f"key {quoted(keys['alpha'])} must be a scalar alpha", field=field)
        if alpha.item() <= 0:
            raise InvalidLora(
                f"key {quoted(keys['alpha'])} has alpha {alpha.item():g}, which would zero or invert the "
                "layer; save alpha = rank or leave it out",
                field=field,
            )
        scale = float(alpha.float().item()) / rank
    return LoraLayer(block.target, block.start, block.stop, down, up, scale, names)


def _check_overlaps(layers: list[LoraLayer], field: str) -> None:
    seen: dict[str, list[LoraLayer]] = {}
    for layer in layers:
        for other in seen.get(layer.target, []):
            if layer.start < other.stop and other.start < layer.stop:
                raise InvalidLora(
                    f"keys {_few(list(layer.keys))} and {_few(list(other.keys))} update the same rows of "
                    f"{quoted(layer.target)}; a file must name each layer once",
                    field=field,
                )
        seen.setdefault(layer.target, []).append(layer)


def _few(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(quoted(k) for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")
