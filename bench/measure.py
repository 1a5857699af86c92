"""What the benchmarks time with: a clock synchronized with the card, CUDA-event timings, SDPA alone
per backend, the denoising loop timed, relative differences, sizes in GiB and the count of compiled
graphs.

bench.py, step_profile.py and kernel_bench.py import it.
"""

from __future__ import annotations

import statistics
import time

import torch


class Clock:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn) -> tuple[float, object]:
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out


def graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def gib(n: float) -> float:
    return round(n / 2**30, 2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def event_ms(fn, runs: int = 20, repeats: int = 1) -> float:
    """Milliseconds of one call of ``fn`` on the card: after 3 warm-up calls, the median over
    ``repeats`` of the mean of ``runs`` back-to-back calls, timed with CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(runs):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / runs)
    return statistics.median(times)


def sdpa_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: int = 20) -> tuple[float, torch.Tensor]:
    """Mean milliseconds of one SDPA call under the backend chosen around it, and its output."""
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return event_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), runs), out


def attention_kernels(device: torch.device, tokens: int) -> dict:
    """SDPA alone at the fast path's shape (24 heads of 128), each backend that runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, 24, tokens, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    flop = 4 * tokens * tokens * 128 * 24
    out: dict = {}
    flash_ref = None
    for name, backend in [
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ]:
        try:
            with sdpa_kernel(backend):
                ms, ref = sdpa_ms(q, k, v)
            out[name] = {"ms": round(ms, 3), "tflops": round(flop / ms / 1e9, 1)}
            if flash_ref is None:
                flash_ref = ref
            else:
                out[name]["rel_vs_flash"] = rel(ref, flash_ref)
        except RuntimeError as exc:
            out[name] = {"error": str(exc).splitlines()[0][:200]}
    return out


def time_denoise(engine, clock, variant, p, cond, runs, recipe=None) -> list[float]:
    return [clock.time(lambda: engine.denoise(variant, p, cond, recipe=recipe))[0] for _ in range(runs)]
