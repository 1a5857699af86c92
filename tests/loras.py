"""LoRA files for the tiny Chroma, built in code (no binary test data is committed).

``random_lora`` draws one low-rank update per original (checkpoint-named) Linear; the writers save
the same update in the three layouts the engine accepts:

- ai-toolkit: ``diffusion_model.<original module>.lora_A.weight`` / ``lora_B.weight``, fp16, no alpha;
- diffusers / PEFT: ``transformer.<diffusers module>.lora_A.weight``, where a fused ``qkv`` (and a
  single block's ``linear1``) is split into its projections: ``B``'s row blocks, ``A`` repeated;
- kohya: ``lora_unet_<module with underscores>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``.

Values are rounded to fp16 once, so every layout holds exactly the same numbers. ``MALFORMED`` is a
corpus of broken files, each with the fragments its ``InvalidLora`` message must contain.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from worker.checkpoint import linear_map
from worker.chroma_model import ChromaConfig
from worker.engine import LoraInput
from worker.lora import module_table
from worker.tiny import TINY

# Fused projections, a single block's linear1/linear2, MLPs, embedders and the output layer.
MODULES = (
    "txt_in",
    "img_in",
    "double_blocks.0.img_attn.qkv",
    "double_blocks.0.txt_attn.qkv",
    "double_blocks.0.img_attn.proj",
    "double_blocks.0.txt_attn.proj",
    "double_blocks.0.img_mlp.0",
    "double_blocks.0.img_mlp.2",
    "double_blocks.1.img_attn.qkv",
    "double_blocks.1.txt_mlp.0",
    "double_blocks.1.txt_mlp.2",
    "single_blocks.0.linear1",
    "single_blocks.0.linear2",
    "single_blocks.1.linear1",
    "single_blocks.1.linear2",
    "final_layer.linear",
)


@dataclass(frozen=True)
class Pair:
    """``delta = B @ A`` for one original Linear: A (rank, in), B (out, rank), float32 of fp16 values."""

    down: Tensor
    up: Tensor


def random_lora(
    cfg: ChromaConfig = TINY,
    modules: tuple[str, ...] = MODULES,
    rank: int = 4,
    seed: int = 0,
    std: float = 0.25,
) -> dict[str, Pair]:
    """One random pair per module; std 0.25 at rank 4 changes the tiny model's images visibly."""
    generator = torch.Generator().manual_seed(seed)
    table = module_table(cfg)
    pairs = {}
    for module in modules:
        out, inp = table[module].stop, table[module].in_features
        down = (std * torch.randn(rank, inp, generator=generator)).half().float()
        up = (std * torch.randn(out, rank, generator=generator)).half().float()
        pairs[module] = Pair(down, up)
    return pairs


def ai_toolkit_tensors(pairs: dict[str, Pair]) -> dict[str, Tensor]:
    out = {}
    for module, pair in pairs.items():
        out[f"diffusion_model.{module}.lora_A.weight"] = pair.down.half()
        out[f"diffusion_model.{module}.lora_B.weight"] = pair.up.half()
    return out


def diffusers_blocks(cfg: ChromaConfig, module: str) -> list[tuple[str, int, int]]:
    """(diffusers name, start, stop) of every projection that is a row block of ``module``."""
    blocks = [(name, b.start, b.stop) for name, b in linear_map(cfg).items() if b.target == module]
    return sorted(blocks, key=lambda item: item[1])


def diffusers_tensors(pairs: dict[str, Pair], cfg: ChromaConfig = TINY) -> dict[str, Tensor]:
    out = {}
    for module, pair in pairs.items():
        for name, start, stop in diffusers_blocks(cfg, module):
            out[f"transformer.{name}.lora_A.weight"] = pair.down.half()
            out[f"transformer.{name}.lora_B.weight"] = pair.up[start:stop].half().contiguous()
    return out


def kohya_tensors(pairs: dict[str, Pair], alpha: float) -> dict[str, Tensor]:
    """Kohya layout whose merged delta equals ``B @ A``: ``up = B * rank / alpha``.

    Choose ``alpha / rank`` a power of two below one (``up`` grows by an exact power of two; shrinking
    it would round the fp16 subnormals).
    """
    out = {}
    for module, pair in pairs.items():
        rank = pair.down.shape[0]
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.lora_down.weight"] = pair.down.half()
        out[f"{name}.lora_up.weight"] = (pair.up * (rank / alpha)).half()
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    assert all(
        torch.equal(
            out[f"lora_unet_{m.replace('.', '_')}.lora_up.weight"].float() * (alpha / p.down.shape[0]), p.up
        )
        for m, p in pairs.items()
    ), "alpha / rank must be a power of two for an exact kohya copy"
    return out


def write(path: Path, tensors: dict[str, Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path


def write_ai_toolkit(path: Path, pairs: dict[str, Pair]) -> Path:
    return write(path, ai_toolkit_tensors(pairs))


def write_diffusers(path: Path, pairs: dict[str, Pair], cfg: ChromaConfig = TINY) -> Path:
    return write(path, diffusers_tensors(pairs, cfg))


def write_kohya(path: Path, pairs: dict[str, Pair], alpha: float) -> Path:
    return write(path, kohya_tensors(pairs, alpha))


# -- malformed files ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Malformed:
    """A broken LoRA: ``build(path)`` writes it; ``expect`` are fragments its error message names."""

    name: str
    build: Callable[[Path], None]
    expect: tuple[str, ...]


def _raw_header(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _good(changes: dict[str, Tensor | None] | None = None) -> dict[str, Tensor]:
    """A valid two-layer ai-toolkit file (6 keys), with keys replaced (or dropped when None)."""
    tensors = ai_toolkit_tensors(
        random_lora(modules=("double_blocks.0.img_attn.qkv", "single_blocks.0.linear2"))
    )
    for key, value in (changes or {}).items():
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    return tensors


QKV = "diffusion_model.double_blocks.0.img_attn.qkv"
H = TINY.hidden_size


def _file(tensors: Callable[[], dict[str, Tensor]]) -> Callable[[Path], None]:
    return lambda path: write(path, tensors())


def _bytes(data: Callable[[], bytes]) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data())


def _nonfinite(value: float) -> dict[str, Tensor]:
    up = torch.full((3 * H, 4), 0.01, dtype=torch.float16)
    up[5, 1] = value
    return _good() | {f"{QKV}.lora_B.weight": up}


def _truncated() -> bytes:
    data = _serialized(_good())
    return data[: len(data) - 100]


def _serialized(tensors: dict[str, Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def _sdxl() -> dict[str, Tensor]:
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    return {
        f"{name}.lora_down.weight": torch.zeros(4, 320, dtype=torch.float16),
        f"{name}.lora_up.weight": torch.zeros(320, 4, dtype=torch.float16),
        f"{name}.alpha": torch.tensor(4.0),
    }


def _llm() -> dict[str, Tensor]:
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    return {
        f"{name}.lora_A.weight": torch.zeros(8, 4096, dtype=torch.float16),
        f"{name}.lora_B.weight": torch.zeros(4096, 8, dtype=torch.float16),
    }


def _partly() -> dict[str, Tensor]:
    extra = "diffusion_model.double_blocks.7.img_attn.qkv"  # the tiny model has 2 double blocks
    return _good() | {
        f"{extra}.lora_A.weight": torch.zeros(4, H, dtype=torch.float16),
        f"{extra}.lora_B.weight": torch.zeros(3 * H, 4, dtype=torch.float16),
    }


def _lokr() -> dict[str, Tensor]:
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    return {
        f"{name}.lokr_w1": torch.zeros(8, 8, dtype=torch.float16),
        f"{name}.lokr_w2": torch.zeros(24, 8, dtype=torch.float16),
        f"{name}.alpha": torch.tensor(4.0),
    }


def _loha() -> dict[str, Tensor]:
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    return {
        f"{name}.hada_w1_a": torch.zeros(3 * H, 4, dtype=torch.float16),
        f"{name}.hada_w1_b": torch.zeros(4, H, dtype=torch.float16),
        f"{name}.hada_w2_a": torch.zeros(3 * H, 4, dtype=torch.float16),
        f"{name}.hada_w2_b": torch.zeros(4, H, dtype=torch.float16),
    }


def _text_encoder() -> dict[str, Tensor]:
    name = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    return _good() | {
        f"{name}.lora_down.weight": torch.zeros(4, 768, dtype=torch.float16),
        f"{name}.lora_up.weight": torch.zeros(768, 4, dtype=torch.float16),
    }


def _both_names() -> dict[str, Tensor]:
    """The same rows named twice: fused ``qkv`` and its diffusers ``to_q`` row block."""
    name = "transformer.transformer_blocks.0.attn.to_q"
    return _good() | {
        f"{name}.lora_A.weight": torch.zeros(4, H, dtype=torch.float16),
        f"{name}.lora_B.weight": torch.zeros(H, 4, dtype=torch.float16),
    }


MALFORMED: tuple[Malformed, ...] = (
    Malformed("sdxl_keys", _file(_sdxl), ("none of its", "lora_unet_down_blocks_0_attentions_0")),
    Malformed("llm_keys", _file(_llm), ("none of its", "self_attn.q_proj")),
    Malformed("matches_partly", _file(_partly), ("2 of 6 keys", "double_blocks.7.img_attn.qkv")),
    Malformed(
        "rank_mismatch",
        _file(lambda: _good({f"{QKV}.lora_B.weight": torch.zeros(3 * H, 3, dtype=torch.float16)})),
        ("double_blocks.0.img_attn.qkv", "(4, 64)", "(192, 3)", "low-rank pair"),
    ),
    Malformed(
        "out_features_mismatch",
        _file(lambda: _good({f"{QKV}.lora_B.weight": torch.zeros(2 * H, 4, dtype=torch.float16)})),
        ("double_blocks.0.img_attn.qkv", "(128, 64)", "(192, 64)", "different model size"),
    ),
    Malformed(
        "in_features_mismatch",
        _file(lambda: _good({f"{QKV}.lora_A.weight": torch.zeros(4, 48, dtype=torch.float16)})),
        ("double_blocks.0.img_attn.qkv", "(192, 48)", "(192, 64)"),
    ),
    Malformed("nan", _file(lambda: _nonfinite(float("nan"))), (f"{QKV}.lora_B.weight", "NaN")),
    Malformed("inf", _file(lambda: _nonfinite(float("-inf"))), (f"{QKV}.lora_B.weight", "infinite")),
    Malformed("lokr", _file(_lokr), ("LoKr", "lora_unet_double_blocks_0_img_attn_qkv.lokr_w1")),
    Malformed("loha", _file(_loha), ("LoHa", "hada_w1_a")),
    Malformed(
        "dora",
        _file(lambda: _good() | {f"{QKV}.dora_scale": torch.ones(1, H, dtype=torch.float16)}),
        ("DoRA", f"{QKV}.dora_scale"),
    ),
    Malformed(
        "peft_dora_magnitude",
        _file(lambda: _good() | {f"{QKV}.lora_magnitude_vector": torch.ones(3 * H, dtype=torch.float16)}),
        ("DoRA", "lora_magnitude_vector"),
    ),
    Malformed("text_encoder", _file(_text_encoder), ("text-encoder", "lora_te1_text_model_encoder_layers_0")),
    Malformed(
        "missing_lora_B",
        _file(lambda: _good({f"{QKV}.lora_B.weight": None})),
        ("double_blocks.0.img_attn.qkv", "lora_B"),
    ),
    Malformed(
        "missing_lora_A",
        _file(lambda: _good({f"{QKV}.lora_A.weight": None})),
        ("double_blocks.0.img_attn.qkv", "lora_A"),
    ),
    Malformed(
        "integer_dtype",
        _file(lambda: _good({f"{QKV}.lora_A.weight": torch.ones(4, H, dtype=torch.int32)})),
        (f"{QKV}.lora_A.weight", "int32"),
    ),
    Malformed(
        "float8_dtype",
        _file(lambda: _good({f"{QKV}.lora_A.weight": torch.ones(4, H).to(torch.float8_e4m3fn)})),
        (f"{QKV}.lora_A.weight", "float8_e4m3fn"),
    ),
    Malformed(
        "three_dimensional",
        _file(lambda: _good({f"{QKV}.lora_A.weight": torch.zeros(4, H, 2, dtype=torch.float16)})),
        ("double_blocks.0.img_attn.qkv", "low-rank pair"),
    ),
    Malformed(
        "rank_zero",
        _file(
            lambda: _good(
                {
                    f"{QKV}.lora_A.weight": torch.zeros(0, H, dtype=torch.float16),
                    f"{QKV}.lora_B.weight": torch.zeros(3 * H, 0, dtype=torch.float16),
                }
            )
        ),
        ("double_blocks.0.img_attn.qkv", "rank 0"),
    ),
    Malformed(
        "alpha_not_scalar",
        _file(lambda: _good() | {f"{QKV}.alpha": torch.ones(4)}),
        (f"{QKV}.alpha", "scalar"),
    ),
    Malformed(
        "alpha_zero",
        _file(lambda: _good() | {f"{QKV}.alpha": torch.tensor(0.0)}),
        (f"{QKV}.alpha", "alpha 0"),
    ),
    Malformed(
        "alpha_negative",
        _file(lambda: _good() | {f"{QKV}.alpha": torch.tensor(-4.0)}),
        (f"{QKV}.alpha", "alpha -4"),
    ),
    Malformed("same_rows_named_twice", _file(_both_names), ("same rows", "double_blocks.0.img_attn.qkv")),
    Malformed(
        "zero_tensors", _bytes(lambda: _raw_header({"__metadata__": {"format": "pt"}})), ("no tensors",)
    ),
    Malformed("empty_file", _bytes(lambda: b""), ("not a readable safetensors",)),
    Malformed("truncated", _bytes(_truncated), ("not a readable safetensors",)),
    Malformed(
        "pickle_renamed",
        _bytes(lambda: pickle.dumps({f"{QKV}.lora_A.weight": [[0.0] * 4] * 4})),
        ("not a readable safetensors",),
    ),
    Malformed(
        "header_claims_gigabytes",
        _bytes(lambda: struct.pack("<Q", 8 * 2**30) + b'{"a": 1}'),
        ("not a readable safetensors", "header too large"),
    ),
    Malformed(
        "header_longer_than_file",
        _bytes(lambda: struct.pack("<Q", 4096) + b"{}"),
        ("not a readable safetensors",),
    ),
    Malformed(
        "tensor_claims_gigabytes",
        _bytes(
            lambda: _raw_header(
                {
                    f"{QKV}.lora_A.weight": {
                        "dtype": "F32",
                        "shape": [100_000, 100_000],
                        "data_offsets": [0, 4 * 10**10],
                    }
                },
                b"\0" * 64,
            )
        ),
        ("not a readable safetensors",),
    ),
    Malformed(
        "non_json_header", _bytes(lambda: struct.pack("<Q", 12) + b"{not: json!}"), ("not a readable",)
    ),
    Malformed("header_not_object", _bytes(lambda: _raw_header([1, 2, 3])), ("not a readable safetensors",)),
)


def lora_input(path: Path, multiplier: float = 1.0, field: str = "loras") -> LoraInput:
    """A LoRA file as the engine takes it: identified by its content."""
    return LoraInput(path, hashlib.sha256(path.read_bytes()).hexdigest(), multiplier, field)
