"""Chroma's components at their real shapes with random weights, written the way production finds them.

``write_components(folder, scale, device)`` writes the transformer as ONE single-file bf16 checkpoint
with the original key names, a T5-XXL v1.1 encoder folder (built on meta, filled on ``device``), a
word-level tokenizer of T5's vocabulary size and a FLUX VAE folder, skipping what is already there,
and returns their ``Sources``: the engine then loads them through its own loading code. Speed does
not depend on the values. ``SCALES`` names the sizes: ``full`` (8.9B transformer), ``smoke`` (full
width, 2+2 blocks), ``tiny`` (the code paths on the CPU).

bench.py, step_profile.py and queue_bench.py use it; as a command it also writes ai-toolkit LoRAs
(``worker.tiny.write_lora`` at the scale's shapes) and prints what it wrote as one JSON line::

    python bench/weights.py --scale full --device cuda --work /tmp/w --loras 4 --lora-rank 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from worker.chroma_model import ChromaConfig, ChromaTransformer  # noqa: E402
from worker.sources import Sources  # noqa: E402
from worker.tiny import FLUX_VAE, T5_V1_1, TINY, write_lora, write_tokenizer  # noqa: E402

PROMPT = (
    "a cinematic photo of a red fox standing in a snowy forest at dawn with soft golden light "
    "falling through the tall pine trees while mist rises from a frozen river in the valley below"
)
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128)
SCALES = {
    # transformer config, T5 overrides, VAE overrides, size, steps
    "full": (ChromaConfig(), {}, {}, 1024, 25),
    "smoke": (ChromaConfig(depth=2, depth_single=2), {"num_layers": 2}, {}, 512, 3),
    "tiny": (
        dataclasses.replace(TINY, context_dim=64),
        dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2),
        dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8),
        64,
        2,
    ),
}


# -- components at their real shapes, random values ------------------------------------------------


def write_components(folder: Path, scale: str, device: torch.device) -> Sources:
    cfg, t5_over, vae_over, _, _ = SCALES[scale]
    folder.mkdir(parents=True, exist_ok=True)
    transformer = folder / "chroma-random.safetensors"
    if not transformer.exists():
        write_transformer(transformer, cfg, device)
    if not (folder / "text_encoder" / "config.json").exists():
        write_t5(folder / "text_encoder", {**T5_XXL, **t5_over, "d_model_ctx": cfg.context_dim}, device)
    if not (folder / "tokenizer" / "tokenizer.json").exists():
        write_tokenizer(folder / "tokenizer", PROMPT.split(), T5_XXL["vocab_size"])
    if not (folder / "vae" / "config.json").exists():
        write_vae(folder / "vae", {**FLUX_VAE, "sample_size": 1024, **vae_over})
    return Sources(
        str(transformer), str(folder / "text_encoder"), str(folder / "tokenizer"), str(folder / "vae")
    )


def random_weights(cfg: ChromaConfig, device: torch.device):
    """(name, bf16 tensor on ``device``) for every transformer weight: std 0.02, norm scales ~1."""
    with torch.device("meta"):
        model = ChromaTransformer(cfg)
    gen = torch.Generator(device).manual_seed(0)
    for name, p in model.state_dict().items():
        value = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32)
        value = 1 + 0.05 * value if name.endswith(".scale") else 0.02 * value
        yield name, value.to(torch.bfloat16)


def write_transformer(path: Path, cfg: ChromaConfig, device: torch.device) -> None:
    """One single-file checkpoint, original key names, bf16 (as Chroma1-Base ships)."""
    from safetensors.torch import save_file

    save_file({name: value.cpu() for name, value in random_weights(cfg, device)}, str(path))


def write_t5(path: Path, shape: dict, device: torch.device) -> None:
    """T5-XXL v1.1 encoder shape, built on meta and materialised on the device (never on the CPU)."""
    from transformers import T5Config, T5EncoderModel

    d_model = shape.pop("d_model_ctx")
    assert d_model == shape["d_model"], "the transformer's text width must be T5's d_model"
    config = T5Config(**shape, **T5_V1_1, dropout_rate=0.0)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    model = model.to(torch.bfloat16).to_empty(device=device)
    gen = torch.Generator(device).manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.fill_(1.0)
            elif "shared" in name or "embed_tokens" in name:
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(str(path), safe_serialization=True)
    del model


def write_vae(path: Path, config: dict) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**config)  # ~84M parameters: default init on the CPU takes a second
    vae.save_pretrained(str(path), safe_serialization=True)


def write_loras(folder: Path, scale: str, count: int, rank: int) -> list[Path]:
    """``count`` ai-toolkit LoRAs on every double/single block Linear, fp16, small values."""
    cfg = SCALES[scale][0]
    return [
        write_lora(folder / f"lora-{i}-r{rank}.safetensors", seed=100 + i, rank=rank, std=0.01, cfg=cfg)
        for i in range(count)
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--device", default="cuda", help="where the random values are drawn")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--loras", type=int, default=0)
    ap.add_argument("--lora-rank", type=int, default=8)
    args = ap.parse_args()
    start = time.perf_counter()
    sources = write_components(args.work, args.scale, torch.device(args.device))
    components_s = time.perf_counter() - start
    loras = write_loras(args.work / "loras", args.scale, args.loras, args.lora_rank)
    written = {
        "sources": dataclasses.asdict(sources),
        "loras": [str(p) for p in loras],
        "components_s": round(components_s, 1),
        "loras_s": round(time.perf_counter() - start - components_s, 1),
    }
    print(json.dumps(written), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
