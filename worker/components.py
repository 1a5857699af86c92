"""How the LoRA-independent components load (T5, tokenizer, VAE) and how weights are quantized.

T5, its tokenizer and the VAE do not depend on the LoRA: they load once per worker and every
fused variant shares them. Where each comes from is ``worker.sources``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from tasks.settings import Quantization
from worker.chroma_model import CastInputLinear
from worker.sampling import TextEmbedding, encode_text

log = logging.getLogger(__name__)


class TextEncoder:
    """A tokenizer and a T5, with the embeddings of a few recent texts kept (negative prompts
    repeat; the empty prompt is always kept). ``mask_dtype``: see ``sampling.attended_tokens``."""

    def __init__(self, tokenizer, model, mask_dtype: torch.dtype | None = None, kept: int = 16):
        self.tokenizer, self.model, self.mask_dtype, self.kept = tokenizer, model, mask_dtype, kept
        self._texts: dict[str, TextEmbedding] = {}
        self._texts[""] = self.encode("")

    def encode(self, text: str, keep: bool = False) -> TextEmbedding:
        cached = self._texts.get(text)
        if cached is not None:
            return cached
        embedding = encode_text(self.tokenizer, self.model, text, self.mask_dtype)
        if keep:
            self._texts[text] = embedding
            while len(self._texts) > self.kept:
                del self._texts[next(key for key in self._texts if key != "")]
        return embedding


def describe_size(path: Path) -> str:
    """A file's or folder's weight bytes, for a person: ``17.8 GB``."""
    files = list(path.rglob("*.safetensors")) if path.is_dir() else [path]
    size = sum(f.stat().st_size for f in files if f.is_file())
    if size <= 0:
        return "0 B"
    unit = min(int(math.log(size, 1000)), 4)
    return f"{size / 1000**unit:.1f} {['B', 'kB', 'MB', 'GB', 'TB'][unit]}"


def load_tokenizer(path: Path):  # -> transformers.PreTrainedTokenizerFast
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_text_encoder(path: Path, dtype: torch.dtype, device: torch.device):
    from transformers import T5EncoderModel

    # Loaded on the host, then moved: loading straight to the device (device_map) took 28.8 s
    # instead of 12.5 s at full size on an H200 (bench/RESULTS.md, queue bench runs).
    model = T5EncoderModel.from_pretrained(str(path), torch_dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def load_vae(path: Path, dtype: torch.dtype, device: torch.device):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def quantize_float8(module: torch.nn.Module) -> None:
    """torchao float8 weight-only on every Linear: the reference's "float8", in place."""
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    # set_inductor_config=False: torchao would switch on inductor's coordinate-descent tuning for the
    # whole process, which re-benchmarks kernels at every worker start (up to 90 s measured).
    quantize_(module, Float8WeightOnlyConfig(set_inductor_config=False))


def quantizes_activations(name: str) -> bool:
    """Whether "float8-fast" quantizes this transformer Linear's activations (original names:
    ``single_blocks.0.linear1``, ``double_blocks.3.img_mlp.0``): every single block and the image
    stream of the double blocks."""
    parts = name.split(".")
    return parts[0] == "single_blocks" or (
        parts[0] == "double_blocks" and len(parts) > 2 and parts[2].startswith("img_")
    )


def quantize_transformer_part(part: str, module: torch.nn.Module, quantization: Quantization | str) -> None:
    """Quantize one part of the transformer (``double_blocks.3``, ``single_blocks.0``, ``txt_in``...).

    "float8": weight-only everywhere (the reference's numerics: bf16 activations, each weight
    dequantized before a bf16 matmul). "float8-fast" (opt-in, lossy): the image-stream Linears
    (a double block's ``img_*``, every single block) also quantize their activations to float8
    per row and run float8 matmuls; the text stream and the small outer layers stay weight-only
    (a float8 row-wise matmul with a bias refused a 31-row text input in cuBLAS).
    """
    quantization = Quantization(quantization)
    if quantization is Quantization.NONE:
        return
    if quantization is Quantization.FLOAT8:
        quantize_float8(module)
        return
    assert quantization is Quantization.FLOAT8_FAST, quantization
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    def image_stream(layer: torch.nn.Module, name: str) -> bool:
        return isinstance(layer, torch.nn.Linear) and quantizes_activations(f"{part}.{name}")

    quantize_(
        module,
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False),
        filter_fn=image_stream,
    )
    for name, layer in module.named_modules():
        if image_stream(layer, name):  # quantize bf16 activations, write bf16 (CastInputLinear)
            layer.__class__ = CastInputLinear
    quantize_(
        module,
        Float8WeightOnlyConfig(set_inductor_config=False),
        filter_fn=lambda layer, name: isinstance(layer, torch.nn.Linear) and not image_stream(layer, name),
    )
