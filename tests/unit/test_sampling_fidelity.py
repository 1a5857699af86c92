"""docs/sampling.md: the engine's image equals ai-toolkit's for the same weights and request.

The end-to-end checks compare against ``tests.reference`` (diffusers' own Chroma transformer with a
boolean mask over all 512 tokens, driven like ai-toolkit's pipeline). The per-fact checks below
name the fact that broke, so a failure says what to look at.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.schemas import ResolvedPrompt
from tests.reference import psnr
from worker import sampling

CASES = [
    ("sks a photo of a person", 64, 64, 42, 4, 4.0),
    ("a red car in the city at night", 96, 64, 7, 3, 1.0),  # guidance <= 1: no CFG
    ("portrait of a woman smiling", 128, 96, 123, 3, 7.5),
    ("", 64, 64, 5, 2, 0.0),
]
GUIDED = [case for case in CASES if case[5] > 1]
NEG = "painting style, blue sky, old"  # words of the tiny tokenizer's vocabulary


def float8_reference(sources, dtype: str):
    """The independent reference quantized as the engine's float8: torchao weight-only on every
    Linear of the transformer and T5."""
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    from tests.reference import ReferenceChroma

    ref = ReferenceChroma(sources, getattr(torch, dtype))
    quantize_(ref.text_encoder, Float8WeightOnlyConfig())
    quantize_(ref.transformer, Float8WeightOnlyConfig())
    return ref


def render(engine, prompt, width, height, seed, steps, guidance, neg=""):
    p = ResolvedPrompt(0, prompt, neg, width, height, steps, guidance, seed)
    return engine.generate([p], []).images[0].image


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}x{c[2]}-g{c[5]}")
@pytest.mark.parametrize("text_padding", ["mask", "drop"])
def test_float32_same_pixels_as_reference(engine_factory, reference_factory, case, text_padding):
    prompt, width, height, seed, steps, guidance = case
    expected = reference_factory(torch.float32)(prompt, width, height, steps, guidance, seed)
    got = render(
        engine_factory("none", "float32", text_padding), prompt, width, height, seed, steps, guidance
    )
    assert got.size == (width, height)
    assert psnr(got, expected) >= 60


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"{c[1]}x{c[2]}-g{c[5]}")
def test_bfloat16_matches_reference_rounding(engine_factory, reference_factory, case):
    prompt, width, height, seed, steps, guidance = case
    expected = reference_factory(torch.bfloat16)(prompt, width, height, steps, guidance, seed)
    got = render(engine_factory("none", "bfloat16", "mask"), prompt, width, height, seed, steps, guidance)
    assert psnr(got, expected) >= 40


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float8_matches_reference_quantized_the_same_way(engine_factory, tiny_sources, dtype):
    """float8 = torchao weight-only on every Linear of transformer and T5, after the merge."""
    ref = float8_reference(tiny_sources, dtype)
    prompt, width, height, seed, steps, guidance = CASES[0]
    expected = ref(prompt, width, height, steps, guidance, seed)
    engine = engine_factory("float8", dtype, "mask")
    got = render(engine, prompt, width, height, seed, steps, guidance)
    assert psnr(got, expected) >= 40
    unquantized = render(engine_factory("none", dtype, "mask"), prompt, width, height, seed, steps, guidance)
    assert psnr(got, unquantized) < 60, "float8 mode must actually quantize"


# -- one check per fact --------------------------------------------------------------------------


def test_t5_runs_without_its_attention_mask(engine_factory):
    engine = engine_factory()
    tokens = engine.tokenizer(["a photo of a dog"], padding="max_length", max_length=512, return_tensors="pt")
    with torch.inference_mode():
        unmasked = engine.text_encoder(tokens.input_ids)[0]
        masked = engine.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    got = sampling.encode_text(engine.tokenizer, engine.text_encoder, "a photo of a dog")
    assert got.embeds.shape == (1, 512, unmasked.shape[-1])
    torch.testing.assert_close(got.embeds, unmasked)
    assert not torch.allclose(got.embeds, masked, atol=1e-4)


def test_one_extra_padding_token_attends(engine_factory):
    engine = engine_factory()
    real = len(engine.tokenizer(["a photo of a dog"]).input_ids[0])  # words + </s>, unpadded
    got = sampling.encode_text(engine.tokenizer, engine.text_encoder, "a photo of a dog")
    assert got.attended == real + 1
    txt, mask = got.for_transformer(drop_padding=False)
    assert mask.dtype == torch.bool, "the transformer mask must be boolean (a float mask is added to scores)"
    assert mask.sum() == real + 1 and mask[0, : real + 1].all()
    dropped, none = got.for_transformer(drop_padding=True)
    assert none is None and dropped.shape[1] == real + 1


def test_uncond_is_the_negative_prompt_and_cfg_only_above_one(engine_factory):
    engine = engine_factory()
    calls = []

    def spy(img, txt, pe, timestep, guidance, mask):
        calls.append((txt.clone(), timestep.clone(), guidance.clone()))
        return torch.zeros_like(img)

    neg = sampling.encode_text(engine.tokenizer, engine.text_encoder, NEG)
    cond = sampling.encode_text(engine.tokenizer, engine.text_encoder, "a dog")
    for guidance, per_step in ((1.0, 1), (1.5, 2)):
        calls.clear()
        p = ResolvedPrompt(0, "a dog", NEG, 64, 64, 3, guidance, 0)
        uncond = engine.unconditional(p)
        assert (uncond is None) == (per_step == 1), "no unconditional branch without guidance"
        latents = torch.zeros(1, 16, 64)
        ids = sampling.image_ids(64, 64, torch.float32, torch.device("cpu"))
        sched = sampling.make_scheduler(3, 16, torch.device("cpu"))
        sampling.denoise(spy, latents, cond, uncond, guidance, sched, engine.cfg.axes_dim, ids)
        assert len(calls) == 3 * per_step
    torch.testing.assert_close(calls[1][0], neg.embeds[:, : neg.attended])  # ai-toolkit: neg, encoded
    for _, _, g in calls:
        assert torch.equal(g, torch.zeros(1)), "distilled guidance input must be 0"


def test_timestep_is_cast_to_latent_dtype_before_dividing():
    seen = []

    def spy(img, txt, pe, timestep, guidance, mask):
        seen.append(timestep)
        return torch.zeros_like(img)

    text = sampling.TextEmbedding(torch.zeros(1, 512, 8, dtype=torch.bfloat16), 2)
    sched = sampling.make_scheduler(7, 16, torch.device("cpu"))
    expected = [t.expand(1).to(torch.bfloat16) / 1000 for t in sched.timesteps]
    latents = torch.zeros(1, 16, 64, dtype=torch.bfloat16)
    ids = sampling.image_ids(64, 64, torch.bfloat16, torch.device("cpu"))
    sampling.denoise(spy, latents, text, None, 1.0, sched, (2, 2, 4), ids)
    assert all(s.dtype == torch.bfloat16 for s in seen)
    assert [s.item() for s in seen] == [e.item() for e in expected]


@pytest.mark.parametrize("steps,tokens", [(25, 4096), (4, 16), (30, 1024)])
def test_scheduler_is_ai_toolkit_config_with_linear_sigmas(steps, tokens):
    sched = sampling.make_scheduler(steps, tokens, torch.device("cpu"))
    mu = 0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256)
    base = np.linspace(1.0, 1 / steps, steps)
    shifted = np.exp(mu) / (np.exp(mu) + (1 / base - 1))
    np.testing.assert_allclose(sched.sigmas[:-1].numpy(), shifted, rtol=1e-5)
    np.testing.assert_allclose(sched.timesteps.numpy(), shifted * 1000, rtol=1e-5)
    assert sched.sigmas[-1] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_from_cpu_generator_in_latent_dtype(dtype):
    noise = sampling.initial_noise(1234, 96, 64, dtype, torch.device("cpu"))
    expected = torch.randn((1, 16, 12, 8), generator=torch.Generator("cpu").manual_seed(1234), dtype=dtype)
    assert noise.dtype == dtype
    assert torch.equal(noise, expected)
    packed = sampling.pack(noise)
    assert packed.shape == (1, 6 * 4, 64)
    assert torch.equal(sampling.unpack(packed, 96, 64), noise)


def test_decode_undoes_scaling_and_shift(engine_factory):
    engine = engine_factory()
    latents = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    image = sampling.decode(engine.vae, latents, 64, 64)
    vae = engine.vae
    with torch.inference_mode():
        raw = vae.decode(
            sampling.unpack(latents, 64, 64) / vae.config.scaling_factor + vae.config.shift_factor
        )[0]
    expected = ((raw * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    assert np.array_equal(np.asarray(image), expected)


def test_same_request_same_pixels(engine_factory):
    engine = engine_factory()
    a = render(engine, "a dog", 64, 64, 9, 2, 4.0)
    b = render(engine, "a dog", 64, 64, 9, 2, 4.0)
    c = render(engine, "a dog", 64, 64, 10, 2, 4.0)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


# -- the negative prompt -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ignoring_engine(tiny_sources):
    """The reference service's behaviour: ``neg`` ignored, the empty prompt always."""
    from worker.engine import Engine, EngineConfig

    engine = Engine(
        EngineConfig(tiny_sources, quantization="none", dtype="float32", negative_prompt="ignore")
    )
    engine.load()
    return engine


@pytest.mark.parametrize("case", GUIDED, ids=lambda c: f"{c[1]}x{c[2]}-g{c[5]}")
@pytest.mark.parametrize("text_padding", ["mask", "drop"])
def test_negative_prompt_float32_same_pixels_as_reference(
    engine_factory, reference_factory, case, text_padding
):
    prompt, width, height, seed, steps, guidance = case
    expected = reference_factory(torch.float32)(prompt, width, height, steps, guidance, seed, NEG)
    engine = engine_factory("none", "float32", text_padding)
    got = render(engine, prompt, width, height, seed, steps, guidance, NEG)
    if text_padding == "mask":  # the reference's own arithmetic
        assert np.array_equal(np.asarray(got), np.asarray(expected))
    assert psnr(got, expected) >= 60
    without = reference_factory(torch.float32)(prompt, width, height, steps, guidance, seed)
    assert psnr(got, without) < 40, "the negative prompt must change this image"


@pytest.mark.parametrize("case", GUIDED, ids=lambda c: f"{c[1]}x{c[2]}-g{c[5]}")
def test_negative_prompt_bfloat16_matches_reference_rounding(engine_factory, reference_factory, case):
    prompt, width, height, seed, steps, guidance = case
    expected = reference_factory(torch.bfloat16)(prompt, width, height, steps, guidance, seed, NEG)
    got = render(
        engine_factory("none", "bfloat16", "mask"), prompt, width, height, seed, steps, guidance, NEG
    )
    assert psnr(got, expected) >= 40


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_negative_prompt_float8_matches_reference_quantized_the_same_way(engine_factory, tiny_sources, dtype):
    ref = float8_reference(tiny_sources, dtype)
    prompt, width, height, seed, steps, guidance = GUIDED[0]
    expected = ref(prompt, width, height, steps, guidance, seed, NEG)
    got = render(engine_factory("float8", dtype, "mask"), prompt, width, height, seed, steps, guidance, NEG)
    assert psnr(got, expected) >= 40
    assert psnr(got, ref(prompt, width, height, steps, guidance, seed)) < 40, "neg must matter here"


def test_negative_prompt_ignore_gives_the_empty_prompt_image(engine_factory, ignoring_engine):
    prompt, width, height, seed, steps, guidance = GUIDED[0]
    honoured = engine_factory("none", "float32", "mask")
    empty = np.asarray(render(honoured, prompt, width, height, seed, steps, guidance, ""))
    ignored = np.asarray(render(ignoring_engine, prompt, width, height, seed, steps, guidance, NEG))
    with_neg = render(honoured, prompt, width, height, seed, steps, guidance, NEG)
    assert np.array_equal(ignored, empty)
    assert psnr(with_neg, Image.fromarray(empty)) < 40
    # Without guidance there is no unconditional branch: neg changes nothing, honoured or not.
    flat = CASES[1]
    assert np.array_equal(
        np.asarray(render(honoured, *flat[:5], flat[5], NEG)),
        np.asarray(render(honoured, *flat[:5], flat[5])),
    )


@pytest.mark.parametrize("setting", ["honor", "ignore"])
def test_negative_prompt_applied_is_in_result_and_png_parameters(tiny_sources, tmp_path, setting):
    from tasks.schemas import validate_request
    from worker.engine import Engine, EngineConfig
    from worker.render import FolderLoras, FolderOutputs, render_request

    engine = Engine(EngineConfig(tiny_sources, quantization="none", dtype="float32", negative_prompt=setting))
    request = validate_request(
        {
            "model": "chroma",
            "prompts": [{"prompt": "a dog", "width": 64, "height": 64, "sample_steps": 1, "neg": NEG}],
        }
    )
    (tmp_path / "loras").mkdir()
    result = render_request(
        engine,
        request,
        task_id="t",
        loras=FolderLoras(tmp_path / "loras", 2**20),
        sink=FolderOutputs(tmp_path),
    )
    params = json.loads(Image.open(tmp_path / "0.png").text["parameters"])
    assert result.negative_prompt == params["negative_prompt"] == setting
    assert result.images[0].neg == params["neg"] == NEG
    stored = json.loads((tmp_path / "result.json").read_text())
    assert stored["negative_prompt"] == setting and stored["preview"] is False
