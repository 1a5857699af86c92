"""Preview mode: the LoRA rendered as ai-toolkit's training sampler showed it (docs/sampling.md).

The end-to-end checks compare against ``tests.reference_preview``: diffusers' Chroma and T5
quantized by optimum-quanto 0.2.4 itself, with ai-toolkit's LoRA forward around quanto's layers
under diffusers' names. The unit checks hold ``worker.preview``'s qfloat8 to quanto's own tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tasks.errors import InvalidRequest
from tasks.schemas import ResolvedPrompt, resolve_prompts, validate_request
from tests import loras
from tests.reference import psnr
from worker import preview, sampling
from worker.engine import Engine, EngineConfig
from worker.lora import module_table
from worker.preview import DequantizedQFloat8Linear, LoraLinear, QFloat8Linear
from worker.tiny import TINY, write_tiny_chroma

quanto = pytest.importorskip("optimum.quanto")

# Every Linear ai-toolkit puts a LoRA on (double and single blocks, fused qkv / linear1 as one).
BLOCK_LINEARS = tuple(
    sorted(
        name
        for name, block in module_table(TINY).items()
        if name == block.target and name.startswith(("double_blocks", "single_blocks"))
    )
)
PROMPT = ResolvedPrompt(0, "sks a photo of a person", "blurry, low quality", 80, 64, 3, 4.0, 42)
MULTIPLIER = 0.8


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def preview_image(engine: Engine, stack, p: ResolvedPrompt = PROMPT) -> Image.Image:
    return engine.generate([p], stack, preview=True).images[0].image


def reference_image(reference, p: ResolvedPrompt = PROMPT) -> Image.Image:
    return reference(p.prompt, p.width, p.height, p.sample_steps, p.guidance_scale, p.seed, p.neg)


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> tuple[dict[str, loras.Pair], Path]:
    pairs = loras.random_lora(modules=BLOCK_LINEARS, seed=4)
    return pairs, loras.write_ai_toolkit(tmp_path_factory.mktemp("preview") / "aitk.safetensors", pairs)


@pytest.fixture(scope="module")
def reference_preview(tiny_sources):
    from tests.reference_preview import ReferencePreview

    made = {}

    def get(dtype: torch.dtype, stack=(), merge: bool = False):
        key = (dtype, tuple((id(pairs), m, s) for pairs, m, s in stack), merge)
        if key not in made:
            made[key] = ReferencePreview(tiny_sources, dtype, list(stack), merge)
        return made[key]

    return get


# -- qfloat8: optimum-quanto's own numbers -----------------------------------------------------------


def quanto_linear(weight: torch.Tensor, bias: torch.Tensor | None):
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    holder = torch.nn.Sequential(linear)
    quanto.quantize(holder, weights=quanto.qfloat8)
    quanto.freeze(holder)
    return holder[0]


def awkward_weight(dtype: torch.dtype, rows: int = 24, cols: int = 40) -> torch.Tensor:
    """Random rows, a row of zeros, and extremes: near the dtype's largest value, subnormals, a
    huge value beside tiny ones (which fall below e4m3's range), ties for e4m3's rounding."""
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(rows, cols, generator=gen) * torch.logspace(-3, 3, rows)[:, None]
    weight[1] = 0
    weight[2, :] = 1e-30
    weight[2, 0] = 3e38
    weight[3] = torch.finfo(dtype).tiny / 4  # subnormal (float32) / below normal (bf16)
    weight[4] = torch.finfo(dtype).max * torch.linspace(-1, 1, cols)
    weight[5] = torch.arange(cols) * 0.0625 + 1.0  # exact in e4m3 after scaling, and ties
    return weight.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qfloat8_equals_optimum_quanto_bit_for_bit(dtype):
    weight = awkward_weight(dtype)
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(1)).to(dtype)
    reference = quanto_linear(weight, bias)
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    mine = QFloat8Linear.quantize(linear)
    assert mine.scale.dtype == reference.weight._scale.dtype == dtype
    assert torch.equal(mine.scale, reference.weight._scale)
    assert torch.equal(mine.data.view(torch.uint8), reference.weight._data.view(torch.uint8))
    assert torch.isnan(mine.data.float()[1]).all(), "quanto: a zero row is 0 / 0 = NaN"
    x = torch.randn(3, 5, weight.shape[1], generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        expected = reference(x)
        got = mine(x)
        dequantized = DequantizedQFloat8Linear(mine)(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(dequantized, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(got[..., 1]).all() and torch.isfinite(got[..., 6:]).all()
    # A float32 input to a bf16 layer is cast first, as quanto does.
    torch.testing.assert_close(mine(x.float()), reference(x.float()), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qfloat8_one_row_weight_is_quantized_per_tensor_as_quanto_does(dtype):
    linear = torch.nn.Linear(16, 1, bias=False, dtype=dtype)
    reference = quanto_linear(linear.weight.detach(), None)
    mine = QFloat8Linear.quantize(linear)
    assert mine.scale.ndim == 0 and torch.equal(mine.scale, reference.weight._scale)
    assert torch.equal(mine.data.view(torch.uint8), reference.weight._data.view(torch.uint8))


def test_qfloat8_is_not_torchao_float8():
    """The fused default's torchao float8 rounds bf16 weights differently: the check can fail."""
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    weight = torch.randn(256, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    linear = torch.nn.Linear(256, 256, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(weight)
    mine = QFloat8Linear.quantize(linear)
    quantize_(linear, Float8WeightOnlyConfig())
    assert not torch.equal(mine.weight, linear.weight.dequantize())


# -- the preview's modules ---------------------------------------------------------------------


def test_every_linear_of_transformer_and_t5_is_qfloat8_and_nothing_else(engine_factory):
    engine = engine_factory("none", "bfloat16", "mask")
    variant, _ = engine.preview_variant([])
    model = variant.model
    linears = {name for name, m in model.named_modules() if isinstance(m, QFloat8Linear)}
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert {"img_in", "txt_in", "final_layer.linear", "distilled_guidance_layer.in_proj"} <= linears
    assert {"distilled_guidance_layer.layers.1.out_layer", "single_blocks.1.linear1"} <= linears
    assert len(linears) == len({block.target for block in module_table(TINY).values()})
    assert model.double_blocks[0].img_attn.norm.query_norm.scale.dtype == torch.bfloat16  # norms stay
    t5 = engine.preview_texts().model
    t5_linears = {name.rsplit(".", 1)[-1] for name, m in t5.named_modules() if isinstance(m, QFloat8Linear)}
    assert t5_linears == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
    assert not any(isinstance(m, torch.nn.Linear) for m in t5.modules())
    assert type(t5.shared) is torch.nn.Embedding and t5.shared.weight.dtype == torch.bfloat16
    wo = t5.encoder.block[0].layer[1].DenseReluDense.wo
    assert wo.scale.dtype == torch.bfloat16, "ai-toolkit's .to(dtype) casts wo, kept float32 on load"
    assert engine.text_encoder is not t5, "the fused path keeps its own T5"


def test_preview_t5_loads_on_the_first_preview_request_only(tiny_sources):
    engine = Engine(EngineConfig(tiny_sources, quantization="none", dtype="float32"))
    engine.load()
    engine.generate([ResolvedPrompt(0, "a dog", "", 64, 64, 1, 4.0, 0)], [])
    assert engine.previews.texts is None
    engine.generate([PROMPT], [], preview=True)
    assert engine.previews.texts is not None
    first = engine.previews.texts
    engine.generate([PROMPT], [], preview=True)
    assert engine.previews.texts is first


@torch.inference_mode()
def test_working_copy_is_the_same_arithmetic(engine_factory):
    engine = engine_factory("none", "bfloat16", "mask")
    variant, _ = engine.preview_variant([])
    copy = preview.working_copy(variant.model)
    assert not any(isinstance(m, QFloat8Linear) for m in copy.modules())
    assert copy.img_in.bias is variant.model.img_in.bias, "biases are shared, not copied"
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(1, 20, TINY.in_channels, generator=gen).to(torch.bfloat16)
    ids = sampling.image_ids(64, 80, torch.bfloat16, torch.device("cpu"))
    txts = tuple(torch.randn(1, n, TINY.context_dim, generator=gen).to(torch.bfloat16) for n in (9, 2))
    pes = tuple(sampling.rope_for(t.shape[1], ids, TINY.axes_dim) for t in txts)
    args = (img, txts, pes, torch.tensor([0.5], dtype=torch.bfloat16), torch.zeros(1))
    assert torch.equal(copy.forward_batch(*args), variant.model.forward_batch(*args))


# -- against ai-toolkit's sampler on the tiny model --------------------------------------------


@pytest.mark.parametrize("text_padding", ["mask", "drop"])
def test_preview_float32_same_pixels_as_ai_toolkit_unmerged(
    engine_factory, reference_preview, lora, text_padding
):
    pairs, path = lora
    expected = reference_image(reference_preview(torch.float32, [(pairs, MULTIPLIER, 1.0)]))
    got = preview_image(engine_factory("none", "float32", text_padding), [loras.lora_input(path, MULTIPLIER)])
    assert got.size == (PROMPT.width, PROMPT.height)
    if text_padding == "mask":  # the reference's own arithmetic
        assert np.array_equal(pixels(got), pixels(expected))
    else:  # padding dropped and both branches batched: the same function, other summation order
        assert psnr(got, expected) >= 60


def test_preview_is_not_the_merged_lora(engine_factory, reference_preview, lora):
    """Merging before quantizing (the fused default's order) gives other pixels: the test fails if
    the preview merges."""
    pairs, path = lora
    stack = [(pairs, MULTIPLIER, 1.0)]
    merged = reference_image(reference_preview(torch.float32, stack, merge=True))
    unmerged = reference_image(reference_preview(torch.float32, stack))
    got = preview_image(engine_factory("none", "float32", "mask"), [loras.lora_input(path, MULTIPLIER)])
    assert psnr(merged, unmerged) < 40
    assert not np.array_equal(pixels(got), pixels(merged))
    assert np.array_equal(pixels(got), pixels(unmerged))


@pytest.mark.parametrize("text_padding", ["mask", "drop"])
def test_preview_bfloat16_matches_ai_toolkit_rounding(engine_factory, reference_preview, lora, text_padding):
    pairs, path = lora
    expected = reference_image(reference_preview(torch.bfloat16, [(pairs, MULTIPLIER, 1.0)]))
    got = preview_image(
        engine_factory("none", "bfloat16", text_padding), [loras.lora_input(path, MULTIPLIER)]
    )
    assert psnr(got, expected) >= 40
    if text_padding == "mask":
        assert np.array_equal(pixels(got), pixels(expected))


def test_several_loras_add_one_after_another(engine_factory, reference_preview, lora, tmp_path):
    pairs, path = lora
    second = loras.random_lora(modules=BLOCK_LINEARS[::3], rank=8, seed=9)
    second_path = loras.write_ai_toolkit(tmp_path / "second.safetensors", second)
    stack = [loras.lora_input(path, 0.7), loras.lora_input(second_path, -0.4)]
    expected = reference_image(reference_preview(torch.float32, [(pairs, 0.7, 1.0), (second, -0.4, 1.0)]))
    engine = engine_factory("none", "float32", "mask")
    generation = engine.generate([PROMPT], stack, preview=True)
    assert np.array_equal(pixels(generation.images[0].image), pixels(expected))
    assert generation.layers_merged == [len(BLOCK_LINEARS), len(BLOCK_LINEARS[::3])]
    assert generation.preview and generation.variant["key"]["quantization"] == "qfloat8-preview"


def test_split_projections_and_alpha_give_the_same_preview(engine_factory, lora, tmp_path):
    """A diffusers file (split q/k/v, proj_mlp: each adds to its rows of the fused output) and a
    kohya file with alpha (scale 1/2, up doubled: exact) render what ai-toolkit's file renders."""
    pairs, path = lora
    engine = engine_factory("none", "float32", "mask")
    expected = pixels(preview_image(engine, [loras.lora_input(path, MULTIPLIER)]))
    for other in (
        loras.write_diffusers(tmp_path / "diffusers.safetensors", pairs),
        loras.write_kohya(tmp_path / "kohya.safetensors", pairs, alpha=2.0),
    ):
        assert np.array_equal(pixels(preview_image(engine, [loras.lora_input(other, MULTIPLIER)])), expected)


def test_new_multiplier_or_lora_rebuilds_nothing_and_copies_no_base_weight(
    tiny_sources, lora, tmp_path, monkeypatch
):
    pairs, path = lora
    engine = Engine(EngineConfig(tiny_sources, quantization="none", dtype="float32", text_padding="mask"))
    engine.load()
    builds = []
    real_build = preview.build_base
    monkeypatch.setattr(preview, "build_base", lambda *a: builds.append(1) or real_build(*a))
    other = loras.write_ai_toolkit(
        tmp_path / "other.safetensors", loras.random_lora(modules=BLOCK_LINEARS, seed=12)
    )
    base_image = pixels(preview_image(engine, []))
    images, hits = [], []
    for stack in ([(path, 1.0)], [(path, 0.5)], [(other, 1.0)], [(path, 0.0)]):
        gen = engine.generate([PROMPT], [loras.lora_input(p, m) for p, m in stack], preview=True)
        images.append(pixels(gen.images[0].image))
        hits.append(gen.variant["cache_hit"])
    assert builds == [1] and hits == [True] * 4
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])
    assert np.array_equal(images[3], base_image), "multiplier 0: exactly the base (ai-toolkit skips it)"

    variant, _ = engine.preview_variant([loras.lora_input(path, 1.0)])
    model = engine.model_for(variant)
    wrapped = model.double_blocks[0].img_attn.qkv
    assert isinstance(wrapped, LoraLinear) and wrapped.base is variant.model.double_blocks[0].img_attn.qkv
    assert model.img_in is variant.model.img_in, "modules without a LoRA are shared"
    assert not any(isinstance(m, LoraLinear) for m in variant.model.modules()), "the cached base is untouched"
    shared = {t.data_ptr() for t in variant.model.buffers()}
    assert {t.data_ptr() for t in model.buffers() if t.dtype == torch.float8_e4m3fn} <= shared


def test_preview_sizes_floor_to_16_and_result_and_png_say_preview(tiny_sources, lora, tmp_path):
    from worker.render import FolderLoras, FolderOutputs, render_request

    _, path = lora
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "l.safetensors").write_bytes(path.read_bytes())
    request = validate_request(
        {
            "model": "chroma",
            "prompts": [{"prompt": "a dog", "width": 95, "height": 64, "sample_steps": 1, "neg": "cat"}],
            "loras": [{"path": "l.safetensors"}],
            "preview": True,
        }
    )
    assert [(p.width, p.height) for p in resolve_prompts(request, preview=True)] == [(80, 64)]
    assert [(p.width, p.height) for p in resolve_prompts(request)] == [(64, 64)]
    engine = Engine(EngineConfig(tiny_sources, quantization="none", dtype="float32", preview=False))
    results = {}
    for name, req in (("asked", request), ("default", request.model_copy(update={"preview": None}))):
        out = tmp_path / name
        results[name] = render_request(
            engine, req, task_id=name, loras=FolderLoras(tmp_path / "loras", 2**30), sink=FolderOutputs(out)
        )
        image = Image.open(out / "0.png")
        params = json.loads(image.text["parameters"])
        assert params["preview"] is results[name].preview
        assert image.size == (results[name].images[0].width, results[name].images[0].height)
    assert results["asked"].preview and results["asked"].images[0].width == 80
    assert not results["default"].preview and results["default"].images[0].width == 64
    assert results["asked"].variant.key.quantization == "qfloat8-preview"
    with pytest.raises(InvalidRequest, match="not snapped"):
        engine.generate([ResolvedPrompt(0, "a dog", "", 80, 64, 1, 4.0, 0)], [])  # 80: preview only


def test_worker_default_preview_applies_to_requests_without_the_field(tiny_sources):
    engine = Engine(EngineConfig(tiny_sources, quantization="none", dtype="float32", preview=True))
    generation = engine.generate([PROMPT], [])
    assert generation.preview and generation.variant["key"]["quantization"] == "qfloat8-preview"
    assert not engine.generate([ResolvedPrompt(0, "a", "", 64, 64, 1, 1.0, 0)], [], preview=False).preview


# -- the text mask's length in the model dtype -------------------------------------------------------


def ai_toolkit_mask(real: int, dtype: torch.dtype) -> torch.Tensor:
    """ai-toolkit: the tokenizer's mask cast with the embeds, ``length = int(mask.sum())``, then
    ``mask[length:length + 1] = 1`` when there is room (``modify_mask_to_attend_padding``)."""
    mask = torch.zeros(1, 512, dtype=dtype)
    mask[0, :real] = 1
    length = int(mask.sum(dim=-1)[0].item())
    if length < 512:
        mask[0, length : length + 1] = 1
    return mask.bool()


@pytest.mark.parametrize("real", [1, 5, 255, 256, 257, 258, 259, 300, 301, 510, 511, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_text_mask_length_is_summed_in_the_model_dtype(real, dtype):
    tokens = torch.zeros(1, 512, dtype=torch.int64)
    tokens[0, :real] = 1
    attended, extra = sampling.attended_tokens(tokens, dtype)
    text = sampling.TextEmbedding(torch.arange(512.0).view(1, 512, 1), attended, extra)
    _, mask = text.for_transformer(drop_padding=False)
    assert torch.equal(mask, ai_toolkit_mask(real, dtype))
    kept, _ = text.for_transformer(drop_padding=True)
    assert kept.flatten().tolist() == mask.nonzero()[:, 1].float().tolist()
    if dtype == torch.bfloat16 and real in (257, 259):  # rounds down (no padding token), up (a gap)
        assert (attended, extra) == ((257, None) if real == 257 else (259, 260))


def test_long_prompt_in_bfloat16_follows_ai_toolkit_mask(engine_factory, reference_preview):
    """Over 256 tokens the bf16 sum rounds: the preview attends what ai-toolkit attended."""
    prompt = " ".join(["a photo of the red car in the city at night"] * 26)  # 286 words, 287 tokens
    p = ResolvedPrompt(0, prompt, "", 64, 64, 2, 1.0, 3)
    engine = engine_factory("none", "bfloat16", "mask")
    text = engine.encode(prompt, preview=True)
    assert (text.attended, text.extra) == (287, 288)
    got = preview_image(engine, [], p)
    assert np.array_equal(pixels(got), pixels(reference_image(reference_preview(torch.bfloat16), p)))


# -- what quanto makes NaN, the preview refuses ----------------------------------------------------


def test_a_base_with_an_all_zero_row_refuses_preview(tmp_path):
    sources = write_tiny_chroma(tmp_path / "tiny")
    state = load_file(sources.transformer)
    state["double_blocks.1.img_mlp.0.weight"][5] = 0
    save_file(state, sources.transformer)
    engine = Engine(EngineConfig(sources, quantization="none", dtype="float32"))
    for _ in range(2):  # refused at once the second time, without building again
        with pytest.raises(InvalidRequest, match="double_blocks.1.img_mlp.0") as caught:
            engine.generate([PROMPT], [], preview=True)
        assert caught.value.field == "preview"
    assert engine.generate([ResolvedPrompt(0, "a", "", 64, 64, 1, 1.0, 0)], []).images  # fused: fine


@torch.inference_mode()
def test_compiled_blocks_run_the_preview_and_a_new_multiplier_compiles_nothing(engine_factory, lora):
    """The working copy with a LoRA attached, through compiled blocks: the eager numbers (to float32
    summation order), and another multiplier reuses the graphs."""
    from torch._dynamo.utils import counters

    from worker.blocks import Blocks

    _, path = lora
    engine = engine_factory("none", "float32", "drop")
    torch._dynamo.reset()
    blocks = Blocks(compile=True)
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(1, 20, TINY.in_channels, generator=gen)
    ids = sampling.image_ids(64, 80, torch.float32, torch.device("cpu"))
    txts = tuple(torch.randn(1, n, TINY.context_dim, generator=gen) for n in (9, 2))
    pes = tuple(sampling.rope_for(t.shape[1], ids, TINY.axes_dim) for t in txts)
    args = (img, txts, pes, torch.tensor([0.5]), torch.zeros(1))
    graphs = []
    for multiplier in (1.0, 0.5):
        variant, _ = engine.preview_variant([loras.lora_input(path, multiplier)])
        model = preview.with_loras(preview.working_copy(variant.model), variant.attached)
        compiled = model.forward_batch(*args, blocks=blocks)
        eager = model.forward_batch(*args)
        assert float((compiled - eager).norm() / eager.norm()) < 1e-5
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[0], f"a new multiplier recompiled: {graphs}"
