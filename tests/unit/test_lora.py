"""docs/sampling.md, "LoRA and float8": LoRA files parse in three layouts, merge exactly, stack,
and fail loudly.

The LoRA files are built in code by ``tests.loras``. The exactness checks merge by hand in
diffusers' module space (``W_d += scale * B_d @ A_d``), where a fused ``qkv`` or ``linear1`` is
split into its projections, and compare with the engine's merge under the checkpoint's names.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

import worker.lora as lora_module
from tasks.errors import InvalidLora, NonFiniteOutput
from tasks.schemas import ResolvedPrompt
from tests import loras
from tests.reference import psnr
from worker.checkpoint import linear_map, load_transformer, original_to_diffusers
from worker.engine import LoraInput
from worker.lora import ParsedLora, merge_into, parse_lora
from worker.tiny import TINY

FIELD = "loras.1"
PROMPT = ResolvedPrompt(0, "sks a photo of a person", "", 64, 64, 3, 4.0, 42)


@pytest.fixture(scope="module")
def base_state(tiny_sources) -> dict[str, Tensor]:
    cfg, state = load_transformer(Path(tiny_sources.transformer))
    assert cfg == TINY and all(t.dtype == torch.float32 for t in state.values())
    return state


def parse(path: Path) -> ParsedLora:
    return parse_lora(path, TINY, field=FIELD)


def merged(state: dict[str, Tensor], stack: list[tuple[ParsedLora, float]]) -> dict[str, Tensor]:
    weights = {name: tensor.clone() for name, tensor in state.items()}
    merge_into(weights, stack)
    return weights


def lora_input(path: Path, multiplier: float = 1.0) -> LoraInput:
    return loras.lora_input(path, multiplier, field=FIELD)


def by_hand_in_diffusers_space(
    state: dict[str, Tensor], pairs: dict[str, loras.Pair], scale: float
) -> dict[str, Tensor]:
    """Convert the base to diffusers names, then ``W_d += scale * B_d @ A_d`` per projection."""
    out = original_to_diffusers(state, TINY)
    tensors = loras.diffusers_tensors(pairs)
    for key, down in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            up = tensors[key.replace("lora_A", "lora_B")]
            out[f"{module}.weight"] += scale * (up.float() @ down.float())
    return out


def assert_same_weights(got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


def changed(a: dict[str, Tensor], b: dict[str, Tensor]) -> set[str]:
    return {name for name in a if not torch.equal(a[name], b[name])}


# -- merge arithmetic ---------------------------------------------------------------------------


def test_merge_in_checkpoint_space_equals_merge_in_diffusers_space(tmp_path, base_state):
    pairs = loras.random_lora()
    path = loras.write_ai_toolkit(tmp_path / "aitk.safetensors", pairs)
    got = original_to_diffusers(merged(base_state, [(parse(path), 1.0)]), TINY)
    expected = by_hand_in_diffusers_space(base_state, pairs, 1.0)
    assert_same_weights(got, expected)

    base = original_to_diffusers(base_state, TINY)
    touched = {f"{name}.weight" for m in loras.MODULES for name, _, _ in loras.diffusers_blocks(TINY, m)}
    assert changed(got, base) == touched  # every split projection, and nothing else (no bias)
    assert "single_transformer_blocks.0.proj_mlp.weight" in touched
    assert "transformer_blocks.0.attn.add_v_proj.weight" in touched
    assert min((got[k] - base[k]).abs().max().item() for k in touched) > 0.05


def test_three_layouts_merge_to_the_same_weights(tmp_path, base_state):
    pairs = loras.random_lora(rank=4)
    aitk = parse(loras.write_ai_toolkit(tmp_path / "aitk.safetensors", pairs))
    diffusers = parse(loras.write_diffusers(tmp_path / "diffusers.safetensors", pairs))
    kohya = parse(loras.write_kohya(tmp_path / "kohya.safetensors", pairs, alpha=2.0))

    split = sum(len(loras.diffusers_blocks(TINY, m)) for m in loras.MODULES)
    assert (aitk.num_layers, diffusers.num_layers, kohya.num_layers) == (16, split, 16)
    assert split == 28  # 3 fused qkv -> 9, 2 linear1 -> 8, 11 whole Linears
    assert {layer.scale for layer in aitk.layers} == {1.0}  # no alpha: alpha = rank
    assert {layer.scale for layer in kohya.layers} == {0.5}  # alpha 2 / rank 4

    expected = merged(base_state, [(aitk, 1.0)])
    assert changed(expected, base_state) == {f"{m}.weight" for m in loras.MODULES}
    assert_same_weights(merged(base_state, [(diffusers, 1.0)]), expected)
    assert_same_weights(merged(base_state, [(kohya, 1.0)]), expected)


def test_kohya_names_map_to_checkpoint_rows(tmp_path):
    pairs = loras.random_lora(modules=("double_blocks.1.txt_attn.qkv", "single_blocks.1.linear1"))
    parsed = parse(loras.write_kohya(tmp_path / "k.safetensors", pairs, alpha=2.0))
    got = {(layer.target, layer.start, layer.stop, layer.scale) for layer in parsed.layers}
    rows = 3 * TINY.hidden_size
    assert got == {
        ("double_blocks.1.txt_attn.qkv", 0, rows, 0.5),
        ("single_blocks.1.linear1", 0, rows + TINY.mlp_hidden, 0.5),
    }


@pytest.mark.parametrize("multiplier", [1.0, 0.5, -1.5, 2.0, -2.0])
@pytest.mark.parametrize("alpha", [None, 2.0, 16.0])
def test_alpha_over_rank_and_multiplier_scale_the_delta(tmp_path, base_state, alpha, multiplier):
    rank = 4
    pairs = loras.random_lora(modules=("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"), rank=rank)
    tensors = loras.ai_toolkit_tensors(pairs)
    if alpha is not None:
        for module in pairs:
            tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(alpha)
    parsed = parse(loras.write(tmp_path / "a.safetensors", tensors))
    scale = (alpha if alpha is not None else rank) / rank
    assert [layer.scale for layer in parsed.layers] == [scale, scale]

    got = merged(base_state, [(parsed, multiplier)])
    for module, pair in pairs.items():
        expected = base_state[f"{module}.weight"] + multiplier * scale * (pair.up @ pair.down)
        torch.testing.assert_close(got[f"{module}.weight"], expected, rtol=1e-6, atol=1e-6)


def test_multiplier_zero_is_the_base_exactly(tmp_path, base_state):
    pairs = loras.random_lora(std=0.5)
    got = merged(base_state, [(parse(loras.write_ai_toolkit(tmp_path / "a.safetensors", pairs)), 0.0)])
    assert not changed(got, base_state)


def test_zero_multiplier_leaves_float16_weights_alone_even_if_the_delta_overflows(tmp_path):
    """fp16 ``B @ A`` of large values is inf; inf * 0 is NaN. A zero multiplier must not touch W."""
    module = "double_blocks.0.img_mlp.0"
    pairs = {module: loras.Pair(torch.full((4, 64), 200.0), torch.full((256, 4), 200.0))}
    parsed = parse(loras.write_ai_toolkit(tmp_path / "big.safetensors", pairs))
    weights = {f"{module}.weight": torch.ones(256, 64, dtype=torch.float16)}
    merge_into(weights, [(parsed, 0.0)])
    assert torch.equal(weights[f"{module}.weight"], torch.ones(256, 64, dtype=torch.float16))


def test_loras_stack_each_with_its_own_multiplier(tmp_path, base_state):
    first = loras.random_lora(seed=1)
    second = loras.random_lora(modules=loras.MODULES[:6] + ("double_blocks.1.txt_attn.qkv",), rank=8, seed=2)
    a = parse(loras.write_ai_toolkit(tmp_path / "a.safetensors", first))
    b = parse(loras.write_diffusers(tmp_path / "b.safetensors", second))

    got = merged(base_state, [(a, 0.7), (b, -0.3)])
    for name, weight in base_state.items():
        module = name.removesuffix(".weight")
        expected = weight.clone()
        if module in first:
            expected += 0.7 * (first[module].up @ first[module].down)
        if module in second:
            expected += -0.3 * (second[module].up @ second[module].down)
        torch.testing.assert_close(got[name], expected, rtol=1e-6, atol=1e-6, msg=name)
    assert changed(got, merged(base_state, [(a, 0.7)])), "the second LoRA must be merged too"
    assert_same_weights(merged(base_state, [(b, -0.3), (a, 0.7)]), got)  # addition commutes


# -- end to end through the engine ----------------------------------------------------------------


def test_lora_changes_the_image_and_multiplier_zero_gives_the_base(engine_factory, tmp_path):
    engine = engine_factory("none", "float32")
    path = loras.write_ai_toolkit(tmp_path / "aitk.safetensors", loras.random_lora(seed=3))
    base = np.asarray(engine.generate([PROMPT], []).images[0].image)
    with_lora = engine.generate([PROMPT], [lora_input(path, 1.0)])
    off = engine.generate([PROMPT], [lora_input(path, 0.0)])
    assert psnr(with_lora.images[0].image, base) < 40
    assert np.array_equal(np.asarray(off.images[0].image), base)
    assert with_lora.layers_merged == [16] and off.layers_merged == [16]


def test_engine_with_lora_matches_reference_merged_in_diffusers_space(engine_factory, tiny_sources, tmp_path):
    from tests.reference import ReferenceChroma

    pairs = loras.random_lora(seed=4)
    path = loras.write_ai_toolkit(tmp_path / "aitk.safetensors", pairs)
    multiplier = 0.8
    ref = ReferenceChroma(tiny_sources, torch.float32)  # a private copy: its weights change here
    tensors = loras.diffusers_tensors(pairs)
    with torch.no_grad():
        for key, down in tensors.items():
            if key.endswith(".lora_A.weight"):
                module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                up = tensors[key.replace("lora_A", "lora_B")]
                ref.transformer.get_parameter(f"{module}.weight").add_(
                    multiplier * (up.float() @ down.float())
                )
    p = PROMPT
    expected = ref(p.prompt, p.width, p.height, p.sample_steps, p.guidance_scale, p.seed)
    engine = engine_factory("none", "float32")
    got = engine.generate([p], [lora_input(path, multiplier)]).images[0].image
    assert psnr(got, expected) >= 60
    base = engine.generate([p], []).images[0].image
    assert psnr(base, expected) < 40, "the LoRA must matter for this comparison to mean anything"


def test_layers_merged_and_order_are_reported_per_lora(engine_factory, tmp_path):
    engine = engine_factory("none", "float32")
    pairs = loras.random_lora(seed=5)
    kohya_pairs = loras.random_lora(modules=loras.MODULES[-3:], seed=6)
    stack = [
        lora_input(loras.write_diffusers(tmp_path / "d.safetensors", pairs), 0.5),
        lora_input(loras.write_ai_toolkit(tmp_path / "a.safetensors", pairs), -1.0),
        lora_input(loras.write_kohya(tmp_path / "k.safetensors", kohya_pairs, alpha=2.0), 1.5),
    ]
    prompt = ResolvedPrompt(0, "a dog", "", 64, 64, 1, 1.0, 0)
    gen = engine.generate([prompt], stack)
    assert gen.layers_merged == [28, 16, 3]
    assert gen.variant["key"]["loras"] == [[lora.sha256, lora.multiplier] for lora in stack]


# -- malformed files ------------------------------------------------------------------------------


def test_corpus_is_large_enough():
    assert len(loras.MALFORMED) >= 14
    assert len({case.name for case in loras.MALFORMED}) == len(loras.MALFORMED)


@pytest.mark.parametrize("case", loras.MALFORMED, ids=lambda case: case.name)
def test_malformed_lora_is_invalid_lora_naming_the_problem(case, tmp_path, engine_factory):
    path = tmp_path / f"{case.name}.safetensors"
    case.build(path)
    with pytest.raises(InvalidLora) as caught:
        parse(path)
    err = caught.value
    assert err.field == FIELD and str(err).startswith(f"{FIELD}: ")
    for fragment in case.expect:
        assert fragment in err.message, (fragment, err.message)

    # The engine refuses it on its own (a local run has no storage layer to check headers first).
    engine = engine_factory("none", "float32")
    cached = len(engine.variants)
    with pytest.raises(InvalidLora) as through_engine:
        engine.generate([PROMPT], [lora_input(path)])
    assert through_engine.value.field == FIELD
    assert through_engine.value.message == err.message
    assert len(engine.variants) == cached


def test_a_pickle_is_never_unpickled(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a LoRA file must never be unpickled")

    for module, name in ((pickle, "loads"), (pickle, "load"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    pickled = tmp_path / "pickled.safetensors"
    pickled.write_bytes(pickle.dumps({"diffusion_model.txt_in.lora_A.weight": torch.zeros(4, 32)}))
    zipped = tmp_path / "torch_save.safetensors"
    with zipped.open("wb") as f:
        torch.serialization.save({"diffusion_model.txt_in.lora_A.weight": torch.zeros(4, 32)}, f)
    for path in (pickled, zipped):
        with pytest.raises(InvalidLora, match="not a readable safetensors file"):
            parse(path)


def test_missing_or_directory_path_is_invalid_lora(tmp_path):
    for path in (tmp_path / "absent.safetensors", tmp_path):
        with pytest.raises(InvalidLora, match="not a readable safetensors file") as caught:
            parse(path)
        assert caught.value.field == FIELD


def test_untrained_lora_with_zero_up_matrix_is_accepted(tmp_path, base_state):
    """A zero ``lora_B`` (PEFT's initialisation) is a real, if useless, LoRA; only keys that match
    nothing are refused as a no-op."""
    pairs = {m: loras.Pair(p.down, torch.zeros_like(p.up)) for m, p in loras.random_lora().items()}
    parsed = parse(loras.write_ai_toolkit(tmp_path / "zero.safetensors", pairs))
    assert parsed.num_layers == 16
    assert not changed(merged(base_state, [(parsed, 1.0)]), base_state)


def test_every_linear_of_the_model_accepts_a_lora(tmp_path, base_state):
    every = tuple(sorted({block.target for block in linear_map(TINY).values()}))
    parsed = parse(loras.write_ai_toolkit(tmp_path / "all.safetensors", loras.random_lora(modules=every)))
    assert parsed.num_layers == len(every)
    assert changed(merged(base_state, [(parsed, 1.0)]), base_state) == {f"{m}.weight" for m in every}


# -- numbers beyond the format: never a black image ---------------------------------------------

MLP = "double_blocks.0.img_mlp.0"  # 64 -> 256 in the tiny model


def overflowing(case: str) -> dict[str, Tensor]:
    """A LoRA whose delta leaves float32: factors of 1e20 (B @ A ~ 4e40), an alpha of 3e38 (scale
    7.5e37 on a delta of 16), or float64 values of 1e300 (infinite once in float32)."""
    rank, (out, inp) = 4, (4 * TINY.hidden_size, TINY.hidden_size)
    value, dtype, alpha = {"factors": (1e20, torch.float32, None), "alpha": (2.0, torch.float16, 3e38)}.get(
        case, (1e300, torch.float64, None)
    )
    tensors = {
        f"diffusion_model.{MLP}.lora_A.weight": torch.full((rank, inp), value, dtype=dtype),
        f"diffusion_model.{MLP}.lora_B.weight": torch.full((out, rank), value, dtype=dtype),
    }
    if alpha is not None:
        tensors[f"diffusion_model.{MLP}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return tensors


@pytest.mark.parametrize("case", ["factors", "alpha", "float64"])
def test_non_finite_merge_is_invalid_lora_naming_the_keys(case, tmp_path, base_state, engine_factory):
    path = loras.write(tmp_path / f"{case}.safetensors", overflowing(case))
    parsed = parse(path)  # every value is finite in the file's own dtype
    with pytest.raises(InvalidLora, match=rf"diffusion_model\.{MLP}\.lora_A\.weight") as caught:
        merged(base_state, [(parsed, 1.0)])
    assert caught.value.field == FIELD and "NaN or infinite" in caught.value.message
    engine = engine_factory("none", "float32")
    cached = len(engine.variants)
    with pytest.raises(InvalidLora, match=rf"diffusion_model\.{MLP}"):
        engine.generate([PROMPT], [lora_input(path)])
    assert len(engine.variants) == cached


@pytest.mark.parametrize("case", ["factors", "alpha", "float64"])
def test_non_finite_unmerged_lora_in_preview_fails_never_renders(case, tmp_path, engine_factory):
    """Unmerged, nothing overflows before the forward: the render fails as non_finite_output (or
    the file as invalid_lora, where its values leave float32 already), never a black image."""
    path = loras.write(tmp_path / f"{case}.safetensors", overflowing(case))
    engine = engine_factory("none", "float32")
    with pytest.raises((NonFiniteOutput, InvalidLora)) as caught:
        engine.generate([PROMPT], [lora_input(path)], preview=True)
    expected = "invalid_lora" if case == "float64" else "non_finite_output"
    assert caught.value.code == expected
    assert caught.value.field == (FIELD if case == "float64" else "prompts.0")


def huge_final_layer(tmp_path, alpha: float | None = None, value: float = 1e18) -> Path:
    """A LoRA finite after the merge whose change to the final layer is ~1e36 times its weights
    (factors of ``value``), or one of ordinary factors with an ``alpha`` of 1e20."""
    module = "final_layer.linear"
    tensors = {
        f"diffusion_model.{module}.lora_A.weight": torch.full((1, TINY.hidden_size), value),
        f"diffusion_model.{module}.lora_B.weight": torch.full((TINY.in_channels, 1), value),
    }
    if alpha is not None:
        tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(alpha)
    return loras.write(tmp_path / "huge.safetensors", tensors)


@pytest.mark.parametrize("alpha, value", [(None, 1e18), (1e20, 0.1)], ids=["factors", "alpha"])
def test_a_finite_merge_far_past_a_loras_scale_is_invalid_lora(alpha, value, tmp_path, engine_factory):
    # Finite weights, yet the render would be one flat image for every prompt and seed.
    path = huge_final_layer(tmp_path, alpha, value)
    engine = engine_factory("none", "float32")
    cached = len(engine.variants)
    with pytest.raises(InvalidLora, match=r"final_layer\.linear.* times its own weights") as caught:
        engine.generate([PROMPT], [lora_input(path)])
    assert caught.value.field == FIELD and len(engine.variants) == cached


def test_a_lora_at_an_ordinary_scale_passes_the_size_check(tmp_path, base_state):
    parsed = parse(loras.write_ai_toolkit(tmp_path / "ok.safetensors", loras.random_lora()))
    for multiplier in (2.0, -2.0):
        merged(base_state, [(parsed, multiplier)])


def test_diverged_latents_fail_the_render_even_when_finite(tmp_path, engine_factory, monkeypatch):
    """Unmerged (preview), nothing is checked before the forward: an alpha of 1e20 leaves the
    latents finite but enormous, one flat image whatever the prompt."""
    engine = engine_factory("none", "float32")
    with pytest.raises(NonFiniteOutput, match=r"the latents reached .* the model diverged") as caught:
        engine.generate(
            [PROMPT], [lora_input(huge_final_layer(tmp_path, alpha=1e20, value=0.1))], preview=True
        )
    assert caught.value.code == "non_finite_output" and caught.value.field == "prompts.0"


def test_non_finite_latents_fail_the_render(tmp_path, engine_factory, monkeypatch):
    """A LoRA finite after the merge (final layer weights ~1e36) whose activations overflow, let
    past the merge's size check."""
    monkeypatch.setattr(lora_module, "MAX_DELTA_RATIO", float("inf"))
    # Content of its own: the variant built past the check stays in the shared engine's cache.
    path = huge_final_layer(tmp_path, value=3e18)
    engine = engine_factory("none", "float32")
    variant, _ = engine.get_variant([lora_input(path)])
    assert torch.isfinite(variant.model.final_layer.linear.weight).all()
    with pytest.raises(NonFiniteOutput, match="the latents hold NaN or infinite values") as caught:
        engine.generate([PROMPT], [lora_input(path)])
    assert caught.value.code == "non_finite_output" and caught.value.field == "prompts.0"


def test_non_finite_pixels_fail_even_when_the_latents_are_finite(engine_factory, monkeypatch):
    """A VAE that overflows (patched here) is caught on the decoded pixels."""
    engine = engine_factory("none", "float32")
    real = engine.vae.decode

    def overflowing_decode(latents, return_dict=False):
        image = real(latents, return_dict=return_dict)[0]
        return (image * float("inf"),)

    monkeypatch.setattr(engine.vae, "decode", overflowing_decode)
    with pytest.raises(NonFiniteOutput, match="decoded pixels"):
        engine.generate([PROMPT], [])


def test_a_file_refused_once_is_refused_again_without_reading_it(tmp_path, engine_factory, monkeypatch):
    engine = engine_factory("none", "float32")
    path = loras.write(
        tmp_path / "sdxl.safetensors", {"lora_unet_down_blocks_0.lora_down.weight": torch.ones(4, 8)}
    )
    reads = []
    real = lora_module.parse_lora

    def counted(*args, **kwargs):
        reads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr("worker.engine.parse_lora", counted)
    fields = []
    for field in ("loras.0", "loras.2"):
        with pytest.raises(InvalidLora, match="match no Chroma|names a Chroma") as caught:
            engine.parse_loras([loras.lora_input(path, 1.0, field=field)])
        fields.append(caught.value.field)
    assert fields == ["loras.0", "loras.2"] and len(reads) == 1


def test_a_file_that_could_not_be_read_is_read_again_next_time(tmp_path, engine_factory):
    # Gone between fetch and parse (another process evicted it): the reading failed, not the bytes.
    engine = engine_factory("none", "float32")
    path = loras.write_ai_toolkit(tmp_path / "ok.safetensors", loras.random_lora())
    lora = lora_input(path)
    away = path.rename(tmp_path / "away.safetensors")
    with pytest.raises(InvalidLora, match="not a readable safetensors file"):
        engine.parse_loras([lora])
    away.rename(path)
    assert engine.parse_loras([lora])[0][0].num_layers > 0


def test_a_merge_error_names_the_field_of_the_request_at_hand(tmp_path, engine_factory):
    engine = engine_factory("none", "float32")
    good = loras.lora_input(
        loras.write_ai_toolkit(tmp_path / "good.safetensors", loras.random_lora()), 1.0, field="loras.0"
    )
    huge = huge_final_layer(tmp_path)
    with pytest.raises(InvalidLora) as first:
        engine.generate([PROMPT], [loras.lora_input(huge, 1.0, field="loras.0")])
    with pytest.raises(InvalidLora) as second:
        engine.generate([PROMPT], [good, loras.lora_input(huge, 1.0, field="loras.1")])
    assert (first.value.field, second.value.field) == ("loras.0", "loras.1")
