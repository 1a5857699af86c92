"""The blocks' q/k/v kernels (``worker.kernels``) compute what the plain blocks compute.

On the CPU it runs in Triton's interpreter, in its own process (``kernel_checks.py``), with the
interpreter's float conversions made torch's (round to nearest even, as the GPU rounds): float32
exactly as the torch reference (to the last float32 rounding), bf16 and e4m3 to the same
roundings, the tiny model's output with the kernels as without them. tests/gpu checks on CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.unit.kernel_checks import rel

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checks() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "tests.unit.kernel_checks"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_checks_ran_in_the_interpreter(checks):
    assert checks["interpreter"] and checks["available"]
    assert checks["shape_float32"] == [60, 3, 4, 32]  # (rows, q/k/v, heads, head dim)


@pytest.mark.parametrize("bias", ["kernel", "no_bias"])
def test_kernel_matches_the_reference(checks, bias):
    assert checks[f"{bias}_vs_reference_float32"] < 1e-6
    assert checks[f"{bias}_vs_reference_bfloat16"] < 1e-3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_wrong_inputs_are_seen(checks, dtype):
    """Swapped q/k scales or RoPE rows off by one change the output: the comparison can fail."""
    assert checks[f"swapped_scales_vs_reference_{dtype}"] > 0.05
    assert checks[f"shifted_rope_vs_reference_{dtype}"] > 0.05


def test_joint_kernel_matches_the_reference(checks):
    """The double block's: two streams with their own weights, rows placed per segment."""
    assert checks["joint_shape_float32"] == [60, 3, 4, 32]  # 2 x (text + 20 image rows), 15 + 5 text
    assert checks["joint_vs_reference_float32"] < 1e-6
    assert checks["joint_vs_reference_bfloat16"] < 1e-3
    for dtype in ("float32", "bfloat16"):
        assert checks[f"joint_exchanged_scales_vs_reference_{dtype}"] > 0.05
        assert checks[f"joint_shifted_rows_vs_reference_{dtype}"] > 0.05


def test_model_with_the_kernels_equals_the_plain_blocks(checks):
    assert checks["kernel_calls_per_forward"] == {"qkv_heads": 2, "joint_qkv_heads": 2}  # every block
    assert checks["model_kernels_vs_plain_float32"] < 1e-6  # two guidance segments
    assert checks["kernel_calls_after_one_segment"] == {"qkv_heads": 4, "joint_qkv_heads": 4}
    assert checks["model_one_segment_kernels_vs_plain_float32"] < 1e-6


def test_working_copy_hands_its_bias_to_the_kernels(checks):
    """``DequantizedLinear`` adds the bias after the matmul, so the kernel adds it, same numbers."""
    assert checks["working_copy_bias_in_kernel"] == [True] * 4
    assert checks["working_copy_kernels_vs_plain_float32"] < 1e-6


def test_float8_weights_hand_their_bias_to_the_kernels(checks):
    """torchao's float8 weight-only layers add the bias after the matmul too: same numbers."""
    assert checks["float8_bias_in_kernel"] == [True] * 4
    assert checks["float8_kernels_vs_plain_float32"] < 1e-6


@pytest.mark.parametrize("label", ["cat_bias", "bias", "cat"])
def test_gelu_rows_quantize_as_the_plain_ops(checks, label):
    """float8-fast's GELU rows: e4m3 and a scale per row, as rowwise.quantize_rows of the plain
    GELU: the same bytes but for a rare last-bit difference of the tanh (on CUDA: tests/gpu); the
    values within e4m3's rounding of the unquantized GELU."""
    width = {"cat_bias": 368, "bias": 320, "cat": 368}[label]
    assert checks[f"gelu_rows_shape_{label}"] == [21, width, 21, 1]
    assert checks[f"gelu_rows_scale_{label}"] <= 2**-8
    assert checks[f"gelu_rows_vs_values_{label}"] < 0.04
    assert checks[f"gelu_rows_vs_reference_{label}"] < 2e-3


def test_norm_rows_quantize_as_the_plain_ops(checks):
    """float8-fast's norm rows: layer norm, modulation and quantization as the plain ops, the same
    bytes but for a rare last-bit difference (on CUDA: tests/gpu)."""
    assert checks["norm_rows_shape"] == [21, 96, 21, 1]
    assert checks["norm_rows_scale"] <= 2**-8
    assert checks["norm_rows_vs_reference"] < 2e-3
    assert checks["norm_rows_negated_scale_vs_reference"] > 0.2


@pytest.mark.parametrize("label", ["two", "one"])
def test_8bit_attention_is_its_reference(checks, label):
    """The 8-bit attention lever (bench/attention8.py): int8 q/k rows, e4m3 v rows and probabilities.
    In the interpreter (its conversions made torch's, round to nearest even) the kernel is its torch
    reference to the bit; against exact attention it is a few percent off on random data, whose
    zero-mean values cancel."""
    rows = {"two": 187, "one": 300}[label]
    assert checks[f"attention8_shape_{label}"] == [rows, 64]
    assert checks[f"attention8_vs_reference_{label}"] < 1e-6
    assert 1e-3 < checks[f"attention8_vs_exact_{label}"] < 0.06


def test_8bit_attention_keeps_segments_apart(checks):
    assert checks["attention8_joined_segments_vs_reference"] > 0.2


@pytest.mark.parametrize("block_m, block_n, warps, stages", [(128, 128, 8, 3), (128, 64, 4, 3)])
def test_8bit_attention_compiles_for_hopper(block_m, block_n, warps, stages):
    """The real compiler gives Hopper's int8 and e4m3 warpgroup products (wgmma), no local memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bench.attention8 import _attention_kernel, _kv_kernel

    tensors = {"heads": "*bf16", "k8": "*i8", "k_scales": "*fp32", "v8t": "*fp8e4nv", "v_scales": "*fp32"}
    ints = ("start", "length", "whole", "rows", "v_start", "padded")
    signature = {
        **tensors,
        "out": "*bf16",
        **dict.fromkeys(ints, "i32"),
        **dict.fromkeys(("H", "DIM", "BLOCK_M", "BLOCK_N", "QK_SCALE", "QK_INT8", "PV_FP8"), "constexpr"),
    }
    constants = {"H": 24, "DIM": 128, "BLOCK_M": block_m, "BLOCK_N": block_n, "QK_SCALE": 0.1275}
    constants.update(QK_INT8=True, PV_FP8=True)
    aligned = {
        (i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 10, 11)
    }  # pointers, v_start, padded
    compiled = triton.compile(
        ASTSource(_attention_kernel, signature, constants, attrs=aligned),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": warps, "num_stages": stages},
    )
    ptx = compiled.asm["ptx"]
    assert ".s32.s8.s8" in ptx and ".f32.e4m3.e4m3" in ptx and "wgmma.mma_async" in ptx
    assert "ld.local" not in ptx
    kv = {
        k: v for k, v in signature.items() if k in (*tensors, "start", "length", "rows", "v_start", "padded")
    }
    compiled = triton.compile(
        ASTSource(
            _kv_kernel,
            {**kv, **dict.fromkeys(("H", "DIM", "BLOCK"), "constexpr")},
            {"H": 24, "DIM": 128, "BLOCK": 64},
        ),
        target=GPUTarget("cuda", 90, 32),
    )
    assert "cvt.rn.satfinite.e4m3x2.f32" in compiled.asm["ptx"]


def test_gelu_rows_wrong_inputs_are_seen(checks):
    assert checks["gelu_rows_without_bias_vs_values"] > 0.2
    assert checks["gelu_rows_all_gelu_vs_values"] > 0.2


@pytest.mark.parametrize("first, bias", [(True, True), (False, True), (True, False)])
def test_gelu_rows_kernel_compiles_for_hopper(first, bias):
    """The real compiler accepts the float8-fast kernel at the model's widths: sm_90 PTX with its
    e4m3 conversion, no local memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from worker.kernels import GELU_WARPS, _gelu_rows_kernel

    signature = {
        **dict.fromkeys(("first", "second", "bias"), "*bf16"),
        "out": "*fp8e4nv",
        "scales": "*fp32",
        **dict.fromkeys(("first_stride", "second_stride"), "i32"),
        **dict.fromkeys(("n_first", "n_second", "FIRST_BLOCK", "SECOND_BLOCK", "HAS_BIAS"), "constexpr"),
    }
    constants = {
        "n_first": 3072 if first else 0,
        "n_second": 12288,
        "FIRST_BLOCK": 4096 if first else 1,
        "SECOND_BLOCK": 16384,
        "HAS_BIAS": bias,
    }
    compiled = triton.compile(
        ASTSource(_gelu_rows_kernel, signature, constants),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": GELU_WARPS},
    )
    ptx = compiled.asm["ptx"]
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and "ld.local" not in ptx


def test_joint_rows_place_each_segment_text_then_image():
    from worker.kernels import joint_rows

    img, txt = joint_rows([3, 1], 2, torch.device("cpu"))
    assert img.tolist() == [3, 4, 6, 7]  # [t0 t0 t0 i0 i0 | t1 i1 i1]
    assert txt.tolist() == [0, 1, 2, 5]


@pytest.mark.parametrize("bias, dest", [(True, False), (True, True), (False, False), (False, True)])
def test_kernel_compiles_for_hopper(bias, dest):
    """The real compiler (not the interpreter) accepts the kernel: sm_90 PTX, no local memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from worker.kernels import BLOCK_ROWS, NUM_WARPS, _heads_kernel

    pointers = {"raw": "*bf16", "bias": "*bf16", "q_scale": "*bf16", "k_scale": "*bf16"}
    signature = {
        **pointers,
        "dest": "*i32" if dest else "*bf16",
        "pe": "*fp32",
        "out": "*bf16",
        **dict.fromkeys(("rows", "raw_stride", "heads"), "i32"),
        **dict.fromkeys(("HAS_BIAS", "HAS_DEST", "DIM", "BLOCK", "EPS"), "constexpr"),
    }
    constants = {"HAS_BIAS": bias, "HAS_DEST": dest, "DIM": 128, "BLOCK": BLOCK_ROWS, "EPS": 1e-6}
    compiled = triton.compile(
        ASTSource(_heads_kernel, signature, constants),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": NUM_WARPS},  # the shipped launch shape
    )
    ptx = compiled.asm["ptx"]
    assert "st.global" in ptx and "ld.local" not in ptx


def test_compiled_blocks_keep_the_kernels_in_one_graph(monkeypatch):
    """Traced by torch.compile (the ops' CPU stand-ins are the torch references): no graph break,
    and new prompt lengths and sizes reuse the graphs."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config
    from torch._dynamo.utils import counters

    from tests.unit.kernel_checks import joint_reference
    from worker import blocks as blocks_module
    from worker import chroma_model, kernels, sampling
    from worker.tiny import TINY

    kernels.qkv_heads.register_kernel("cpu")(lambda *a: kernels.reference(*a).contiguous())
    kernels.joint_qkv_heads.register_kernel("cpu")(lambda *a: joint_reference(*a))
    monkeypatch.setattr(fx_config, "use_duck_shape", False)
    torch._dynamo.reset()
    counters.clear()
    blocks = blocks_module.Blocks(compile=True, kernels=True, backend="eager")
    torch.manual_seed(0)
    model = chroma_model.ChromaTransformer(TINY).eval()
    graphs = []
    with torch.inference_mode():
        for (height, width), lengths in [((80, 64), (9, 2)), ((80, 64), (7, 3)), ((96, 64), (12, 5))]:
            ids = sampling.image_ids(height, width, torch.float32, torch.device("cpu"))
            img = torch.randn(1, ids.shape[1], TINY.in_channels)
            txts = tuple(torch.randn(1, n, TINY.context_dim) for n in lengths)
            pes = tuple(sampling.rope_for(n, ids, TINY.axes_dim) for n in lengths)
            args = (img, txts, pes, torch.tensor([0.4]), torch.zeros(1))
            got = model.forward_batch(*args, blocks=blocks)
            assert rel(got, model.forward_batch(*args)) < 1e-5
            graphs.append(counters["stats"]["unique_graphs"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs == [2, 2, 2], f"unique graphs after each shape: {graphs}"
