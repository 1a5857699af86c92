"""The blocks' q/k/v kernels (``worker.kernels``) compute what the plain blocks compute.

On the CPU it runs in Triton's interpreter, in its own process (``kernel_checks.py``): float32
exactly as the torch reference (to the last float32 rounding), the tiny model's output with the
kernel as without it. The interpreter does not round to bf16 the way a GPU does, so bf16 is held
to the bf16 noise here and checked tightly on CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    assert checks["shape_float32"] == [3, 4, 60, 32]  # (q/k/v, heads, rows, head dim)


@pytest.mark.parametrize("bias", ["kernel", "no_bias"])
def test_kernel_matches_the_reference(checks, bias):
    assert checks[f"{bias}_vs_reference_float32"] < 1e-6
    assert checks[f"{bias}_vs_reference_bfloat16"] < 1e-2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_wrong_inputs_are_seen(checks, dtype):
    """Swapped q/k scales or RoPE rows off by one change the output: the comparison can fail."""
    assert checks[f"swapped_scales_vs_reference_{dtype}"] > 0.05
    assert checks[f"shifted_rope_vs_reference_{dtype}"] > 0.05


def test_joint_kernel_matches_the_reference(checks):
    """The double block's: two streams with their own weights, rows placed per segment."""
    assert checks["joint_shape_float32"] == [3, 4, 60, 32]  # 2 x (text + 20 image rows), 15 + 5 text
    assert checks["joint_vs_reference_float32"] < 1e-6
    assert checks["joint_vs_reference_bfloat16"] < 1e-2
    for dtype in ("float32", "bfloat16"):
        assert checks[f"joint_exchanged_scales_vs_reference_{dtype}"] > 0.05
        assert checks[f"joint_shifted_rows_vs_reference_{dtype}"] > 0.05


def test_model_with_the_kernels_equals_the_plain_blocks(checks):
    assert checks["kernel_calls_per_forward"] == {"qkv_heads": 2, "joint_qkv_heads": 2}  # every block
    assert checks["model_kernels_vs_plain_float32"] < 1e-6  # two guidance segments
    assert checks["model_one_segment_kernels_vs_plain_float32"] < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel runs on CUDA")
@torch.inference_mode()
def test_kernel_on_cuda_rounds_as_the_reference():
    from tests.unit.kernel_checks import joint_inputs, joint_reference, kernel_inputs, rel
    from worker import kernels

    args = [
        a.cuda() if isinstance(a, torch.Tensor) else a
        for a in kernel_inputs(torch.bfloat16, heads=24, dim=128)
    ]
    got, want = kernels.qkv_heads(*args), kernels.reference(*args)
    assert rel(got, want) < 2e-3
    assert (got != want).float().mean() < 0.02  # a last-bit difference where a multiply-add contracts
    joint = [a.cuda() if isinstance(a, torch.Tensor) else a for a in joint_inputs(torch.bfloat16, 24, 128)]
    got, want = kernels.joint_qkv_heads(*joint), joint_reference(*joint)
    assert rel(got, want) < 2e-3
    assert (got != want).float().mean() < 0.02
