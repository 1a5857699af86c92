"""Where one denoising step's time goes: the full-size transformer, random weights, one card.

For each path asked for, builds the fused base variant from random full-size weights held on the
device (no checkpoint written: this measures the transformer alone), runs the compiled blocks the
engine runs, and reports: the first call (compile and first run), the median of ``--runs`` timed
steps (both guidance branches in one pass: one step of the denoising loop minus the scheduler),
and a profile of ``--profile-steps`` steps, its kernels grouped into GEMM, attention, Triton
(fused elementwise and reductions) and other, plus how much of the wall time the card was busy.

    python bench/step_profile.py --out $OUT --paths weight_only,working,fast_working

Paths: ``weight_only`` (float8 weight-only, dequantized per forward), ``working`` (the same
variant's working copy, dequantized once: the engine's default), ``fast`` and ``fast_working``
(float8-fast, without and with the working copy: its weight-only layers dequantized, its row-wise
layers as ``worker.rowwise.Float8RowwiseLinear``, whose inputs the ``*_kernels`` paths quantize in
the kernels that write them), ``bf16`` (no
quantization); ``*_kernels`` runs each block's q/k/v kernel (``worker.kernels``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))

import torch  # noqa: E402
from measure import Clock, sdpa_ms  # noqa: E402  (bench/measure.py)
from weights import random_weights  # noqa: E402  (bench/weights.py)

from worker import sampling  # noqa: E402
from worker.blocks import Blocks  # noqa: E402
from worker.chroma_model import ChromaConfig  # noqa: E402
from worker.variants import BaseWeights, working_copy  # noqa: E402

PATHS = {  # quantization, working copy, the blocks' q/k/v kernels
    "weight_only": ("float8", False, False),
    "working": ("float8", True, False),
    "working_kernels": ("float8", True, True),
    "fast": ("float8-fast", False, False),
    "fast_working": ("float8-fast", True, False),
    "fast_working_kernels": ("float8-fast", True, True),
    "bf16": ("none", False, False),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def random_base(cfg: ChromaConfig, device: torch.device) -> BaseWeights:
    """The benchmark's random weights, held on the card (no checkpoint file)."""
    return BaseWeights(cfg, dict(random_weights(cfg, device)), torch.bfloat16, pin=False)


def category(name: str) -> str:
    low = name.lower()
    if low.startswith(("triton", "_heads_kernel")):  # before "attention": fused names can contain it
        return "triton"
    if any(k in low for k in ("fmha", "flash", "attention", "cudnn", "sdpa")):
        return "attention"
    if any(k in low for k in ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "_mm_", "matmul")):
        return "gemm"
    return "other"


def profile(fn, steps: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
            entry = kernels[event.name]
            entry[0] += event.device_time / 1e3  # ms
            entry[1] += 1
    busy = sum(t for t, _ in kernels.values())
    groups: dict[str, float] = defaultdict(float)
    for name, (ms, _) in kernels.items():
        groups[category(name)] += ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:30]
    return {
        "wall_ms_per_step": round(wall * 1e3 / steps, 2),
        "busy_ms_per_step": round(busy / steps, 2),
        "groups_ms_per_step": {k: round(v / steps, 2) for k, v in sorted(groups.items())},
        "top_kernels": [
            {"name": name[:160], "ms_per_step": round(ms / steps, 3), "calls_per_step": n // steps}
            for name, (ms, n) in top
        ],
    }


def python_profile(profiler: cProfile.Profile, top: int = 60) -> str:
    """Where the first call's wall time goes in Python (compile, autotuning, first launches)."""
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    return text.getvalue()[-12000:]


def attention_layouts(cfg: ChromaConfig, length: int, device: torch.device) -> dict:
    """cuDNN attention time (ms) for q/k/v contiguous vs the strided views the blocks pass."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, dim = cfg.num_heads, cfg.head_dim
    qkv = torch.randn(1, length, 3, heads, dim, device=device, dtype=torch.bfloat16)
    strided = qkv.permute(2, 0, 3, 1, 4)  # what split_heads gives: (B, H, L, D) views
    layouts = {
        "contiguous_bhld": tuple(t.contiguous() for t in strided),
        "qk_contiguous_v_strided": (strided[0].contiguous(), strided[1].contiguous(), strided[2]),
        "all_strided": tuple(strided),
        "blhd_transposed": tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in strided),
    }
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), torch.inference_mode():
        return {name: round(sdpa_ms(q, k, v)[0], 4) for name, (q, k, v) in layouts.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("profile-out"))
    ap.add_argument("--paths", default="weight_only,working,fast_working")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--text", default="37,2", help="attended text tokens: cond,uncond")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--attention", default="cudnn")
    ap.add_argument("--recompile", action="store_true", help="reset and compile the first path again")
    ap.add_argument("--inductor", default="", help="inductor settings, e.g. triton.prefer_nd_tiling=1")
    ap.add_argument("--attention-layouts", action="store_true", help="time SDPA on block layouts")
    ap.add_argument(
        "--profile-first-call", action="store_true", help="cProfile each path's first call (compile time)"
    )
    ap.add_argument("--save-outputs", action="store_true", help="write each path's output to <out>/<path>.pt")
    ap.add_argument("--kernel-launch", default="", help="the q/k/v kernel's rows x warps, e.g. 16x4")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    cfg = ChromaConfig()
    res: dict = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }
    try:
        import torchao

        res["torchao"] = torchao.__version__
    except ImportError:
        pass

    def save() -> None:
        (args.out / "profile.json").write_text(json.dumps(res, indent=1))

    import torch._inductor.config as inductor_config

    for item in [i for i in args.inductor.split(",") if i]:
        key, _, value = item.partition("=")  # e.g. triton.prefer_nd_tiling=1
        *outer, last = key.split(".")
        section = inductor_config
        for name in outer:
            section = getattr(section, name)
        current = getattr(section, last)
        setattr(section, last, bool(int(value)) if isinstance(current, bool) else int(value))
        res.setdefault("inductor", {})[key] = getattr(section, last)
    if args.kernel_launch:
        from worker import kernels

        kernels.BLOCK_ROWS, kernels.NUM_WARPS = (int(n) for n in args.kernel_launch.split("x"))
        res["kernel_launch"] = args.kernel_launch
    if args.attention_layouts:
        res["attention_layouts"] = attention_layouts(cfg, (args.size // 16) ** 2 + 37, device)
        log(f"attention layouts: {res['attention_layouts']}")
        save()

    t0 = time.perf_counter()
    base = random_base(cfg, device)
    log(f"random base weights on the card in {time.perf_counter() - t0:.1f}s")
    lengths = tuple(int(n) for n in args.text.split(","))
    gen = torch.Generator(device).manual_seed(1)
    tokens = (args.size // 16) ** 2
    img = torch.randn(1, tokens, cfg.in_channels, generator=gen, device=device, dtype=torch.bfloat16)
    txts = tuple(
        torch.randn(1, n, cfg.context_dim, generator=gen, device=device, dtype=torch.bfloat16)
        for n in lengths
    )
    ids = sampling.image_ids(args.size, args.size, torch.bfloat16, device)
    pes = tuple(sampling.rope_for(n, ids, cfg.axes_dim) for n in lengths)
    timestep = torch.tensor([0.5], device=device, dtype=torch.bfloat16)
    guidance = torch.zeros(1, device=device)
    outputs = {}

    for path in [p for p in args.paths.split(",") if p]:
        quantization, keep_working, kernels = PATHS[path]
        entry: dict = {"quantization": quantization, "working_copy": keep_working, "kernels": kernels}
        res[path] = entry
        try:
            torch._dynamo.reset()
            t0 = time.perf_counter()
            variant = base.build([], quantization, device)
            model = working_copy(variant) if keep_working else variant
            torch.cuda.synchronize()
            entry["build_s"] = round(time.perf_counter() - t0, 3)
            blocks = Blocks(compile=True, attention=args.attention, kernels=kernels)

            @torch.inference_mode()
            def step(model=model, blocks=blocks):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return model.forward_batch(img, txts, pes, timestep, guidance, blocks=blocks)

            for label in ("first_call_s", "second_call_s"):
                profiler = cProfile.Profile() if args.profile_first_call and label == "first_call_s" else None
                t0 = time.perf_counter()
                if profiler:
                    profiler.enable()
                out = step()
                torch.cuda.synchronize()
                if profiler:
                    profiler.disable()
                entry[label] = round(time.perf_counter() - t0, 2)
                if profiler:
                    entry["first_call_python_profile"] = python_profile(profiler)
            log(f"{path}: first call {entry['first_call_s']}s, second {entry['second_call_s']}s")
            from torch._dynamo.utils import compile_times

            entry["compile_times"] = compile_times(repr="str", aggregate=True)[:3000]
            clock = Clock(device)
            times = [clock.time(step)[0] for _ in range(args.runs)]
            entry["step_ms"] = [round(t * 1e3, 2) for t in times]
            entry["step_ms_median"] = round(statistics.median(times) * 1e3, 2)
            entry["denoise_25_steps_s"] = round(statistics.median(times) * 25, 3)
            entry["profile"] = profile(step, args.profile_steps)
            entry["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            outputs[path] = out.float()
            if args.save_outputs:
                torch.save(out.cpu(), args.out / f"{path}.pt")
            first = next(iter(outputs.values()))
            entry["rel_diff_vs_first_path"] = float((out.float() - first).norm() / first.norm())
            log(
                f"{path}: step {entry['step_ms_median']} ms (25 steps {entry['denoise_25_steps_s']}s), "
                f"groups {entry['profile']['groups_ms_per_step']}, "
                f"busy {entry['profile']['busy_ms_per_step']}"
            )
            if args.recompile and path == args.paths.split(",")[0]:
                torch._dynamo.reset()
                t0 = time.perf_counter()
                step()
                torch.cuda.synchronize()
                entry["recompile_after_reset_s"] = round(time.perf_counter() - t0, 2)
                log(f"{path}: compile again after a reset: {entry['recompile_after_reset_s']}s")
        except Exception as exc:  # keep the other paths' numbers
            import traceback

            entry["error"] = traceback.format_exc()[-3000:]
            log(f"{path} failed: {exc!r}")
        model = variant = step = None  # the next path builds on a clean card
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        save()
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
