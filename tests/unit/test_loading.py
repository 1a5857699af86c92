"""Component loading: one code path for the tiny model and the 8.9B one, in either format."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tasks.schemas import ResolvedPrompt
from tasks.settings import SettingsError
from worker.checkpoint import load_transformer, original_to_diffusers
from worker.chroma_model import ChromaConfig, default_axes, infer_config
from worker.engine import Engine, EngineConfig
from worker.sources import resolve
from worker.tiny import TINY

PROMPT = ResolvedPrompt(0, "a photo of a dog", "", 64, 64, 2, 4.0, 3)


def image_of(sources, **config) -> np.ndarray:
    engine = Engine(EngineConfig(sources, quantization="none", **config))
    return np.asarray(engine.generate([PROMPT], []).images[0].image)


def test_architecture_is_read_from_shapes(tiny_sources):
    cfg, state = load_transformer(Path(tiny_sources.transformer))
    assert cfg == TINY
    full = {
        "img_in.weight": (3072, 64),
        "txt_in.weight": (3072, 4096),
        "double_blocks.0.img_attn.norm.query_norm.scale": (128,),
        "double_blocks.0.img_mlp.0.weight": (12288, 3072),
        "distilled_guidance_layer.in_proj.weight": (5120, 64),
        **{f"double_blocks.{i}.img_attn.qkv.weight": (9216, 3072) for i in range(19)},
        **{f"single_blocks.{i}.linear1.weight": (21504, 3072) for i in range(38)},
        **{f"distilled_guidance_layer.layers.{j}.in_layer.weight": (5120, 5120) for j in range(5)},
    }
    assert infer_config(full) == ChromaConfig()  # Chroma1-Base: 19 + 38 blocks, 24 heads of 128


def test_prefixed_checkpoint_and_diffusers_folder_give_the_same_image(tiny_sources, tmp_path):
    expected = image_of(tiny_sources)
    state = load_file(tiny_sources.transformer)
    prefixed = tmp_path / "prefixed.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, str(prefixed))
    assert np.array_equal(image_of(replace(tiny_sources, transformer=str(prefixed))), expected)

    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file(original_to_diffusers(state, TINY), str(folder / "diffusion_pytorch_model.safetensors"))
    config = {
        "_class_name": "ChromaTransformer2DModel",
        "in_channels": 64,
        "num_layers": TINY.depth,
        "num_single_layers": TINY.depth_single,
        "attention_head_dim": TINY.head_dim,
        "num_attention_heads": TINY.num_heads,
        "joint_attention_dim": TINY.context_dim,
        "axes_dims_rope": list(TINY.axes_dim),
        "approximator_hidden_dim": TINY.approximator_hidden,
        "approximator_layers": TINY.approximator_depth,
    }
    (folder / "config.json").write_text(json.dumps(config))
    assert np.array_equal(image_of(replace(tiny_sources, transformer=str(folder))), expected)


def test_rope_split_from_metadata_config_or_setting(tiny_sources, tmp_path):
    state = load_file(tiny_sources.transformer)
    tagged = tmp_path / "tagged.safetensors"
    save_file(state, str(tagged), metadata={"axes_dims_rope": "[8, 12, 12]"})
    assert load_transformer(tagged)[0].axes_dim == (8, 12, 12)

    beside = tmp_path / "beside" / "model.safetensors"
    beside.parent.mkdir()
    shutil.copy(tiny_sources.transformer, beside)
    (beside.parent / "config.json").write_text(json.dumps({"axes_dim": [16, 8, 8]}))
    assert load_transformer(beside)[0].axes_dim == (16, 8, 8)
    assert load_transformer(beside, (4, 4, 24))[0].axes_dim == (4, 4, 24)

    default = image_of(tiny_sources)
    other = image_of(tiny_sources, rope_axes=(8, 12, 12))
    assert not np.array_equal(default, other), "the RoPE split must reach the model"
    with pytest.raises(ValueError, match="sum to the head size"):
        load_transformer(Path(tiny_sources.transformer), (4, 4, 4))


def test_default_rope_split():
    assert default_axes(128) == (16, 56, 56)
    assert default_axes(32) == (4, 14, 14)
    for head in (16, 24, 32, 64, 96, 128, 256):
        axes = default_axes(head)
        assert sum(axes) == head and all(a % 2 == 0 for a in axes)


def test_sources_resolve_locally_and_never_download_offline(tmp_path, monkeypatch):
    assert resolve(str(tmp_path)) == tmp_path
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: set what it consults at call time too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SettingsError) as excinfo:
        resolve("nobody-here/not-a-model/transformer.safetensors", setting="transformer")
    message = str(excinfo.value)
    assert message.startswith("CHROMA_TRANSFORMER: ") and "not in the local Hugging Face cache" in message
    assert "\n" not in message and "tiny-model" in message
    with pytest.raises(SettingsError, match="^CHROMA_VAE: './missing/vae' is neither an existing path"):
        resolve("./missing/vae", setting="vae")


def test_an_unreachable_hub_fails_at_once_naming_the_setting(tmp_path, monkeypatch):
    """Online mode but no network: one quick probe, then one line, not the hub client's retries."""
    import time

    from worker import sources

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(sources, "HUB_HOST", "127.0.0.1")  # nothing listens on 443 here
    start = time.monotonic()
    expected = "^CHROMA_TEXT_ENCODER: 'org/repo/text_encoder' is not in the local"
    with pytest.raises(SettingsError, match=expected):
        resolve("org/repo/text_encoder", setting="text_encoder")
    assert time.monotonic() - start < sources.HUB_PROBE_SECONDS + 2


def test_dtype_and_device_defaults(tiny_sources):
    engine = Engine(EngineConfig(tiny_sources))
    assert engine.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert engine.dtype == (torch.bfloat16 if engine.device.type == "cuda" else torch.float32)
    assert engine.drop_padding is (engine.device.type == "cuda")
    with pytest.raises(ValueError, match="CHROMA_QUANTIZATION: 'int4'; choose one of"):
        Engine(EngineConfig(tiny_sources, quantization="int4"))
    with pytest.raises(ValueError, match="float8-fast.*use 'float8'"):
        Engine(EngineConfig(tiny_sources, quantization="float8-fast", device="cpu"))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_float8_fast_refuses_a_dtype_it_cannot_quantize(dtype):
    """Its row-wise float8 layers take bfloat16 only: refused at start, naming the setting."""
    from tasks.settings import Settings
    from worker import preflight

    with pytest.raises(SettingsError, match=f"^CHROMA_DTYPE: {dtype} cannot run quantization 'float8-fast'"):
        preflight.check(Settings(quantization="float8-fast", dtype=dtype))
    preflight_ok = Settings(quantization="float8-fast", dtype="bfloat16", transformer="/nowhere.safetensors")
    with pytest.raises(SettingsError, match="^CHROMA_TRANSFORMER"):  # past the dtype check
        preflight.check(preflight_ok)
