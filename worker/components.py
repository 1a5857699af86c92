"""Where components come from and how the LoRA-independent ones load.

A source is a local path, a hub ``org/repo``, a hub folder ``org/repo/subfolder`` or a hub file
``org/repo/file.safetensors``. Hub sources resolve through the local Hugging Face cache and are
downloaded only when missing there (``HF_HUB_OFFLINE=1`` forbids even that), so a node can run
from pre-staged files. T5, its tokenizer and the VAE do not depend on the LoRA: they load once per
worker and every fused variant shares them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.chroma_model import CastInputLinear

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sources:
    transformer: str
    text_encoder: str
    tokenizer: str
    vae: str


def resolve(source: str) -> Path:
    """A local path for ``source``, downloading from the hub only if it is not cached."""
    local = Path(source).expanduser()
    if local.exists():
        return local
    parts = source.strip("/").split("/")
    if len(parts) < 2 or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"component source {source!r} is neither an existing path nor a hub id")
    from huggingface_hub import hf_hub_download, snapshot_download

    repo, rest = "/".join(parts[:2]), "/".join(parts[2:])
    if rest.endswith((".safetensors", ".json")):
        return Path(hf_hub_download(repo_id=repo, filename=rest))
    root = Path(snapshot_download(repo_id=repo, allow_patterns=[f"{rest}/*"] if rest else None))
    return root / rest if rest else root


def fingerprint(path: Path) -> str:
    """Cheap content identity: sha256 over each weight file's safetensors header and size."""
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    files += sorted(path.glob("*.json")) if path.is_dir() else []
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}:".encode())
        with file.open("rb") as f:
            if file.suffix == ".safetensors":
                header_len = int.from_bytes(f.read(8), "little")
                digest.update(f.read(min(header_len, 100 * 2**20)))
            else:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def load_tokenizer(path: Path):  # -> transformers.PreTrainedTokenizerFast
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_text_encoder(path: Path, dtype: torch.dtype, device: torch.device):
    from transformers import T5EncoderModel

    model = T5EncoderModel.from_pretrained(str(path), torch_dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def load_vae(path: Path, dtype: torch.dtype, device: torch.device):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def quantize_float8(module: torch.nn.Module) -> None:
    """torchao float8 weight-only on every Linear: the reference's "float8", in place."""
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    quantize_(module, Float8WeightOnlyConfig())


def quantizes_activations(name: str) -> bool:
    """Whether "float8-fast" quantizes this transformer Linear's activations (original names:
    ``single_blocks.0.linear1``, ``double_blocks.3.img_mlp.0``): every single block and the image
    stream of the double blocks."""
    parts = name.split(".")
    return parts[0] == "single_blocks" or (
        parts[0] == "double_blocks" and len(parts) > 2 and parts[2].startswith("img_")
    )


def quantize_transformer_part(part: str, module: torch.nn.Module, quantization: str) -> None:
    """Quantize one part of the transformer (``double_blocks.3``, ``single_blocks.0``, ``txt_in``...).

    "float8": weight-only everywhere (the reference's numerics: bf16 activations, each weight
    dequantized before a bf16 matmul). "float8-fast" (opt-in, lossy): the image-stream Linears
    (a double block's ``img_*``, every single block) also quantize their activations to float8
    per row and run float8 matmuls; the text stream and the small outer layers stay weight-only
    (a float8 row-wise matmul with a bias refused a 31-row text input in cuBLAS).
    """
    if quantization == "none":
        return
    if quantization == "float8":
        quantize_float8(module)
        return
    assert quantization == "float8-fast", quantization
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    def image_stream(layer: torch.nn.Module, name: str) -> bool:
        return isinstance(layer, torch.nn.Linear) and quantizes_activations(f"{part}.{name}")

    quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=image_stream)
    for name, layer in module.named_modules():
        if image_stream(layer, name):  # quantize bf16 activations, write bf16 (CastInputLinear)
            layer.__class__ = CastInputLinear
    quantize_(
        module,
        Float8WeightOnlyConfig(),
        filter_fn=lambda layer, name: isinstance(layer, torch.nn.Linear) and not image_stream(layer, name),
    )
