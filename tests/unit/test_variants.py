"""docs/architecture.md, "Variants and memory": fused variants are cached by LoRA stack, evicted
LRU, built from resident weights, share T5/VAE, and are quantized after the merge."""

from __future__ import annotations

import gc
import shutil
import threading
import weakref
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.schemas import ResolvedPrompt
from tasks.settings import Quantization
from tests import loras
from worker import checkpoint, memory
from worker.checkpoint import linear_map
from worker.chroma_model import ChromaConfig
from worker.engine import Engine, EngineConfig, LoraInput
from worker.sources import Sources
from worker.variants import BaseWeights, DequantizedLinear, working_copy

PROMPT = ResolvedPrompt(0, "sks a photo of a person", "", 64, 64, 2, 4.0, 42)


lora_input = loras.lora_input


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    return {
        name: loras.write_ai_toolkit(folder / f"{name}.safetensors", loras.random_lora(seed=seed))
        for seed, name in enumerate("abcd", start=10)
    }


def private_engine(sources: Sources, **config) -> Engine:
    engine = Engine(EngineConfig(sources, quantization="none", dtype="float32", **config))
    engine.load()
    return engine


def pixels(engine: Engine, stack: list[LoraInput]) -> np.ndarray:
    return np.asarray(engine.generate([PROMPT], stack).images[0].image)


def test_same_stack_hits_other_multiplier_or_order_misses(tiny_sources, lora_files, tmp_path):
    engine = private_engine(tiny_sources)
    a, b = lora_files["a"], lora_files["b"]

    first = engine.generate([PROMPT], [lora_input(a)])
    again = engine.generate([PROMPT], [lora_input(a)])
    assert (first.variant["cache_hit"], again.variant["cache_hit"]) == (False, True)
    assert np.array_equal(np.asarray(first.images[0].image), np.asarray(again.images[0].image))

    copy = tmp_path / "same-content-other-name.safetensors"
    shutil.copyfile(a, copy)
    variant, hit = engine.get_variant([lora_input(copy)])
    assert hit, "a variant is identified by the LoRA's content, not its path"
    assert variant is engine.get_variant([lora_input(a)])[0]

    for stack in (
        [lora_input(a, 0.5)],
        [lora_input(a), lora_input(b)],
        [lora_input(b), lora_input(a)],
        [lora_input(a), lora_input(b, -1.0)],
        [],
    ):
        assert engine.get_variant(stack)[1] is False, stack
        assert engine.get_variant(stack)[1] is True, stack
    assert len(engine.variants) == 6
    assert engine.variants.evictions == 0
    swapped = engine.generate([PROMPT], [lora_input(b), lora_input(a)]).variant
    assert swapped["cache_hit"] is True
    assert [sha for sha, _ in swapped["key"]["loras"]] == [lora_input(b).sha256, lora_input(a).sha256]


def test_least_recently_used_variant_is_evicted_first(tiny_sources, lora_files):
    size = private_engine(tiny_sources).get_variant([])[0].nbytes
    engine = private_engine(tiny_sources, variant_cache_bytes=int(2.5 * size))
    base, a, b, c = (
        [],
        [lora_input(lora_files["a"])],
        [lora_input(lora_files["b"])],
        [lora_input(lora_files["c"])],
    )

    def cached() -> list[bool]:
        return [engine.variant_key(stack) in engine.variants for stack in (base, a, b, c)]

    engine.get_variant(base)
    engine.get_variant(a)
    assert cached() == [True, True, False, False] and engine.variants.evictions == 0
    engine.get_variant(b)  # over budget: base is the least recently used
    assert cached() == [False, True, True, False] and engine.variants.evictions == 1
    assert engine.get_variant(a)[1] is True  # a is now the most recently used
    gen = engine.generate([PROMPT], c)  # so b goes
    assert cached() == [False, True, False, True]
    assert gen.variant["evictions"] == engine.variants.evictions == 2
    assert gen.variant["variants_cached"] == 2
    assert gen.variant["cache_bytes"] == engine.variants.nbytes <= engine.variants.budget_bytes
    assert engine.get_variant(b)[1] is False, "an evicted variant is built again"


def test_the_newest_variant_stays_even_over_budget(tiny_sources, lora_files):
    engine = private_engine(tiny_sources, variant_cache_bytes=1)
    engine.get_variant([])
    image = pixels(engine, [lora_input(lora_files["a"])])
    assert len(engine.variants) == 1 and engine.variants.evictions == 1
    assert engine.variant_key([lora_input(lora_files["a"])]) in engine.variants
    assert np.array_equal(image, pixels(engine, [lora_input(lora_files["a"])]))


def test_new_variant_is_built_without_reading_the_checkpoint(
    tiny_sources, tiny_dir, lora_files, tmp_path, monkeypatch
):
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_dir, folder)
    sources = Sources(
        **{k: str(folder / Path(v).relative_to(tiny_dir)) for k, v in asdict(tiny_sources).items()}
    )
    assert Path(sources.transformer).is_file()
    reference = private_engine(tiny_sources)  # keeps its checkpoint file
    engine = private_engine(sources)
    base_before = {name: t.clone() for name, t in engine.base.state.items()}
    Path(sources.transformer).unlink()

    def no_reads(*args, **kwargs):
        raise AssertionError("the transformer checkpoint was read again")

    monkeypatch.setattr(checkpoint, "read_safetensors", no_reads)
    stack = [lora_input(lora_files["c"], 0.75), lora_input(lora_files["d"], -0.5)]
    got = pixels(engine, stack)
    assert np.array_equal(got, pixels(reference, stack))
    assert all(torch.equal(engine.base.state[n], t) for n, t in base_before.items()), "base weights mutated"
    assert np.array_equal(pixels(engine, []), pixels(reference, []))


def test_base_weights_are_page_locked_in_the_background_once_asked(monkeypatch):
    threads = []

    def pin_memory(tensor):
        threads.append(threading.current_thread().name)
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    state = {"a": torch.randn(3), "b": torch.randn(2, 2)}
    base = BaseWeights(ChromaConfig(), state, torch.float32, pin=True)
    assert not base.pinned.is_set() and threads == []  # Engine.load says when
    base.start_pinning()
    base.start_pinning()  # once
    assert base.pinned.wait(10)
    assert threads == ["pin-base-weights"] * 2
    assert all(
        base.state[name] is not state[name] and torch.equal(base.state[name], state[name]) for name in state
    )

    unpinned = BaseWeights(ChromaConfig(), state, torch.float32, pin=False)  # the CPU
    unpinned.start_pinning()
    assert unpinned.pinned.is_set() and len(threads) == 2


def test_text_encoder_tokenizer_and_vae_are_shared_by_every_variant(engine_factory, lora_files):
    engine = engine_factory("none", "float32")
    shared = (engine.text_encoder, engine.tokenizer, engine.vae)
    models = [engine.get_variant(stack)[0].model for stack in ([lora_input(lora_files["d"])], [])]
    models.append(engine.get_variant([lora_input(lora_files["d"], 0.25)])[0].model)
    engine.generate([PROMPT], [lora_input(lora_files["b"], 1.5)])
    text_encoder, tokenizer, vae = shared
    assert engine.text_encoder is text_encoder and engine.tokenizer is tokenizer and engine.vae is vae
    assert len({id(m) for m in models}) == 3
    assert not any(m is engine.text_encoder for m in models)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float8_variant_is_quantized_after_the_merge(engine_factory, tmp_path, dtype):
    """Merge in the compute dtype, then quantize: the variant's float8 data is exactly
    ``quantize(W + m * B @ A)``, computed here by hand."""
    from torchao.quantization import Float8Tensor, Float8WeightOnlyConfig, quantize_

    engine = engine_factory("float8", dtype, "mask")
    compute = getattr(torch, dtype)
    pairs = loras.random_lora(seed=7)
    stack = [lora_input(loras.write_ai_toolkit(tmp_path / "f8.safetensors", pairs), 0.8)]
    variant = engine.get_variant(stack)[0].model
    base = engine.get_variant([])[0].model

    linears = {name: m for name, m in variant.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(linears) == {block.target for block in linear_map(engine.cfg).values()}
    assert all(type(m.weight) is Float8Tensor for m in linears.values())
    assert all(m.weight.qdata.dtype == torch.float8_e4m3fn for m in linears.values())

    for module, pair in pairs.items():
        weight = engine.base.state[f"{module}.weight"]
        assert weight.dtype == compute
        merged = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], dtype=compute))
        with torch.no_grad():
            merged[0].weight.copy_(weight + (pair.up.to(compute) @ pair.down.to(compute)) * 0.8)
        quantize_(merged, Float8WeightOnlyConfig())
        expected, got = merged[0].weight, variant.get_submodule(module).weight
        before = base.get_submodule(module).weight
        assert torch.equal(got.qdata.view(torch.uint8), expected.qdata.view(torch.uint8)), module
        assert torch.equal(got.scale, expected.scale), module
        assert not torch.equal(got.qdata.view(torch.uint8), before.qdata.view(torch.uint8)), module

    images = [pixels(engine, s) for s in (stack, [replace(stack[0], multiplier=0.0)], [])]
    assert not np.array_equal(images[0], images[2]), "the float8 variant must carry the LoRA"
    assert np.array_equal(images[1], images[2])


def test_working_copy_renders_the_same_pixels_and_follows_the_active_variant(tiny_sources, lora_files):
    """float8 weight-only with the active variant dequantized once renders what per-forward
    dequantization renders; one working copy exists, for the variant rendered last."""
    engines = {}
    for mode in ("on", "off"):
        engines[mode] = Engine(
            EngineConfig(tiny_sources, quantization="float8", dtype="bfloat16", working_copy=mode)
        )
        engines[mode].load()
    on, off = engines["on"], engines["off"]
    assert on.recipe.working_copy and not off.recipe.working_copy
    stack = [lora_input(lora_files["a"], 0.8)]
    assert np.array_equal(pixels(on, stack), pixels(off, stack))

    first, _ = on.get_variant(stack)
    working = on.model_for(first)
    assert working is not first.model and on.model_for(first) is working
    old = weakref.ref(working)
    del working
    second, _ = on.get_variant([lora_input(lora_files["b"])])
    gc.collect()
    assert old() is None, "the previous working copy is freed before the next variant is built"
    kept = on.model_for(second)
    assert on.working_variant == second.key and on.model_for(second) is kept
    plain, _ = off.get_variant(stack)
    assert off.model_for(plain) is plain.model


def test_working_copy_falls_back_to_per_forward_dequantization_when_it_does_not_fit(
    tiny_sources, monkeypatch
):
    from worker import engine as engine_module

    engine = Engine(EngineConfig(tiny_sources, quantization="float8", working_copy="on"))
    engine.load()
    variant, _ = engine.get_variant([])

    def no_room(model):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 17.00 GiB")

    monkeypatch.setattr(engine_module, "working_copy", no_room)
    assert engine.model_for(variant) is variant.model
    assert engine.working_variant is None


def test_an_unquantized_model_keeps_no_working_copy_reference(tiny_sources):
    engine = private_engine(tiny_sources, working_copy="on")
    variant, _ = engine.get_variant([])
    assert engine.model_for(variant) is variant.model
    assert engine.working_variant is None, "an evicted unquantized variant must not be kept alive"


def test_fast_mode_quantizes_the_activations_of_the_image_stream_only():
    from worker.components import quantizes_activations

    for name in (
        "single_blocks.0.linear1",
        "single_blocks.37.linear2",
        "double_blocks.3.img_mlp.0",
        "double_blocks.18.img_attn.qkv",
        "double_blocks.0.img_attn.proj",
    ):
        assert quantizes_activations(name), name
    for name in (
        "double_blocks.3.txt_mlp.2",
        "double_blocks.0.txt_attn.qkv",
        "img_in",
        "txt_in",
        "distilled_guidance_layer.in_proj",
        "distilled_guidance_layer.layers.0.in_layer",
        "final_layer.linear",
    ):
        assert not quantizes_activations(name), name


def test_budget_leaves_room_for_the_working_copy_and_the_reserve(tiny_sources):
    """On CUDA: free memory after loading, less the working copy, less max(8 GiB, 10% of the card);
    the working copy fits only where the card also holds one variant and the reserve."""
    engine = Engine(EngineConfig(tiny_sources, quantization="float8", dtype="bfloat16", working_copy="on"))
    engine.load()
    variant, _ = engine.get_variant([])
    copy = working_copy(variant.model)
    dequantized = sum(
        m.weight.numel() * m.weight.element_size() for m in copy.modules() if isinstance(m, DequantizedLinear)
    )
    state = engine.base.state
    assert memory.working_copy_bytes(state, Quantization.FLOAT8, torch.bfloat16) == dequantized
    assert memory.working_copy_bytes(state, Quantization.NONE, torch.bfloat16) == 0
    one = memory.variant_bytes(state, Quantization.FLOAT8, torch.bfloat16)
    assert one == sum(t.numel() for t in state.values())
    gib = 2**30
    assert memory.variant_budget(60 * gib, 80 * gib, dequantized, one) == 60 * gib - dequantized - 8 * gib
    assert memory.variant_budget(100 * gib, 140 * gib, dequantized, one) == 100 * gib - dequantized - 14 * gib
    assert memory.variant_budget(gib, 24 * gib, dequantized, one) == one, "room for one variant at least"
    need = dequantized + one + 8 * gib
    assert memory.working_copy_fits(need, 24 * gib, dequantized, one)
    assert not memory.working_copy_fits(need - 1, 24 * gib, dequantized, one)


def test_working_copy_setting_is_checked(tiny_sources):
    with pytest.raises(ValueError, match="CHROMA_WORKING_COPY"):
        Engine(EngineConfig(tiny_sources, working_copy="sometimes"))


def test_kernels_setting_runs_them_only_where_they_can_run(tiny_sources, monkeypatch):
    from worker import kernels
    from worker.engine import make_recipe

    def recipe(device: str, kernels_setting: str) -> bool:
        config = EngineConfig(tiny_sources, kernels=kernels_setting)
        return make_recipe(config, torch.device(device)).kernels  # nothing here touches a card

    assert not recipe("cpu", "auto")  # the kernels run on CUDA only
    with pytest.raises(ValueError, match="CHROMA_KERNELS: 'on' needs a CUDA device and Triton"):
        recipe("cpu", "on")
    with pytest.raises(ValueError, match="CHROMA_KERNELS: 'sometimes'; choose one of auto, on, off"):
        recipe("cpu", "sometimes")
    monkeypatch.setattr(kernels, "available", lambda: True)
    assert recipe("cuda", "auto") and recipe("cuda", "on") and not recipe("cuda", "off")
    monkeypatch.setattr(kernels, "available", lambda: False)  # a CUDA build without Triton
    assert not recipe("cuda", "auto")
    with pytest.raises(ValueError, match="CHROMA_KERNELS: 'on' needs a CUDA device and Triton"):
        recipe("cuda", "on")


def test_out_of_memory_while_rendering_evicts_the_other_variants_and_retries_once(
    tiny_sources, lora_files, monkeypatch
):
    from tasks.errors import OutOfMemory

    engine = private_engine(tiny_sources)
    first, second = [lora_input(lora_files["a"])], [lora_input(lora_files["b"])]
    expected = pixels(engine, second)
    engine.get_variant(first)
    assert len(engine.variants) == 2
    real, calls = engine.denoise, []

    def denoise_once_out_of_memory(*args, **kwargs):
        calls.append(len(engine.variants))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "denoise", denoise_once_out_of_memory)
    assert np.array_equal(pixels(engine, second), expected)
    assert calls == [2, 1], "the retry ran with only the variant in use left"
    assert engine.variants.get(engine.variant_key(second)) is not None

    def always_out_of_memory(*args, **kwargs):
        calls.append(len(engine.variants))
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(engine, "denoise", always_out_of_memory)
    with pytest.raises(OutOfMemory):
        engine.generate([PROMPT], second)
    assert calls[2:] == [1], "nothing left to evict: no second try"


def test_fast_mode_quantization_split_per_part(monkeypatch):
    """float8-fast: float8 activations on the image stream, weight-only on the text stream and the
    outer layers (checked on the CPU by recording what each quantize_ call selects)."""
    import torchao.quantization

    from worker.chroma_model import CastInputLinear, ChromaTransformer
    from worker.components import quantize_transformer_part
    from worker.tiny import TINY
    from worker.variants import _parts

    chosen: dict[str, set[str]] = {}

    def record(module, config, filter_fn=None):
        for name, layer in module.named_modules():
            if filter_fn(layer, name):
                chosen.setdefault(type(config).__name__, set()).add(f"{part}.{name}".rstrip("."))

    monkeypatch.setattr(torchao.quantization, "quantize_", record)
    with torch.device("meta"):
        model = ChromaTransformer(TINY)
    for part, module in _parts(model):
        quantize_transformer_part(part, module, "float8-fast")
    dynamic, weight_only = (
        chosen["Float8DynamicActivationFloat8WeightConfig"],
        chosen["Float8WeightOnlyConfig"],
    )
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert dynamic | weight_only == linears and not dynamic & weight_only
    assert {"double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.2", "single_blocks.0.linear1"} <= dynamic
    assert {"double_blocks.0.txt_attn.qkv", "txt_in", "img_in", "final_layer.linear"} <= weight_only
    # The float8-activation layers take bf16 inputs (CastInputLinear); the others stay nn.Linear.
    cast = {name for name, m in model.named_modules() if isinstance(m, CastInputLinear)}
    assert cast == dynamic
