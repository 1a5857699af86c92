"""The speed recipe keeps the numerics: batched guidance, per-part variant builds, compiled blocks.

Each lever is checked on the tiny model against the plain path it replaces: both guidance branches
in one pass equal two passes; a variant built block by block equals merging the whole state; the
compiled blocks are shared by every variant and every prompt length and size (no recompile).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import loras
from worker import sampling
from worker.blocks import Blocks
from worker.checkpoint import load_transformer
from worker.lora import merge_into, parse_lora
from worker.variants import BaseWeights


@pytest.fixture(scope="module")
def base(tiny_sources) -> BaseWeights:
    cfg, state = load_transformer(Path(tiny_sources.transformer))
    return BaseWeights(cfg, state, torch.float32, pin=False)


def inputs(cfg, text_lengths: tuple[int, ...], height: int, width: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(1, (height // 16) * (width // 16), cfg.in_channels, generator=gen)
    ids = sampling.image_ids(height, width, torch.float32, torch.device("cpu"))
    txts = tuple(torch.randn(1, n, cfg.context_dim, generator=gen) for n in text_lengths)
    pes = tuple(sampling.rope_for(n, ids, cfg.axes_dim) for n in text_lengths)
    return img, txts, pes, torch.tensor([0.37]), torch.zeros(1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.inference_mode()
def test_batched_guidance_equals_one_pass_per_branch(base):
    model = base.build([], "none", torch.device("cpu"))
    img, txts, pes, t, g = inputs(base.cfg, (9, 2), 64, 96)
    batched = model.forward_batch(img, txts, pes, t, g)
    separate = torch.cat([model(img, txt, pe, t, g) for txt, pe in zip(txts, pes, strict=True)])
    assert batched.shape == separate.shape == (2, img.shape[1], base.cfg.in_channels)
    assert rel(batched, separate) < 1e-5


@torch.inference_mode()
def test_batched_path_is_what_denoise_uses_with_padding_dropped(base):
    model = base.build([], "none", torch.device("cpu"))
    cond = sampling.TextEmbedding(torch.randn(1, 512, base.cfg.context_dim), 7)
    uncond = sampling.TextEmbedding(torch.randn(1, 512, base.cfg.context_dim), 2)
    ids = sampling.image_ids(64, 64, torch.float32, torch.device("cpu"))
    latents = sampling.pack(sampling.initial_noise(3, 64, 64, torch.float32, torch.device("cpu")))
    calls = []

    def batch(*args):
        calls.append(len(args[1]))
        return model.forward_batch(*args)

    out = {}
    for name, fn in (("batched", batch), ("separate", None)):
        sched = sampling.make_scheduler(3, latents.shape[1], torch.device("cpu"))
        out[name] = sampling.denoise(
            model, latents, cond, uncond, 4.0, sched, base.cfg.axes_dim, ids, drop_padding=True, batch=fn
        )
    assert calls == [2, 2, 2], "one pass per step, two segments"
    assert rel(out["batched"], out["separate"]) < 1e-5


def test_variant_built_part_by_part_equals_merging_everything(base, tmp_path):
    path = loras.write_ai_toolkit(tmp_path / "l.safetensors", loras.random_lora(seed=5))
    parsed = parse_lora(path, base.cfg)
    model = base.build([(parsed, 0.6)], "none", torch.device("cpu"))
    expected = {name: t.clone() for name, t in base.state.items()}
    merge_into(expected, [(parsed, 0.6)])
    got = model.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)


@torch.inference_mode()
def test_compiled_blocks_shared_by_variants_lengths_and_sizes(base, tmp_path):
    """One compile per block class; a new variant, prompt length or resolution compiles nothing."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    blocks = Blocks(compile=True)
    path = loras.write_ai_toolkit(tmp_path / "l.safetensors", loras.random_lora(seed=6))
    first = base.build([], "none", torch.device("cpu"))
    second = base.build([(parse_lora(path, base.cfg), 1.0)], "none", torch.device("cpu"))
    graphs = []
    for model, lengths, (h, w) in [
        (first, (7, 2), (64, 64)),
        (second, (7, 2), (64, 64)),  # a new variant
        (second, (12, 2), (64, 64)),  # a new prompt length
        (first, (5, 2), (96, 64)),  # a new resolution
    ]:
        img, txts, pes, t, g = inputs(base.cfg, lengths, h, w)
        got = model.forward_batch(img, txts, pes, t, g, blocks=blocks)
        assert rel(got, model.forward_batch(img, txts, pes, t, g)) < 1e-5
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[-1], f"recompiled: unique graphs went {graphs}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_working_copy_computes_what_float8_weight_only_computes(tiny_sources, dtype):
    """The active variant's dequantized copy: the same numbers as torchao's per-forward dequantize."""
    from worker.variants import DequantizedLinear, is_weight_only_float8, working_copy

    cfg, state = load_transformer(Path(tiny_sources.transformer))
    base = BaseWeights(cfg, state, dtype, pin=False)
    model = base.build([], "float8", torch.device("cpu"))
    copy = working_copy(model)
    assert not any(is_weight_only_float8(p) for p in copy.parameters())
    linears = [m for m in copy.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is DequantizedLinear for m in linears)
    for name, layer in copy.named_modules():
        if isinstance(layer, DequantizedLinear):
            original = model.get_submodule(name)
            assert torch.equal(layer.weight, original.weight.dequantize())
            assert layer.bias is original.bias, "biases are shared, not copied"
    img, txts, pes, t, g = inputs(cfg, (9, 2), 64, 96)
    img, txts = img.to(dtype), tuple(x.to(dtype) for x in txts)
    t = t.to(dtype)
    assert torch.equal(copy.forward_batch(img, txts, pes, t, g), model.forward_batch(img, txts, pes, t, g))
    # A weight different by one float8 step changes the output: the comparison can fail.
    layer = copy.single_blocks[0].linear2
    layer.weight[0, 0] = layer.weight[0, 0] * 1.25 + 0.01
    assert not torch.equal(
        copy.forward_batch(img, txts, pes, t, g), model.forward_batch(img, txts, pes, t, g)
    )


def test_working_copy_leaves_an_unquantized_model_alone(base):
    from worker.variants import working_copy

    plain = base.build([], "none", torch.device("cpu"))
    assert working_copy(plain) is plain


def test_float8_activation_layers_take_bf16_inputs_and_stay_so_in_the_working_copy(base):
    """float8-fast's image-stream layers cast their input to the weights' dtype, so the float8
    matmul quantizes bf16 activations and writes bf16; the working copy keeps them as they are."""
    from worker.chroma_model import CastInputLinear, product
    from worker.variants import DequantizedLinear, working_copy

    layer = torch.nn.Linear(8, 4).to(torch.bfloat16)
    x = torch.randn(3, 8)
    want = layer(x.bfloat16())
    layer.__class__ = CastInputLinear
    got = layer(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)

    model = base.build([], "float8", torch.device("cpu"))
    kept = model.single_blocks[0].linear1
    kept.weight = torch.nn.Parameter(kept.weight.dequantize(), requires_grad=False)  # as if float8-fast
    kept.__class__ = CastInputLinear
    copy = working_copy(model)
    assert type(copy.single_blocks[0].linear1) is CastInputLinear
    assert copy.single_blocks[0].linear1.weight is kept.weight
    assert type(copy.single_blocks[0].linear2) is DequantizedLinear
    raw, bias = product(copy.single_blocks[0].linear1, x.new_zeros(2, kept.in_features))
    assert bias is None and raw.shape == (2, kept.out_features)  # an unquantized weight keeps its bias
