"""bench.py's sections, each a function of the ``Run`` it measures; most wanted first in bench.py.

  warmup       the worker-start warm-up: base variant build + compile
  measure_mode seconds per image on the compiled path for one quantization, its per-forward error
  reference    the reference's way: eager, 512 masked tokens, two passes per step
  preview_mode ai-toolkit's training sample: quanto qfloat8 base and T5, the LoRA unmerged
  switch       a new (LoRA, multiplier) variant from the resident base weights; variants resident
  end_to_end   one request through ``Engine.generate``
  new_shapes   a new resolution and prompt length: no new graphs expected
  faults       out of memory inside ``worker.device.guard``; a device-side assert in a subprocess
  ladder       each exact lever without compile

Each writes what it measured into ``run.res`` and its headline into ``run.table``; ``run.st`` holds
what later sections take from earlier ones.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from measure import Clock, gib, graphs, rel, time_denoise
from weights import PROMPT

from tasks.schemas import ResolvedPrompt
from worker import device as dev
from worker import sampling
from worker.engine import Engine, LoraInput, Recipe
from worker.sampling import TextEmbedding
from worker.tiny import write_lora
from worker.variants import module_bytes, timed_build

ROOT = Path(__file__).resolve().parents[1]
LABEL = {"float8": "faithful", "float8-fast": "fast"}
LOG: list[str] = []


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    LOG.append(line)


@dataclasses.dataclass
class Run:
    """What the sections share: the engine, the prompts timed, and what each section has measured."""

    args: argparse.Namespace
    engine: Engine
    clock: Clock
    device: torch.device
    size: int
    p: ResolvedPrompt  # the timed request: size x size, the run's steps, guidance 4
    one_step: ResolvedPrompt  # one step of it: compiles and warms up outside the timed loop
    cond: TextEmbedding  # PROMPT, encoded
    res: dict
    table: list[tuple[str, str]]
    warm_guidance: tuple[float, ...]  # guidance values the warm-up compiles for
    st: dict = dataclasses.field(default_factory=dict)  # what later sections take from earlier ones

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def other(self) -> str:
        """The quantization the engine was not loaded with."""
        return "float8-fast" if self.args.quantization == "float8" else "float8"


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


def warmup(run: Run) -> None:
    """The worker-start warm-up: base variant build + compile (with and without guidance)."""
    args, engine, clock, res, table, st = run.args, run.engine, run.clock, run.res, run.table, run.st
    size, warm_guidance = run.size, run.warm_guidance
    st["variant"], _ = engine.get_variant([])  # later sections need it even if compiling fails
    g0 = graphs()
    try:
        seconds, warm = clock.time(lambda: engine.warmup([(size, size)], steps=1, guidances=warm_guidance))
    except Exception as exc:  # a kernel choice that does not compile: fall back to PyTorch's
        if engine.recipe.attention == "auto":
            raise
        log(f"warm-up failed with attention={engine.recipe.attention}: {exc!r}; retrying with auto")
        res["attention_fallback"] = repr(exc)[:500]
        torch._dynamo.reset()
        engine.recipe = dataclasses.replace(engine.recipe, attention="auto")
        engine.blocks = engine.recipe.blocks()
        seconds, warm = clock.time(lambda: engine.warmup([(size, size)], steps=1, guidances=warm_guidance))
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


def new_shapes(run: Run) -> None:
    """A new resolution and a new prompt length: no new graphs expected."""
    engine, clock, res, table, st, size = run.engine, run.clock, run.res, run.table, run.st, run.size
    g0 = graphs()
    other = ResolvedPrompt(0, PROMPT, "", size * 3 // 4, size * 5 // 4, 2, 4.0, 1)
    short = engine.encode("a red fox")
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


def variant_for(run: Run, quantization: str):
    """The engine's own base variant, or one built for the other mode (same compiled blocks)."""
    engine, st, device = run.engine, run.st, run.device
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


def measure_mode(run: Run, quantization: str) -> None:
    """Seconds per image on the compiled path for one quantization, and its per-forward error."""
    args, engine, clock, res, table, device = run.args, run.engine, run.clock, run.res, run.table, run.device
    p, one_step, cond, size = run.p, run.one_step, run.cond, run.size
    name = LABEL[quantization]
    variant = variant_for(run, quantization)
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
    check = per_forward_check(engine, variant_for(run, "float8"), variant, cond, size, engine.blocks, name)
    res[f"{name}_check"] = check
    log(f"{name} check {check}")
    worst = max(check[f"{name}_vs_reference_cond"], check[f"{name}_vs_reference_uncond"])
    table.append((f"{name} per-forward rel. diff vs eager fp8 masked", f"{worst:.1e}"))
    if quantization != engine.config.quantization:
        # Built outside the engine's budget: the sections after this one (variants filling the
        # cache, then a render that needs room for its working copy) see the engine's memory.
        run.st.pop(quantization, None)


def reference(run: Run) -> None:
    """The reference's way: eager, 512 masked tokens, two passes per step (same float8 variant)."""
    args, engine, clock, res, table = run.args, run.engine, run.clock, run.res, run.table
    p, one_step, cond = run.p, run.one_step, run.cond
    recipe = Recipe(drop_padding=False, batch_cfg=False, compile=False, attention="auto")
    variant = variant_for(run, "float8")
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


def bench_lora(run: Run) -> tuple[Path, str]:
    """The random LoRA the sections share (path, sha256), written once per run."""
    if "lora" not in run.st:
        path = run.args.work / f"lora-r{run.args.lora_rank}.safetensors"
        write_lora(path, seed=2, rank=run.args.lora_rank, std=0.01, cfg=run.engine.cfg)
        run.st["lora"] = (path, hashlib.sha256(path.read_bytes()).hexdigest())
    return run.st["lora"]


def preview_mode(run: Run) -> None:
    """Preview mode (ai-toolkit's training sample): the quanto qfloat8 base and T5, a random LoRA
    attached unmerged; the loop timed; how far the fused default is from it (same LoRA)."""
    import numpy as np

    args, engine, clock, res, table, device = run.args, run.engine, run.clock, run.res, run.table, run.device
    p, one_step, cond, size, cuda = run.p, run.one_step, run.cond, run.size, run.cuda
    lora_path, sha = bench_lora(run)
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
        images[name] = np.asarray(engine.generate([p], lora, preview=flag).images[0].image, dtype=np.float64)
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


def switch(run: Run) -> None:
    """A new (LoRA, multiplier) variant from the resident base weights."""
    engine, clock, res, table, st = run.engine, run.clock, run.res, run.table, run.st
    cond, size, cuda, device = run.cond, run.size, run.cuda, run.device
    st.pop(run.other, None)  # built outside the budget (its own section may have been skipped)
    lora_path, sha = bench_lora(run)
    builds = []
    for mult in (1.0, 0.75, 0.5, 1.25):
        lora = LoraInput(lora_path, sha, mult)
        seconds, (v, hit) = clock.time(lambda lora=lora: engine.get_variant([lora]))
        # The first multiplier parses the file, unless the preview section built that variant.
        builds.append(
            {
                "multiplier": mult,
                "get_variant_s": round(seconds, 3),
                "build_s": round(v.build_seconds, 3),
                "cache_hit": hit,
            }
        )
    res["switch"] = builds
    res["switch_median_build_s"] = round(statistics.median(b["get_variant_s"] for b in builds[1:]), 3)
    table.append(("variant switch (new multiplier, resident base), s", f"{res['switch_median_build_s']:.2f}"))
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


def end_to_end(run: Run) -> None:
    """One request: encode, denoise, decode, PNG."""
    args, engine, clock, res, table, st = run.args, run.engine, run.clock, run.res, run.table, run.st
    p, cuda, device = run.p, run.cuda, run.device
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


def ladder(run: Run) -> None:
    """Each exact lever without compile, to show what each one gives."""
    engine, clock, res, p, one_step, cond = run.engine, run.clock, run.res, run.p, run.one_step, run.cond
    for name, recipe in [
        ("eager_drop", Recipe(True, False, False, engine.recipe.attention)),
        ("eager_drop_batch", Recipe(True, True, False, engine.recipe.attention)),
        ("eager_drop_batch_working", Recipe(True, True, False, engine.recipe.attention, True)),
    ]:
        time_denoise(engine, clock, variant_for(run, "float8"), one_step, cond, 1, recipe)
        seconds = time_denoise(engine, clock, variant_for(run, "float8"), p, cond, 1, recipe)[0]
        res[f"{name}_s"] = round(seconds, 3)
        log(f"{name} {seconds:.2f}s")


def faults(run: Run) -> None:
    """Out of memory inside ``worker.device.guard`` and a render after it; a device-side assert in a
    subprocess, as the worker would see it."""
    from tasks.errors import OutOfMemory

    engine, st = run.engine, run.st
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
    run.res["faults"] = out
