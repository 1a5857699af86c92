"""A tiny random Chroma built in code: the embedded default for demos and tests.

``write_tiny_chroma(folder)`` saves every component the way production finds them (a single-file
transformer checkpoint with original key names, a T5 encoder folder, a tokenizer folder, a
FLUX-shaped VAE folder) and returns their ``Sources``; the engine then loads them through the same
code as the 8.9B model. Nothing is downloaded. Weights are drawn from a seeded generator, so the
same seed gives the same files on every machine. ``write_example(folder)`` adds a LoRA and a request
that uses it: what ``chroma-worker tiny-model DIR`` writes for a first local run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from worker.chroma_model import ChromaConfig, ChromaTransformer
from worker.sources import Sources

# What makes a T5Config the T5 v1.1 encoder Chroma uses (the sizes are given beside it).
T5_V1_1 = dict(
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
    use_cache=False,
    tie_word_embeddings=False,
)

TINY = ChromaConfig(
    in_channels=64,
    context_dim=32,
    hidden_size=64,
    num_heads=2,
    mlp_ratio=4.0,
    depth=2,
    depth_single=2,
    approximator_hidden=32,
    approximator_depth=2,
    axes_dim=(4, 14, 14),
)
# The FLUX VAE's architecture (ostris/Flex.1-alpha/vae); the tiny model narrows its channels.
FLUX_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# What `chroma-worker tiny-model DIR` writes beside the model (``write_example``).
EXAMPLE_LORA = "my_lora_job/my_lora.safetensors"
EXAMPLE_REQUEST = {
    "model": "chroma",
    "trigger_word": "sks",
    "prompts": [
        {"prompt": "[trigger] a photo of a person", "width": 512, "height": 512, "seed": 42,
         "sample_steps": 25, "guidance_scale": 4.0, "neg": ""}
    ],
    "loras": [{"path": EXAMPLE_LORA, "network_multiplier": 1.0}],
}  # fmt: skip
WORDS = tuple(
    "a photo of the person portrait sks ohwx man woman dog cat in on at with red blue green "
    "forest city night day sun light painting style cinematic close up smiling standing "
    "beach mountain snow rain street car house garden flower tree sky water river old young".split()
)


@dataclass(frozen=True)
class Example:
    """A tiny model with a LoRA and a request that uses it, ready for ``chroma-worker run``."""

    sources: Sources
    request: Path
    lora_dir: Path


def write_example(folder: Path) -> Example:
    """The tiny model in ``folder``, an ai-toolkit LoRA under ``folder/loras`` and ``folder/request.json``
    (the reference example request at 512x512, a size a CPU renders in seconds)."""
    sources = write_tiny_chroma(folder)
    lora_dir = folder / "loras"
    write_lora(lora_dir / EXAMPLE_LORA)
    request = folder / "request.json"
    request.write_text(json.dumps(EXAMPLE_REQUEST, indent=2) + "\n")
    return Example(sources, request, lora_dir)


def write_tiny_chroma(folder: Path, seed: int = 0, std: float = 0.15) -> Sources:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    transformer = folder / "chroma-tiny.safetensors"
    save_file(_random_transformer(TINY, generator, std), str(transformer))
    write_tokenizer(folder / "tokenizer", [*WORDS, *"abcdefghijklmnopqrstuvwxyz0123456789[],.!?-'"])
    _write_text_encoder(folder / "text_encoder", generator)
    _write_vae(folder / "vae", generator)
    return Sources(
        str(transformer), str(folder / "text_encoder"), str(folder / "tokenizer"), str(folder / "vae")
    )


def _random_transformer(cfg: ChromaConfig, generator: torch.Generator, std: float) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = ChromaTransformer(cfg)
    state = {}
    for name, param in model.state_dict().items():
        if name.endswith(".scale"):  # RMSNorm gains around 1
            value = 1 + 0.1 * torch.randn(param.shape, generator=generator)
        else:
            value = std * torch.randn(param.shape, generator=generator)
        state[name] = value.contiguous()
    return state


def write_tokenizer(path: Path, words: list[str], vocab_size: int = 0) -> None:
    """A word-level T5-style tokenizer (``</s>`` appended, ``<pad>`` padding) built in code,
    padded with filler entries up to ``vocab_size``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=512
    )
    fast.save_pretrained(str(path))


def _write_text_encoder(path: Path, generator: torch.Generator) -> None:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, **T5_V1_1)
    model = T5EncoderModel(config)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(str(path), safe_serialization=True)


def _write_vae(path: Path, generator: torch.Generator) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        **{**FLUX_VAE, "block_out_channels": (16,) * 4, "layers_per_block": 1, "norm_num_groups": 8},
        sample_size=64,
    )
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    vae.save_pretrained(str(path), safe_serialization=True)
    config = json.loads((path / "config.json").read_text())
    assert config["latent_channels"] == 16


def write_lora(path: Path, seed: int = 1, rank: int = 4, std: float = 0.3, cfg: ChromaConfig = TINY) -> Path:
    """An ai-toolkit-format LoRA on every block Linear (original names, fp16, no alpha)."""
    from worker.lora import module_table

    generator = torch.Generator().manual_seed(seed)
    targets = sorted(
        (name, block)
        for name, block in module_table(cfg).items()
        if name == block.target and name.startswith(("double_blocks", "single_blocks"))
    )
    tensors = {}
    for target, block in targets:
        tensors[f"diffusion_model.{target}.lora_A.weight"] = std * torch.randn(
            rank, block.in_features, generator=generator
        )
        tensors[f"diffusion_model.{target}.lora_B.weight"] = std * torch.randn(
            block.stop, rank, generator=generator
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()}, str(path))
    return path
