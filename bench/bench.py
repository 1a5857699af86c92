"""Full-size Chroma benchmark on random weights: reference-style path vs the engine's fast paths.

Builds every component at its real shape with random values (speed does not depend on values):
the 8.9B transformer written as ONE single-file safetensors checkpoint and loaded through the
engine's own loading code (``Engine.load``: checkpoint read, pinned host copy, per-part variant
build), a T5-XXL v1.1 encoder, a FLUX VAE and a tokenizer of T5's vocabulary size. Then, side by
side in one process on one card:

  reference   torchao float8 weight-only, eager, all 512 text tokens with a boolean mask, two
              transformer passes per step (ai-toolkit's inference, op for op)
  faithful    the default: same numerics (float8 weight-only, bf16 activations), padding
              dropped, both guidance branches in one pass, blocks compiled (dynamic token counts),
              the active variant's weights dequantized once (working copy), each block's q/k/v
              preparation as one Triton kernel (worker.kernels)
  fast        quantization "float8-fast" (opt-in, lossy): float8 activations on the image stream
  switch      a new (LoRA, multiplier) variant from the resident base weights, recompiles after it,
              variants resident within the engine's memory budget
  end to end  one request through ``Engine.generate``: encode, denoise, decode, PNG
  faults      out-of-memory inside ``worker.device.guard``; a device-side assert in a subprocess

Seconds are the denoising loop alone (25 steps, guidance 4, 1024x1024 by default), medians of
``--runs`` runs, synchronized. Sections run most wanted first (warm-up, faithful, reference, fast,
switch, end to end, new shapes, faults, ladder); one expected to end after ``--deadline`` seconds
(560 by default, so a run fits a 10-minute command) is skipped and listed. Usage::

    python bench/bench.py --out results/            # full size, CUDA
    python bench/bench.py --scale smoke --out /tmp/s  # full width, 2+2 blocks: a quick check
    python bench/bench.py --scale tiny --device cpu   # the code paths on the CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Cold compiles are part of what we measure: never reuse another run's inductor cache.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))


import torch  # noqa: E402
from weights import PROMPT, SCALES, write_components  # noqa: E402  (bench/weights.py)

from tasks.schemas import ResolvedPrompt  # noqa: E402
from worker import device as dev  # noqa: E402
from worker import sampling  # noqa: E402
from worker.engine import Engine, EngineConfig, LoraInput, Recipe  # noqa: E402
from worker.tiny import write_lora  # noqa: E402
from worker.variants import timed_build  # noqa: E402

LOG: list[str] = []
START = time.perf_counter()


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    LOG.append(line)


# -- measuring ------------------------------------------------------------------------------------


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


def per_forward_check(engine: Engine, reference, variant, cond, size: int, blocks, label: str) -> dict:
    """One forward at mid-schedule: ``variant`` on the fast path vs ``reference`` eager and masked."""
    dev, dtype, cfg = engine.device, engine.dtype, engine.cfg
    gen = torch.Generator("cpu").manual_seed(11)
    n = (size // 16) ** 2
    img = torch.randn(1, n, cfg.in_channels, generator=gen, dtype=dtype).to(dev)
    ids = sampling.image_ids(size, size, dtype, dev)
    ts = torch.tensor([0.6], dtype=dtype, device=dev)
    g = torch.zeros(1, device=dev)
    uncond = engine.encode("")
    out = {}
    with torch.inference_mode(), sampling.autocast_for(dev, dtype):
        ref = []
        for text in (cond, uncond):
            full, mask = text.for_transformer(False)
            ref.append(
                variant.model(img, full, sampling.rope_for(full.shape[1], ids, cfg.axes_dim), ts, g, mask)
            )
        txts = tuple(t.for_transformer(True)[0] for t in (cond, uncond))
        pes = tuple(sampling.rope_for(t.shape[1], ids, cfg.axes_dim) for t in txts)
        dropped = [reference.model(img, t, p, ts, g) for t, p in zip(txts, pes, strict=True)]
        # The engine's module for this variant: its working copy when the recipe keeps one.
        fast = engine.model_for(variant).forward_batch(img, txts, pes, ts, g, blocks=blocks).split(1)
    cfg_ref = ref[1] + 4.0 * (ref[0] - ref[1])
    cfg_fast = fast[1] + 4.0 * (fast[0] - fast[1])
    out[f"{label}_vs_reference_cond"] = rel(fast[0], ref[0])
    out[f"{label}_vs_reference_uncond"] = rel(fast[1], ref[1])
    out[f"{label}_vs_reference_guided"] = rel(cfg_fast, cfg_ref)
    out["eager_dropped_vs_masked_cond"] = rel(dropped[0], ref[0])
    out["finite"] = bool(all(torch.isfinite(t).all() for t in (*ref, *fast)))
    return out


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "chroma-bench")
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--reference-runs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--attention", default="best", help="auto|cudnn|flash|efficient|best (fastest measured)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--skip", default="", help="comma list: faithful,fast,reference,switch,e2e,faults,ladder")
    ap.add_argument(
        "--quantization", choices=["float8", "float8-fast"], default="float8", help="the engine's own mode"
    )
    ap.add_argument(
        "--warm-guidance",
        default="4",
        help="guidance values the warm-up compiles for (the worker's own warm-up also compiles for 1)",
    )
    ap.add_argument(
        "--deadline",
        type=float,
        default=560,
        help="seconds from start: a section expected to end later is skipped (0: no deadline)",
    )
    ap.add_argument("--no-compile", action="store_true", help="eager blocks (memory and variant checks)")
    ap.add_argument(
        "--kernels", default="auto", help="the Triton q/k/v kernels (worker.kernels): auto, on, off"
    )
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    _, _, _, size, steps = SCALES[args.scale]
    size, steps = args.size or size, args.steps or steps
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    clock = Clock(device)
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict = {"scale": args.scale, "size": size, "steps": steps, "guidance": 4.0, "argv": sys.argv}
    table: list[tuple[str, str]] = []

    def save() -> None:
        (args.out / "bench.json").write_text(json.dumps(res, indent=2, default=str))
        (args.out / "bench.log").write_text("\n".join(LOG) + "\n")

    import diffusers
    import torchao
    import transformers

    res["versions"] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "torchao": torchao.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }
    if cuda:
        props = torch.cuda.get_device_properties(device)
        res["card"] = {
            "name": props.name,
            "memory_gib": gib(props.total_memory),
            "sm": f"{props.major}.{props.minor}",
        }
    log(f"versions {res['versions']} card {res.get('card')}")

    # 1. components on disk, then the engine loads them like production does
    seconds, sources = clock.time(lambda: write_components(args.work, args.scale, device))
    res["write_components_s"] = round(seconds, 1)
    log(f"components written in {seconds:.1f}s to {args.work}")
    attention = args.attention
    if cuda and attention == "best":
        kernels = attention_kernels(device, (size // 16) ** 2 + 32)
        res["attention_kernels"] = kernels
        ok = {k: v["ms"] for k, v in kernels.items() if "ms" in v and v.get("rel_vs_flash", 0) < 1e-2}
        attention = min(ok, key=ok.get)
        log(f"attention kernels {kernels} -> {attention}")
    elif attention == "best":
        attention = "auto"
    res["attention"] = attention
    config = EngineConfig(
        sources,
        quantization=args.quantization,
        compile=not args.no_compile,
        attention=attention,
        kernels=args.kernels,
    )
    other = "float8-fast" if args.quantization == "float8" else "float8"
    engine = Engine(config)
    seconds, _ = clock.time(engine.load)
    engine.base.pinned.wait()  # the switch figures are for pinned weights, as a warm worker has
    res["pin_s"] = round(engine.base.pin_seconds, 1)
    res["load_s"] = round(seconds, 1)
    res["load_parts_s"] = {k: round(v, 1) for k, v in engine.load_seconds.items()}
    res["recipe"] = dataclasses.asdict(engine.recipe)
    if cuda:
        res["memory_after_load_gib"] = gib(torch.cuda.memory_allocated(device))
    log(f"engine loaded in {seconds:.1f}s {engine.load_seconds}; recipe {engine.recipe}")
    save()

    p = ResolvedPrompt(0, PROMPT, "", size, size, steps, 4.0, 42)
    one_step = ResolvedPrompt(0, PROMPT, "", size, size, 1, 4.0, 0)
    cond = sampling.encode_text(engine.tokenizer, engine.text_encoder, PROMPT)
    res["text_tokens_attended"] = {"cond": cond.attended, "uncond": engine.encode("").attended}
    st: dict = {}  # what later sections take from earlier ones
    warm_guidance = tuple(float(g) for g in args.warm_guidance.split(","))

    def warmup() -> None:
        """The worker-start warm-up: base variant build + compile (with and without guidance)."""
        st["variant"], _ = engine.get_variant([])  # later sections need it even if compiling fails
        g0 = graphs()
        try:
            seconds, warm = clock.time(
                lambda: engine.warmup([(size, size)], steps=1, guidances=warm_guidance)
            )
        except Exception as exc:  # a kernel choice that does not compile: fall back to PyTorch's
            if engine.recipe.attention == "auto":
                raise
            log(f"warm-up failed with attention={engine.recipe.attention}: {exc!r}; retrying with auto")
            res["attention_fallback"] = repr(exc)[:500]
            torch._dynamo.reset()
            engine.recipe = dataclasses.replace(engine.recipe, attention="auto")
            engine.blocks = engine.recipe.blocks()
            seconds, warm = clock.time(
                lambda: engine.warmup([(size, size)], steps=1, guidances=warm_guidance)
            )
        res["warmup_s"] = round(seconds, 1)
        res["warmup_parts_s"] = {k: round(v, 1) for k, v in warm.items()}
        res["warmup_graphs"] = graphs() - g0
        res["variant_build_base_s"] = round(st["variant"].build_seconds, 3)
        res["variant_bytes_gib"] = gib(st["variant"].nbytes)
        log(f"warm-up {seconds:.1f}s {warm}, {res['warmup_graphs']} graphs compiled")
        from torch._dynamo.utils import compile_times

        res["compile_times"] = compile_times(repr="str", aggregate=True)[:4000]
        table.append(
            (f"warm-up, guidance {args.warm_guidance} (variant build + compile), s", str(res["warmup_s"]))
        )

    def new_shapes() -> None:
        """A new resolution and a new prompt length: no new graphs expected."""
        g0 = graphs()
        other = ResolvedPrompt(0, PROMPT, "", size * 3 // 4, size * 5 // 4, 2, 4.0, 1)
        short = sampling.encode_text(engine.tokenizer, engine.text_encoder, "a red fox")
        seconds, _ = clock.time(lambda: engine.denoise(st["variant"], other, short))
        res["new_size_and_length"] = {
            "size": f"{other.width}x{other.height}",
            "prompt_tokens": short.attended,
            "s_2_steps": round(seconds, 2),
            "new_graphs": graphs() - g0,
        }
        log(f"new size/length {res['new_size_and_length']}")
        table.append(
            ("graphs compiled for a new size + prompt length", str(res["new_size_and_length"]["new_graphs"]))
        )

    label = {"float8": "faithful", "float8-fast": "fast"}

    def variant_for(quantization: str):
        """The engine's own base variant, or one built for the other mode (same compiled blocks)."""
        if quantization == engine.config.quantization:
            return st["variant"]
        if quantization not in st:
            # Built outside the engine's cache: make room first (the switch section may have filled it).
            engine.variants.keep_only(st["variant"].key)
            engine.drop_working_copy()
            engine.release_memory()
            key = engine.variant_key([])
            st[quantization] = timed_build(
                engine.base, type(key)(key.base, quantization, key.dtype, ()), [], device
            )
        return st[quantization]

    def measure_mode(quantization: str) -> None:
        """Seconds per image on the compiled path for one quantization, and its per-forward error."""
        name = label[quantization]
        variant = variant_for(quantization)
        torch.cuda.reset_peak_memory_stats(device)
        g0 = graphs()
        first, _ = clock.time(lambda: engine.denoise(variant, one_step, cond))
        res[f"{name}_first_1_step_s"] = round(first, 1)
        times = time_denoise(engine, clock, variant, p, cond, args.runs)
        res[f"{name}_s"] = [round(t, 3) for t in times]
        res[f"{name}_median_s"] = round(statistics.median(times), 3)
        res[f"{name}_new_graphs"] = graphs() - g0
        res[f"{name}_peak_gib"] = gib(torch.cuda.max_memory_allocated(device))
        log(f"{name} {res[f'{name}_s']} (first 1-step call {first:.1f}s)")
        title = {"faithful": "faithful fast path (default)", "fast": "fast mode float8-fast (opt-in, lossy)"}
        table.append((f"{title[name]}, s/image", f"{res[f'{name}_median_s']:.2f}"))
        table.append((f"peak GPU memory during the {name} loop, GiB", str(res[f"{name}_peak_gib"])))
        check = per_forward_check(engine, variant_for("float8"), variant, cond, size, engine.blocks, name)
        res[f"{name}_check"] = check
        log(f"{name} check {check}")
        worst = max(check[f"{name}_vs_reference_cond"], check[f"{name}_vs_reference_uncond"])
        table.append((f"{name} per-forward rel. diff vs eager fp8 masked", f"{worst:.1e}"))
        if quantization != engine.config.quantization:
            # Built outside the engine's budget: the sections after this one (variants filling the
            # cache, then a render that needs room for its working copy) see the engine's memory.
            st.pop(quantization, None)

    def reference() -> None:
        """The reference's way: eager, 512 masked tokens, two passes per step (same float8 variant)."""
        recipe = Recipe(drop_padding=False, batch_cfg=False, compile=False, attention="auto")
        variant = variant_for("float8")
        time_denoise(engine, clock, variant, one_step, cond, 1, recipe)
        times = time_denoise(engine, clock, variant, p, cond, args.reference_runs, recipe)
        res["reference_s"] = [round(t, 3) for t in times]
        res["reference_median_s"] = round(statistics.median(times), 3)
        log(f"reference-style eager masked {res['reference_s']}")
        table.insert(
            0,
            (
                "reference-style: eager fp8 weight-only, masked, 2 passes, s/image",
                f"{res['reference_median_s']:.2f}",
            ),
        )

    def preview_mode() -> None:
        """Preview mode (ai-toolkit's training sample): the quanto qfloat8 base and T5, a random LoRA
        attached unmerged; the loop timed; how far the fused default is from it (same LoRA)."""
        import contextlib

        import numpy as np

        from worker.variants import module_bytes

        lora_path = args.work / f"lora-r{args.lora_rank}.safetensors"
        write_lora(lora_path, seed=2, rank=args.lora_rank, std=0.01, cfg=engine.cfg)
        sha = hashlib.sha256(lora_path.read_bytes()).hexdigest()
        lora = [LoraInput(lora_path, sha, 1.0)]
        engine.drop_working_copy()
        engine.release_memory()
        out: dict = {}
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        seconds, texts = clock.time(engine.preview_texts)
        out["t5_load_s"], out["t5_gib"] = round(seconds, 2), gib(module_bytes(texts.model))
        seconds, (base, _) = clock.time(lambda: engine.get_variant([], preview=True))
        out["base_build_s"], out["base_gib"] = round(seconds, 2), gib(base.nbytes)
        seconds, (variant, _) = clock.time(lambda: engine.preview_variant(lora))
        out["attach_s"] = round(seconds, 4)
        preview_cond = engine.encode(PROMPT, preview=True)
        out["text_embeds_rel_vs_fused_t5"] = rel(preview_cond.embeds, cond.embeds)
        g0 = graphs()
        first, _ = clock.time(lambda: engine.denoise(variant, one_step, preview_cond))
        times = time_denoise(engine, clock, variant, p, preview_cond, args.runs)
        out["first_1_step_s"], out["s"] = round(first, 1), [round(t, 3) for t in times]
        out["median_s"], out["new_graphs"] = round(statistics.median(times), 3), graphs() - g0
        if cuda:
            out["peak_gib"] = gib(torch.cuda.max_memory_allocated(device))
        g0 = graphs()
        seconds, (other, hit) = clock.time(lambda: engine.preview_variant([LoraInput(lora_path, sha, 0.5)]))
        time_denoise(engine, clock, other, one_step, preview_cond, 1)
        out["new_multiplier"] = {"attach_s": round(seconds, 4), "base_hit": hit, "new_graphs": graphs() - g0}

        # One forward at mid-schedule, the same inputs and text: preview vs the fused default.
        fused, _ = engine.get_variant(lora)
        gen = torch.Generator("cpu").manual_seed(11)
        img = torch.randn(1, (size // 16) ** 2, engine.cfg.in_channels, generator=gen, dtype=engine.dtype)
        ids = sampling.image_ids(size, size, engine.dtype, device)
        txts = tuple(t.for_transformer(True)[0] for t in (cond, engine.encode("")))
        pes = tuple(sampling.rope_for(t.shape[1], ids, engine.cfg.axes_dim) for t in txts)
        args_ = (img.to(device), txts, pes, torch.tensor([0.6], dtype=engine.dtype, device=device))
        outs = {}
        for name, v in (("preview", variant), ("fused", fused)):
            autocast = contextlib.nullcontext() if v.preview else sampling.autocast_for(device, engine.dtype)
            with torch.inference_mode(), autocast:
                model = engine.model_for(v)
                outs[name] = model.forward_batch(*args_, torch.zeros(1, device=device), blocks=engine.blocks)
        guided = {k: o[1] + 4.0 * (o[0] - o[1]) for k, o in outs.items()}
        out["per_forward_rel"] = {
            "cond": rel(outs["fused"][0], outs["preview"][0]),
            "uncond": rel(outs["fused"][1], outs["preview"][1]),
            "guided": rel(guided["fused"], guided["preview"]),
        }
        images = {}
        for name, flag in (("preview", True), ("fused", False)):
            images[name] = np.asarray(
                engine.generate([p], lora, preview=flag).images[0].image, dtype=np.float64
            )
        mse = float(((images["preview"] - images["fused"]) ** 2).mean())
        out["image_psnr_db"] = float("inf") if mse == 0 else round(float(10 * np.log10(255.0**2 / mse)), 2)
        res["preview"] = out
        log(f"preview {out}")
        table.append(("preview mode (quanto qfloat8, LoRA unmerged), s/image", f"{out['median_s']:.2f}"))
        worst = max(out["per_forward_rel"]["cond"], out["per_forward_rel"]["uncond"])
        table.append(("fused default vs preview, per-forward rel. diff (same LoRA)", f"{worst:.1e}"))
        table.append(("fused default vs preview, image PSNR, dB", str(out["image_psnr_db"])))
        if cuda:
            table.append(("peak GPU memory during the preview loop, GiB", str(out["peak_gib"])))
        table.append(("preview T5 (qfloat8) resident, GiB", str(out["t5_gib"])))

    def switch() -> None:
        """A new (LoRA, multiplier) variant from the resident base weights."""
        st.pop(other, None)  # built outside the budget (its own section may have been skipped)
        lora_path = args.work / f"lora-r{args.lora_rank}.safetensors"
        write_lora(lora_path, seed=2, rank=args.lora_rank, std=0.01, cfg=engine.cfg)
        sha = hashlib.sha256(lora_path.read_bytes()).hexdigest()
        st["lora"] = (lora_path, sha)
        builds = []
        for i, mult in enumerate((1.0, 0.75, 0.5, 1.25)):
            lora = LoraInput(lora_path, sha, mult)
            seconds, (v, _) = clock.time(lambda lora=lora: engine.get_variant([lora]))
            builds.append(
                {
                    "multiplier": mult,
                    "get_variant_s": round(seconds, 3),
                    "build_s": round(v.build_seconds, 3),
                    "parsed_file": i == 0,
                }
            )
        res["switch"] = builds
        res["switch_median_build_s"] = round(statistics.median(b["get_variant_s"] for b in builds[1:]), 3)
        table.append(
            ("variant switch (new multiplier, resident base), s", f"{res['switch_median_build_s']:.2f}")
        )
        g0 = graphs()
        seconds, _ = clock.time(
            lambda: engine.denoise(v, ResolvedPrompt(0, PROMPT, "", size, size, 2, 4.0, 0), cond)
        )
        res["switch_first_denoise_2_steps_s"] = round(seconds, 3)
        res["switch_recompiles"] = graphs() - g0
        log(f"switch {builds}; recompiles after switch {res['switch_recompiles']}")
        table.append(("graphs compiled after a variant switch", str(res["switch_recompiles"])))
        mult, counts = 1.5, []
        while engine.variants.evictions == 0 and len(counts) < 16:
            mult -= 0.1
            engine.get_variant([LoraInput(lora_path, sha, round(mult, 2))])
            counts.append(len(engine.variants))
        res["variants"] = {
            "budget_gib": gib(engine.variants.budget_bytes),
            "resident_max": max(counts + [len(engine.variants)]),
            "budget_reached": engine.variants.evictions > 0,
            "evictions": engine.variants.evictions,
            "cache_gib": gib(engine.variants.nbytes),
        }
        if cuda:
            free, total = torch.cuda.mem_get_info(device)
            res["variants"]["device_used_gib"] = gib(total - free)
        log(f"variants {res['variants']}")
        table.append(("variants resident within the default budget", str(res["variants"]["resident_max"])))

    def end_to_end() -> None:
        """One request: encode, denoise, decode, PNG."""
        loras = [LoraInput(*st["lora"], 1.0)] if "lora" in st else []
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        seconds, gen = clock.time(lambda: engine.generate([p], loras))
        image = gen.images[0].image
        png = args.out / "e2e.png"
        image.save(png)
        res["e2e"] = {
            "s": round(seconds, 2),
            "timings": {k: round(v, 3) for k, v in gen.images[0].timings.items()},
            "variant_cache_hit": gen.variant["cache_hit"],
            "png_bytes": png.stat().st_size,
            "size": image.size,
            "variants_cached": gen.variant["variants_cached"],
        }
        if cuda:
            _, total = torch.cuda.mem_get_info(device)
            res["e2e"]["peak_allocated_gib"] = gib(torch.cuda.max_memory_allocated(device))
            res["e2e"]["card_gib"] = gib(total)
        log(f"end to end {res['e2e']}")
        table.append(("one request end to end (variant+encode+denoise+decode), s", f"{seconds:.2f}"))

    def ladder() -> None:
        """Each exact lever without compile, to show what each one gives."""
        for name, recipe in [
            ("eager_drop", Recipe(True, False, False, engine.recipe.attention)),
            ("eager_drop_batch", Recipe(True, True, False, engine.recipe.attention)),
            ("eager_drop_batch_working", Recipe(True, True, False, engine.recipe.attention, True)),
        ]:
            time_denoise(engine, clock, variant_for("float8"), one_step, cond, 1, recipe)
            seconds = time_denoise(engine, clock, variant_for("float8"), p, cond, 1, recipe)[0]
            res[f"{name}_s"] = round(seconds, 3)
            log(f"{name} {seconds:.2f}s")

    sections = [  # most wanted first: a run cut short keeps what it measured
        ("warmup", warmup, True),
        (label[args.quantization], lambda: measure_mode(args.quantization), cuda),
        ("reference", reference, True),
        (label[other], lambda: measure_mode(other), cuda),
        ("preview", preview_mode, True),
        ("switch", switch, True),
        ("e2e", end_to_end, True),
        ("new_shapes", new_shapes, True),
        ("faults", lambda: res.__setitem__("faults", faults(engine, st)), cuda),
        ("ladder", ladder, True),
    ]

    def expected_seconds(name: str) -> float:
        """What a section should take, from what this run has measured so far (rough, generous)."""
        per_image = res.get(f"{label[args.quantization]}_median_s", 6.0)
        if name == label[other]:  # a second compile: about 1.6x the first (bench/RESULTS.md, run E)
            return 1.6 * res.get("warmup_s", 200.0) + (args.runs + 1) * per_image + 20
        if name == "reference":
            return 2.8 * per_image * (args.reference_runs + 1)
        if name == "ladder":
            return 6 * 2 * per_image
        return {"switch": 40.0, "e2e": 20.0, "new_shapes": 15.0, "faults": 40.0}.get(name, 0.0)

    for name, fn, wanted in sections:
        if not wanted or name in skip:
            continue
        if name != "warmup" and "variant" not in st:
            break
        elapsed, expected = time.perf_counter() - START, expected_seconds(name)
        if args.deadline and name != "warmup" and elapsed + expected > args.deadline:
            res.setdefault("skipped_for_time", []).append(name)
            log(f"section {name} skipped: {elapsed:.0f}s + ~{expected:.0f}s > {args.deadline:g}s")
            continue
        try:
            fn()
        except Exception:
            res[f"{name}_error"] = traceback.format_exc()[-3000:]
            log(f"section {name} FAILED:\n{res[f'{name}_error']}")
        engine.release_memory()
        save()

    if "reference_median_s" in res:
        for name in ("faithful", "fast"):
            if f"{name}_median_s" in res:
                table.append(
                    (
                        f"speed-up {name} vs reference",
                        f"{res['reference_median_s'] / res[f'{name}_median_s']:.2f}x",
                    )
                )
    if res.get("skipped_for_time"):
        table.append(("skipped to end by --deadline", ",".join(res["skipped_for_time"])))
    res["total_s"] = round(time.perf_counter() - START, 1)
    res["table"] = table
    save()
    print("\n" + "-" * 78)
    card = res.get("card", {}).get("name", str(device))
    print(f"{card}  torch {torch.__version__}  torchao {torchao.__version__}  {size}x{size} {steps} steps g4")
    for name, value in table:
        print(f"{name:<68} {value:>9}")
    return 0


def faults(engine: Engine, st: dict) -> dict:
    from tasks.errors import OutOfMemory

    for name in ("float8", "float8-fast"):  # variants the benchmark built outside the engine's cache
        st.pop(name, None)
    engine.release_memory()
    out: dict = {}
    before = torch.cuda.memory_allocated()
    try:
        dev.guard(
            engine.device, lambda: torch.empty(1 << 46, dtype=torch.uint8, device=engine.device)
        )  # 64 TiB
        out["oom"] = "no error raised"
    except OutOfMemory as exc:
        out["oom"] = f"{type(exc).__name__}({exc.code}): {exc}"
    out["oom_allocated_gib_before_after"] = [gib(before), gib(torch.cuda.memory_allocated())]
    variant = st["variant"]
    small = ResolvedPrompt(0, "after the oom", "", 512, 512, 2, 4.0, 0)
    rendered = dev.guard(engine.device, lambda: engine.render(variant, small))
    out["render_after_oom"] = f"ok {rendered.image.size}"
    code = (
        "import torch\n"
        "from worker.device import is_device_lost, probe_device\n"
        "try:\n"
        "    torch.zeros(1, device='cuda')[torch.tensor([5], device='cuda')]\n"
        "    torch.cuda.synchronize()\n"
        "    print('no error')\n"
        "except RuntimeError as exc:\n"
        "    print('error:', str(exc).splitlines()[0])\n"
        "    print('is_device_lost:', is_device_lost(exc))\n"
        "    print('probe_device:', probe_device())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    out["device_assert_subprocess"] = proc.stdout.strip().splitlines()
    out["device_assert_rc"] = proc.returncode
    return out


if __name__ == "__main__":
    sys.exit(main())
