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
preview, switch, end to end, new shapes, faults, ladder); one expected to end after ``--deadline``
seconds (560 by default, so a run fits a 10-minute command) is skipped and listed. Usage::

    python bench/bench.py --out results/            # full size, CUDA
    python bench/bench.py --scale smoke --out /tmp/s  # full width, 2+2 blocks: a quick check
    python bench/bench.py --scale tiny --device cpu   # the code paths on the CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Cold compiles are part of what we measure: never reuse another run's inductor cache.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))


import torch  # noqa: E402
from measure import Clock, attention_kernels, gib  # noqa: E402  (bench/measure.py)
from sections import (  # noqa: E402  (bench/sections.py)
    LABEL,
    LOG,
    Run,
    end_to_end,
    faults,
    ladder,
    log,
    measure_mode,
    new_shapes,
    preview_mode,
    reference,
    switch,
    warmup,
)
from weights import PROMPT, SCALES, write_components  # noqa: E402  (bench/weights.py)

from tasks.schemas import ResolvedPrompt  # noqa: E402
from worker.engine import Engine, EngineConfig  # noqa: E402

START = time.perf_counter()


def parse_args() -> argparse.Namespace:
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
    ap.add_argument(
        "--skip",
        default="",
        help="comma list: faithful,fast,reference,preview,switch,e2e,new_shapes,faults,ladder",
    )
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
    return ap.parse_args()


def main() -> int:
    args = parse_args()
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
    cond = engine.encode(PROMPT)
    res["text_tokens_attended"] = {"cond": cond.attended, "uncond": engine.encode("").attended}
    warm_guidance = tuple(float(g) for g in args.warm_guidance.split(","))
    run = Run(args, engine, clock, device, size, p, one_step, cond, res, table, warm_guidance)
    other = run.other
    sections = [  # most wanted first: a run cut short keeps what it measured
        ("warmup", warmup, True),
        (LABEL[args.quantization], partial(measure_mode, quantization=args.quantization), cuda),
        ("reference", reference, True),
        (LABEL[other], partial(measure_mode, quantization=other), cuda),
        ("preview", preview_mode, True),
        ("switch", switch, True),
        ("e2e", end_to_end, True),
        ("new_shapes", new_shapes, True),
        ("faults", faults, cuda),
        ("ladder", ladder, True),
    ]
    for name, fn, wanted in sections:
        if not wanted or name in skip:
            continue
        if name != "warmup" and "variant" not in run.st:
            break
        elapsed, expected = time.perf_counter() - START, expected_seconds(name, run)
        if args.deadline and name != "warmup" and elapsed + expected > args.deadline:
            res.setdefault("skipped_for_time", []).append(name)
            log(f"section {name} skipped: {elapsed:.0f}s + ~{expected:.0f}s > {args.deadline:g}s")
            continue
        try:
            fn(run)
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


def expected_seconds(name: str, run: Run) -> float:
    """What a section should take, from what this run has measured so far (rough, generous)."""
    res, args, other = run.res, run.args, run.other
    per_image = res.get(f"{LABEL[args.quantization]}_median_s", 6.0)
    if name == LABEL[other]:  # a second compile: about 1.6x the first (bench/RESULTS.md, run E)
        return 1.6 * res.get("warmup_s", 200.0) + (args.runs + 1) * per_image + 20
    if name == "reference":
        return 2.8 * per_image * (args.reference_runs + 1)
    if name == "ladder":
        return 6 * 2 * per_image
    if name == "preview":  # a quanto T5 and base to load and build, then the loop and two images
        return (args.runs + 4) * per_image + 60
    return {"switch": 40.0, "e2e": 20.0, "new_shapes": 15.0, "faults": 40.0}.get(name, 0.0)


if __name__ == "__main__":
    sys.exit(main())
