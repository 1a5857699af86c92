"""The two kernels a denoising step is made of, alone at the model's shapes: what each speed lever
could win at most.

- GEMMs: every block Linear of one step (both guidance branches: 8192 image rows in the double
  blocks, 8231 rows in the single blocks), in bf16 (the faithful path's working copy), float8
  with row-wise scales (float8-fast) and float8 with one scale per tensor, fast accumulation as
  torchao uses it. Reported per shape and summed over a step's 19 double and 38 single blocks.
- Attention: SDPA per backend at the step's segment length (4133 tokens, 24 heads of 128), q/k/v
  contiguous and as the blocks pass them (views of a token-major buffer), one call per segment and
  two equal segments in one call; and whether this torch has a float8 attention that runs.
- float8-fast's GELU rows kernel (``worker.kernels.gelu_rows_float8``) at both blocks' widths, per
  launch width (warps), against the same rows through the plain ops compiled by inductor.
- An 8-bit attention kernel (``bench/attention8.py``) over both guidance segments of a step's
  single block (4133 + 4098 rows of one token-major buffer), per launch shape and per product
  type, against cuDNN's bf16 attention on the same buffer, with its relative difference from it.
- cuDNN's float8 attention (``bench/cudnn8.py``) over the same two segments: its time with and
  without the quantization of q, k and v, the time to build a plan for a new segment length, and
  its distance and bf16 cuDNN's from exact (float32) attention on rows of two spreads.

    python bench/levers.py --out $OUT [--only gemm,attention,gelu_rows,attention8,cudnn8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from measure import event_ms, rel  # noqa: E402  (bench/measure.py)

from worker.rowwise import quantize_rows  # noqa: E402

HIDDEN, MLP, HEADS, DIM = 3072, 12288, 24, 128
DOUBLE, SINGLE = 19, 38
IMAGE_ROWS, STREAM_ROWS = 8192, 8231  # both branches: 2 x 4096 image tokens; + 37 + 2 text tokens
# (rows, in, out, layers per step)
SHAPES = {
    "double img qkv": (IMAGE_ROWS, HIDDEN, 3 * HIDDEN, DOUBLE),
    "double img proj": (IMAGE_ROWS, HIDDEN, HIDDEN, DOUBLE),
    "double img mlp.0": (IMAGE_ROWS, HIDDEN, MLP, DOUBLE),
    "double img mlp.2": (IMAGE_ROWS, MLP, HIDDEN, DOUBLE),
    "single linear1": (STREAM_ROWS, HIDDEN, 3 * HIDDEN + MLP, SINGLE),
    "single linear2": (STREAM_ROWS, HIDDEN + MLP, HIDDEN, SINGLE),
}


def products(x: torch.Tensor, w: torch.Tensor) -> dict:
    """``x @ w.T`` three ways: bf16, float8 with row-wise scales, float8 with one scale each."""
    xq, xs = quantize_rows(x)  # float8-fast's own row-wise quantization
    wq, ws = quantize_rows(w)
    one = torch.ones((), device=x.device)

    def scaled(a_scale: torch.Tensor, b_scale: torch.Tensor):
        return lambda: torch._scaled_mm(
            xq, wq.t(), a_scale, b_scale, out_dtype=torch.bfloat16, use_fast_accum=True
        )

    return {
        "bf16": lambda: torch.mm(x, w.t()),
        "float8 rowwise": scaled(xs, ws.t()),
        "float8 tensorwise": scaled(one, one),
    }


def gemms(device: torch.device) -> dict:
    out: dict = {}
    step: dict[str, float] = {}
    for name, (m, k, n, count) in SHAPES.items():
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        want = x @ w.t()
        row = {}
        for mode, fn in products(x, w).items():
            try:
                ms = event_ms(fn, runs=20, repeats=3)
            except RuntimeError as exc:
                row[mode] = {"error": str(exc).splitlines()[0][:200]}
                continue
            row[mode] = {"ms": round(ms, 4), "tflops": round(2 * m * k * n / ms / 1e9, 1)}
            if mode == "float8 rowwise":
                row[mode]["rel_vs_bf16"] = round(rel(fn(), want), 5)
            step[mode] = step.get(mode, 0.0) + ms * count
        out[name] = row
        print(name, row, flush=True)
    out["per step, ms"] = {k: round(v, 2) for k, v in step.items()}
    return out


def attention(device: torch.device, tokens: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flop = 4 * tokens * tokens * DIM * HEADS
    out: dict = {}
    dense = [torch.randn(1, HEADS, tokens, DIM, device=device, dtype=torch.bfloat16) for _ in range(3)]
    # As the single block passes them: views of one token-major (rows, 3, heads, dim) buffer.
    buf = torch.randn(tokens, 3, HEADS, DIM, device=device, dtype=torch.bfloat16)
    strided = [buf[:, i].permute(1, 0, 2).unsqueeze(0) for i in range(3)]
    pair = [torch.randn(2, HEADS, tokens, DIM, device=device, dtype=torch.bfloat16) for _ in range(3)]
    ref = F.scaled_dot_product_attention(*dense)
    for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION"):
        with sdpa_kernel(getattr(SDPBackend, backend)):
            for layout, qkv, calls in (
                ("contiguous", dense, 1),
                ("token-major views", strided, 1),
                ("2 segments, one call", pair, 2),
            ):
                try:
                    ms = (
                        event_ms(lambda qkv=qkv: F.scaled_dot_product_attention(*qkv), runs=20, repeats=3)
                        / calls
                    )
                    out[f"{backend} {layout}"] = {"ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 1)}
                except RuntimeError as exc:
                    out[f"{backend} {layout}"] = {"error": str(exc).splitlines()[0][:200]}
    print(out, flush=True)
    # float8 attention: the FA3 route of torch.nn.attention (needs FA3's own package), and SDPA on
    # float8 tensors directly.
    q8, k8, v8 = (t.to(torch.float8_e4m3fn) for t in dense)
    descale = torch.ones(1, HEADS, device=device)
    probes = {}
    try:
        from torch.nn.attention.experimental._scaled_dot_product_attention_quantized import (
            _scaled_dot_product_attention_quantized,
        )

        got = _scaled_dot_product_attention_quantized(
            q8, k8, v8, q_descale=descale, k_descale=descale, v_descale=descale
        )
        probes["quantized API"] = {
            "ms": round(
                event_ms(
                    lambda: _scaled_dot_product_attention_quantized(
                        q8, k8, v8, q_descale=descale, k_descale=descale, v_descale=descale
                    )
                ),
                4,
            ),
            "rel": rel(got, ref),
        }
    except Exception as exc:  # noqa: BLE001  (a probe: any failure is the answer)
        probes["quantized API"] = {
            "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        }
    for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION"):
        try:
            with sdpa_kernel(getattr(SDPBackend, backend)):
                got = F.scaled_dot_product_attention(q8, k8, v8)
            probes[f"float8 SDPA {backend}"] = {"rel": rel(got, ref)}
        except Exception as exc:  # noqa: BLE001
            probes[f"float8 SDPA {backend}"] = {
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            }
    out["float8"] = probes
    print(probes, flush=True)
    return out


def gelu_rows(device: torch.device) -> dict:
    from worker import kernels
    from worker.rowwise import gelu_rows_reference

    out: dict = {}
    raw = torch.randn(STREAM_ROWS, 3 * HIDDEN + MLP, device=device, dtype=torch.bfloat16)
    attn = torch.randn(STREAM_ROWS, HIDDEN, device=device, dtype=torch.bfloat16)
    bias = torch.randn(MLP, device=device, dtype=torch.bfloat16)
    plain = torch.compile(lambda f, s, b: quantize_rows(gelu_rows_reference(f, s, b)))
    for name, first, second in (
        ("single block", attn, raw[:, 3 * HIDDEN :]),
        ("double block", None, raw[:IMAGE_ROWS, 3 * HIDDEN :]),
    ):
        width = (0 if first is None else HIDDEN) + MLP
        moved = second.shape[0] * width * 3  # bf16 read, e4m3 written
        row = {"inductor": round(event_ms(lambda f=first, s=second: plain(f, s, bias), repeats=3), 4)}
        default = kernels.GELU_WARPS
        for warps in (4, 8, 16, 32):
            kernels.GELU_WARPS = warps
            row[f"{warps} warps"] = round(
                event_ms(lambda f=first, s=second: kernels.gelu_rows_float8(f, s, bias), repeats=3), 4
            )
        kernels.GELU_WARPS = default
        best = min(v for k, v in row.items() if k.endswith("warps"))
        row["best_TB_per_s"] = round(moved / best / 1e9, 2)
        out[name] = row
        print(name, row, flush=True)
    return out


def compiled_stats(kernel) -> list:
    """Registers, spills and shared memory of each compiled specialization of a Triton kernel."""
    stats = []
    try:
        for cache in kernel.device_caches.values():
            for compiled in (cache[0] if isinstance(cache, tuple) else cache).values():
                meta = compiled.metadata
                stats.append(
                    {
                        "name": meta.name,
                        "warps": meta.num_warps,
                        "stages": meta.num_stages,
                        "shared": meta.shared,
                        "regs": getattr(compiled, "n_regs", None),
                        "spills": getattr(compiled, "n_spills", None),
                    }
                )
    except Exception as exc:  # noqa: BLE001  (Triton's internals: a probe)
        stats.append({"error": repr(exc)[:200]})
    return stats


def attention8(device: torch.device) -> dict:
    import attention8 as a8  # bench/attention8.py
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from worker.attention import packed_attention
    from worker.kernels import as_heads

    lengths = [4133, 4098]
    flop = sum(4 * n * n * DIM * HEADS for n in lengths)
    heads = torch.randn(sum(lengths), 3, HEADS, DIM, device=device, dtype=torch.bfloat16)
    q, k, v = as_heads(heads).unsqueeze(1).unbind(0)
    pes = tuple(torch.empty(1, 1, n, 1, device=device) for n in lengths)  # only their lengths are read
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        want = packed_attention(q, k, v, pes, None, rotated=True)
        ms = event_ms(lambda: packed_attention(q, k, v, pes, None, rotated=True), runs=20, repeats=3)
    out: dict = {"cudnn bf16": {"ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 1)}}
    parts = a8.quantize_kv(heads, lengths)
    ms = event_ms(lambda: a8.quantize_kv(heads, lengths), runs=20, repeats=3)
    out["k/v quantization alone"] = {
        "ms": round(ms, 4),
        "GB_per_s": round(heads.numel() * 4 / 3 / ms / 1e6, 1),
    }
    default = (a8.BLOCK_M, a8.BLOCK_N, a8.NUM_WARPS, a8.NUM_STAGES)
    products = {
        "int8 qk, e4m3 pv": (True, True),
        "int8 qk, bf16 pv": (True, False),
        "bf16 both": (False, False),
    }
    for shape in ((128, 128, 8, 2), (128, 64, 8, 2), (128, 128, 8, 3), (128, 64, 4, 2), (64, 64, 4, 2)):
        a8.BLOCK_M, a8.BLOCK_N, a8.NUM_WARPS, a8.NUM_STAGES = shape
        for label, (qk_int8, pv_fp8) in products.items():
            name = "{}x{} {} warps {} stages, ".format(*shape) + label
            try:
                got = a8.attend(heads, lengths, *parts, qk_int8=qk_int8, pv_fp8=pv_fp8)
                ms = event_ms(
                    lambda q=qk_int8, p=pv_fp8: a8.attend(heads, lengths, *parts, qk_int8=q, pv_fp8=p),
                    runs=20,
                    repeats=3,
                )
                out[name] = {
                    "kernel alone ms": round(ms, 4),
                    "tflops": round(flop / ms / 1e9, 1),
                    "rel_vs_cudnn": round(rel(got.unsqueeze(0), want), 5),
                }
            except Exception as exc:  # noqa: BLE001  (a launch shape that does not fit is an answer)
                out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            print(name, out[name], flush=True)
    a8.BLOCK_M, a8.BLOCK_N, a8.NUM_WARPS, a8.NUM_STAGES = default
    out["compiled"] = compiled_stats(a8._attention_kernel) + compiled_stats(a8._kv_kernel)
    print(out, flush=True)
    return out


def cudnn8(device: torch.device) -> dict:
    import time

    import cudnn

    lengths = [4133, 4098]
    out: dict = {"cudnn backend": cudnn.backend_version(), "frontend": getattr(cudnn, "__version__", "?")}
    for spread in (1.0, 2.0):  # logits of standard deviation spread^2 (q, k of that spread, d = 128)
        out[f"spread {spread}"] = cudnn8_rows(device, lengths, spread)
        print(spread, out[f"spread {spread}"], flush=True)
    import cudnn8 as c8  # bench/cudnn8.py

    t0 = time.perf_counter()
    c8.plan(4140, HEADS, DIM, device)
    out["plan for a new length s"] = round(time.perf_counter() - t0, 3)

    print(out, flush=True)
    return out


def cudnn8_rows(device: torch.device, lengths: list, spread: float) -> dict:
    import time

    import cudnn8 as c8  # bench/cudnn8.py
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from worker.attention import packed_attention
    from worker.kernels import as_heads

    flop = sum(4 * n * n * DIM * HEADS for n in lengths)
    pes = tuple(torch.empty(1, 1, n, 1, device=device) for n in lengths)  # only their lengths are read
    torch.manual_seed(0)
    heads = (torch.randn(sum(lengths), 3, HEADS, DIM, device=device) * spread).to(torch.bfloat16)
    heads[:, 2] /= spread
    q, k, v = as_heads(heads).unsqueeze(1).unbind(0)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        bf16 = packed_attention(q, k, v, pes, None, rotated=True)
        bf16_ms = event_ms(lambda: packed_attention(q, k, v, pes, None, rotated=True), runs=20, repeats=3)
    exact, start = [], 0
    with sdpa_kernel([SDPBackend.MATH]):
        for n in lengths:
            o = F.scaled_dot_product_attention(
                *as_heads(heads[start : start + n].float()).unsqueeze(1).unbind(0)
            )
            exact.append(o[0].permute(1, 0, 2).reshape(n, -1))
            start += n
    exact = torch.cat(exact)
    bf16 = bf16.reshape(exact.shape)

    t0 = time.perf_counter()
    rows8, sq, sk, sv = c8.quantize_heads(heads)
    got = c8.attend(rows8, lengths, sq, sk, sv)
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    fp8_ms = event_ms(lambda: c8.attend(rows8, lengths, sq, sk, sv), runs=20, repeats=3)
    quant_ms = event_ms(lambda: c8.quantize_heads(heads), runs=20, repeats=3)

    # The kernel alone, no dequantization: q/k/v as the blocks hold them (one token-major buffer)
    # and as three contiguous head-major tensors per segment.
    inv_sv = 1.0 / sv
    o8 = torch.empty(rows8.shape[0], HEADS, DIM, device=device, dtype=torch.float8_e4m3fn)
    segments = [(0, lengths[0]), (lengths[0], lengths[1])]
    token_major = [(rows8[s : s + n], o8[s : s + n], c8.plan(n, HEADS, DIM, device)) for s, n in segments]
    head_major = [
        (
            rows8[s : s + n].permute(1, 2, 0, 3).contiguous(),  # (3, heads, n, dim)
            torch.empty(HEADS, n, DIM, device=device, dtype=o8.dtype),
            c8.plan(n, HEADS, DIM, device, head_major=True),
        )
        for s, n in segments
    ]

    def run(calls):
        for r, o, plan in calls:
            plan(r, sq, sk, sv, o, inv_sv)

    token_ms = event_ms(lambda: run(token_major), runs=20, repeats=3)
    head_ms = event_ms(lambda: run(head_major), runs=20, repeats=3)
    o_round, o_scale = c8.quantize(exact)
    try:  # whether this card's float8 SDPA writes a bf16 output (no e4m3 rounding of O)
        wide = torch.empty(rows8.shape[0], HEADS, DIM, device=device, dtype=torch.bfloat16)
        one = torch.ones(1, 1, 1, 1, device=device)
        wide_plans = [
            (rows8[s : s + n], wide[s : s + n], c8.Float8Attention(n, HEADS, DIM, device, out_bf16=True))
            for s, n in segments
        ]

        def run_wide():
            for r, o, plan in wide_plans:
                plan(r, sq, sk, sv, o, one)

        wide_ms = event_ms(run_wide, runs=20, repeats=3)
        bf16_out = {"ms": round(wide_ms, 4), "vs exact": round(rel(wide.reshape(exact.shape), exact), 5)}
    except Exception as exc:  # noqa: BLE001  (a refusal is the answer)
        bf16_out = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    return {
        "cudnn float8 with a bf16 output": bf16_out,
        "cudnn bf16 ms": round(bf16_ms, 4),
        "cudnn bf16 tflops": round(flop / bf16_ms / 1e9, 1),
        "cudnn float8 ms (with the output's dequantization)": round(fp8_ms, 4),
        "cudnn float8 kernel alone ms, token-major q/k/v": round(token_ms, 4),
        "cudnn float8 kernel alone ms, head-major q/k/v": round(head_ms, 4),
        "cudnn float8 kernel alone tflops (the faster layout)": round(flop / min(token_ms, head_ms) / 1e9, 1),
        "q/k/v quantization ms (torch ops)": round(quant_ms, 4),
        "first call s (two plans built)": round(first_s, 3),
        "bf16 vs exact": round(rel(bf16, exact), 5),
        "float8 vs exact": round(rel(got, exact), 5),
        "float8 vs bf16": round(rel(got, bf16), 5),
        "float8 written by the kernel alone, vs exact": round(
            rel(o8.float() * sv.reshape(()), exact.view(o8.shape)), 5
        ),
        "exact with only its output rounded to e4m3 (one scale), vs exact": round(
            rel(o_round.float() * o_scale.reshape(()), exact), 5
        ),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--tokens", type=int, default=4133)
    ap.add_argument("--only", default="gemm,attention,gelu_rows")
    args = ap.parse_args()
    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"card": torch.cuda.get_device_name(device), "torch": torch.__version__}
    sections = {
        "gemm": lambda: gemms(device),
        "attention": lambda: attention(device, args.tokens),
        "gelu_rows": lambda: gelu_rows(device),
        "attention8": lambda: attention8(device),
        "cudnn8": lambda: cudnn8(device),
    }
    for name in args.only.split(","):
        res[name] = sections[name]()
        (args.out / "levers.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
