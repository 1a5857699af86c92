"""Transformer weights: single-file checkpoints (original names) and diffusers folders.

The engine keeps weights under the checkpoint's original names. A diffusers folder is converted on
load by concatenating the projections diffusers splits (``to_q/to_k/to_v`` -> ``qkv``; a single
block's ``to_q/to_k/to_v/proj_mlp`` -> ``linear1``). The same table maps diffusers-named LoRA
modules onto row blocks of the fused weights (see ``worker.lora``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from worker.chroma_model import APPROXIMATOR_IN, ChromaConfig, infer_config
from worker.sources import CHECKPOINT_PREFIXES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowBlock:
    """A diffusers module is rows [start, stop) of original Linear ``target`` (``in_features`` wide)."""

    target: str
    start: int
    stop: int
    in_features: int


def linear_map(cfg: ChromaConfig) -> dict[str, RowBlock]:
    """Every diffusers Linear module name -> the original Linear and the rows it occupies."""
    h, mlp, a = cfg.hidden_size, cfg.mlp_hidden, cfg.approximator_hidden
    out: dict[str, RowBlock] = {}

    def whole(diff: str, orig: str, rows: int, cols: int) -> None:
        out[diff] = RowBlock(orig, 0, rows, cols)

    def split(orig: str, names: list[str], sizes: list[int], cols: int) -> None:
        start = 0
        for name, size in zip(names, sizes, strict=True):
            out[name] = RowBlock(orig, start, start + size, cols)
            start += size

    whole("x_embedder", "img_in", h, cfg.in_channels)
    whole("context_embedder", "txt_in", h, cfg.context_dim)
    whole("proj_out", "final_layer.linear", cfg.in_channels, h)
    whole("distilled_guidance_layer.in_proj", "distilled_guidance_layer.in_proj", a, APPROXIMATOR_IN)
    whole("distilled_guidance_layer.out_proj", "distilled_guidance_layer.out_proj", h, a)
    for j in range(cfg.approximator_depth):
        d = f"distilled_guidance_layer.layers.{j}"
        whole(f"{d}.linear_1", f"{d}.in_layer", a, a)
        whole(f"{d}.linear_2", f"{d}.out_layer", a, a)
    for i in range(cfg.depth):
        d, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
        split(f"{o}.img_attn.qkv", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], [h] * 3, h)
        split(f"{o}.txt_attn.qkv", [f"{d}.attn.add_{c}_proj" for c in "qkv"], [h] * 3, h)
        whole(f"{d}.attn.to_out.0", f"{o}.img_attn.proj", h, h)
        whole(f"{d}.attn.to_add_out", f"{o}.txt_attn.proj", h, h)
        whole(f"{d}.ff.net.0.proj", f"{o}.img_mlp.0", mlp, h)
        whole(f"{d}.ff.net.2", f"{o}.img_mlp.2", h, mlp)
        whole(f"{d}.ff_context.net.0.proj", f"{o}.txt_mlp.0", mlp, h)
        whole(f"{d}.ff_context.net.2", f"{o}.txt_mlp.2", h, mlp)
    for i in range(cfg.depth_single):
        d, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        names = [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"]
        split(f"{o}.linear1", names, [h, h, h, mlp], h)
        whole(f"{d}.proj_out", f"{o}.linear2", h, h + mlp)
    return out


def norm_map(cfg: ChromaConfig) -> dict[str, str]:
    """Diffusers norm weight name -> original scale name."""
    out = {}
    for j in range(cfg.approximator_depth):
        out[f"distilled_guidance_layer.norms.{j}.weight"] = f"distilled_guidance_layer.norms.{j}.scale"
    for i in range(cfg.depth):
        d, o = f"transformer_blocks.{i}.attn", f"double_blocks.{i}"
        out[f"{d}.norm_q.weight"] = f"{o}.img_attn.norm.query_norm.scale"
        out[f"{d}.norm_k.weight"] = f"{o}.img_attn.norm.key_norm.scale"
        out[f"{d}.norm_added_q.weight"] = f"{o}.txt_attn.norm.query_norm.scale"
        out[f"{d}.norm_added_k.weight"] = f"{o}.txt_attn.norm.key_norm.scale"
    for i in range(cfg.depth_single):
        d, o = f"single_transformer_blocks.{i}.attn", f"single_blocks.{i}"
        out[f"{d}.norm_q.weight"] = f"{o}.norm.query_norm.scale"
        out[f"{d}.norm_k.weight"] = f"{o}.norm.key_norm.scale"
    return out


def original_to_diffusers(state: dict[str, Tensor], cfg: ChromaConfig) -> dict[str, Tensor]:
    out = {}
    for diff, block in linear_map(cfg).items():
        out[f"{diff}.weight"] = state[f"{block.target}.weight"][block.start : block.stop].clone()
        out[f"{diff}.bias"] = state[f"{block.target}.bias"][block.start : block.stop].clone()
    for diff, orig in norm_map(cfg).items():
        out[diff] = state[orig].clone()
    return out


def diffusers_to_original(state: dict[str, Tensor], cfg: ChromaConfig) -> dict[str, Tensor]:
    parts: dict[str, list[tuple[int, str]]] = {}
    for diff, block in linear_map(cfg).items():
        parts.setdefault(block.target, []).append((block.start, diff))
    out = {}
    for target, pieces in parts.items():
        names = [name for _, name in sorted(pieces)]
        for kind in ("weight", "bias"):
            out[f"{target}.{kind}"] = torch.cat([state[f"{n}.{kind}"] for n in names], dim=0)
    for diff, orig in norm_map(cfg).items():
        out[orig] = state[diff]
    return out


def diffusers_config_to_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The few shapes ``infer_config`` reads, from a diffusers ``config.json``."""
    heads, head_dim = config.get("num_attention_heads", 24), config.get("attention_head_dim", 128)
    hidden = heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "img_in.weight": (hidden, config.get("in_channels", 64)),
        "txt_in.weight": (hidden, config.get("joint_attention_dim", 4096)),
        "double_blocks.0.img_attn.norm.query_norm.scale": (head_dim,),
        "double_blocks.0.img_mlp.0.weight": (hidden * 4, hidden),
        "distilled_guidance_layer.in_proj.weight": (config.get("approximator_hidden_dim", 5120), 64),
    }
    for i in range(config.get("num_layers", 19)):
        shapes[f"double_blocks.{i}.img_attn.qkv.weight"] = (3 * hidden, hidden)
    for i in range(config.get("num_single_layers", 38)):
        shapes[f"single_blocks.{i}.linear1.weight"] = (7 * hidden, hidden)
    for j in range(config.get("approximator_layers", 5)):
        shapes[f"distilled_guidance_layer.layers.{j}.in_layer.weight"] = (hidden, hidden)
    return shapes


def read_safetensors(paths: list[Path]) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for path in paths:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                state[key] = f.get_tensor(key)
    return state


def load_transformer(
    source: Path, axes_dim: tuple[int, ...] | None = None
) -> tuple[ChromaConfig, dict[str, Tensor]]:
    """Read a single-file checkpoint or a diffusers folder; weights under original names, on the CPU."""
    if source.is_dir():
        config_path = source / "config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"{source} has no config.json; expected a diffusers transformer folder")
        config = json.loads(config_path.read_text())
        if axes_dim is None and "axes_dims_rope" in config:
            axes_dim = tuple(config["axes_dims_rope"])
        cfg = infer_config(diffusers_config_to_shapes(config), axes_dim)
        files = sorted(source.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{source} holds no .safetensors weights")
        state = diffusers_to_original(read_safetensors(files), cfg)
    else:
        axes_dim = axes_dim or _declared_axes(source)
        state = read_safetensors([source])
        for key in list(state):
            for prefix in CHECKPOINT_PREFIXES:
                if key.startswith(prefix):
                    state[key[len(prefix) :]] = state.pop(key)
                    break
        cfg = infer_config({k: tuple(v.shape) for k, v in state.items()}, axes_dim)
    return cfg, state


def _declared_axes(checkpoint: Path) -> tuple[int, ...] | None:
    """A RoPE split the checkpoint declares: safetensors metadata, or a config.json beside it."""
    with safe_open(str(checkpoint), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
    for name in ("axes_dims_rope", "axes_dim"):
        if name in metadata:
            return tuple(int(a) for a in json.loads(metadata[name]))
    config = checkpoint.with_suffix(".json")
    for path in (config, checkpoint.parent / "config.json"):
        if path.is_file():
            data = json.loads(path.read_text())
            for name in ("axes_dims_rope", "axes_dim"):
                if name in data:
                    return tuple(int(a) for a in data[name])
    return None
