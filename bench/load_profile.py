"""Where a worker's load goes, and when the base weights are page-locked.

Two host-side jobs overlap at a worker's start: page-locking the 17.8 GB of base weights (a
background thread, ``BaseWeights.start_pinning``) and loading T5 and the VAE onto the card. Each
run here is a fresh process, as a pool process starts: ``Engine.load``, the base variant, an eager
warm-up render (1024x1024, 2 steps, guidance 4 and 1: work on the card while the page-locking may
still run), then the wait until the weights are pinned. Orders:

- ``pin-first``: it starts when the base weights are read, before T5 loads (``Engine.load``'s
  order);
- ``pin-after``: it starts once ``Engine.load`` has returned (T5 and the VAE on the card).

Then, in a fresh process with nothing else loading, T5 and the VAE step by step: the worker's
way (``from_pretrained`` on the host, the copy to the card, ``quantize_float8``) and T5's files
read straight onto the card into a model built on the meta device, with whether the two encode a
prompt to the same bits.

Runs alternate between the orders. The components are written first when ``--work`` lacks them
(bench/weights.py), so the files are in the page cache, as on a node that has read them before.

    python bench/load_profile.py --work /tmp/chroma-bench --out $OUT [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

ORDERS = ("pin-first", "pin-after")


def child(work: Path, order: str, scale: str) -> dict:
    import torch
    from weights import write_components  # bench/weights.py

    from worker.engine import Engine, EngineConfig
    from worker.variants import BaseWeights

    start_pinning = BaseWeights.start_pinning
    if order == "pin-after":
        BaseWeights.start_pinning = lambda self: None  # Engine.load's call does nothing
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sources = write_components(work, scale, device)
    start = time.perf_counter()
    engine = Engine(EngineConfig(sources, quantization="float8", compile=False))
    engine.load()
    start_pinning(engine.base)  # a second call does nothing (pin-first)
    loaded = time.perf_counter() - start
    variant = engine.get_variant([])[0]
    engine.warmup(((1024, 1024),) if scale == "full" else ((64, 64),))
    ready = time.perf_counter() - start
    engine.base.pinned.wait()
    return {
        "order": order,
        "load_s": round(loaded, 2),
        "load_parts_s": {k: round(v, 2) for k, v in engine.load_seconds.items()},
        "variant_build_s": round(variant.build_seconds, 2),
        "ready_s (load, variant, eager warm-up)": round(ready, 2),
        "pin_s": round(engine.base.pin_seconds, 2),
        "all_pinned_s": round(time.perf_counter() - start, 2),
    }


def direct_text_encoder(path: Path, dtype, device):
    """T5 built on the meta device, its safetensors read onto ``device`` and assigned."""
    import torch
    from safetensors.torch import load_file
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(T5Config.from_pretrained(str(path)))
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update({k: v.to(dtype) for k, v in load_file(str(file), device=str(device)).items()})
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    # A tied weight the file leaves out shares its source (from_pretrained ties only those: the
    # bench's random T5 holds different values under both names).
    for target, source in (getattr(model, "_tied_weights_keys", None) or {}).items():
        if target in missing and source in state:
            module, _, name = target.rpartition(".")
            setattr(model.get_submodule(module), name, model.get_parameter(source))
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    return model.eval().requires_grad_(False), {"missing": missing, "unexpected": unexpected, "meta": meta}


def text_vae_parts(work: Path, scale: str) -> dict:
    import torch
    from weights import PROMPT, write_components  # bench/weights.py

    from worker.components import load_tokenizer, load_vae, quantize_float8
    from worker.sampling import encode_text

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sources = write_components(work, scale, device)
    path, dtype = Path(sources.text_encoder), torch.bfloat16
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out, t = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        sync()
        out[name] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()

    from transformers import T5EncoderModel

    tokenizer = load_tokenizer(Path(sources.tokenizer))
    lap("tokenizer")
    model = T5EncoderModel.from_pretrained(str(path), torch_dtype=dtype)
    lap("T5 from_pretrained on the host")
    model = model.to(device).eval().requires_grad_(False)
    lap("T5 to the card")
    quantize_float8(model)
    lap("T5 quantize_float8")
    load_vae(Path(sources.vae), dtype, device)
    lap("VAE")
    want = encode_text(tokenizer, model, PROMPT).embeds
    lap("first encode")
    del model
    direct, report = direct_text_encoder(path, dtype, device)
    lap("T5 read onto the card (meta model, assigned)")
    quantize_float8(direct)
    lap("T5 quantize_float8 (read onto the card)")
    got = encode_text(tokenizer, direct, PROMPT).embeds
    out["same encoding, bit for bit"] = bool(torch.equal(got, want))
    out["direct load"] = report
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/chroma-bench"))
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--runs", type=int, default=2, help="runs of each order")
    ap.add_argument(
        "--scale", default="full", help="bench/weights.py's scales: full, or tiny for a CPU check"
    )
    ap.add_argument("--child", choices=(*ORDERS, "text_vae"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "text_vae":
        print(json.dumps(text_vae_parts(args.work, args.scale)), flush=True)
        return 0
    if args.child:
        print(json.dumps(child(args.work, args.child, args.scale)), flush=True)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "weights.py"), "--work", str(args.work), "--scale", args.scale]
        + ([] if args.scale == "full" else ["--device", "cpu"]),
        check=True,
    )
    res: dict = {"components_s": round(time.perf_counter() - start, 1), "runs": []}
    for _ in range(args.runs):
        for order in ORDERS:
            done = subprocess.run(
                [sys.executable, __file__, "--work", str(args.work), "--scale", args.scale, "--child", order],
                check=True,
                capture_output=True,
                text=True,
            )
            run = json.loads(done.stdout.strip().splitlines()[-1])
            res["runs"].append(run)
            print(json.dumps(run), flush=True)
            (args.out / "load_profile.json").write_text(json.dumps(res, indent=2))
    done = subprocess.run(
        [sys.executable, __file__, "--work", str(args.work), "--scale", args.scale, "--child", "text_vae"],
        check=True,
        capture_output=True,
        text=True,
    )
    res["text_vae_parts"] = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(res["text_vae_parts"]), flush=True)
    for order in ORDERS:
        runs = [r for r in res["runs"] if r["order"] == order]
        res[order] = {
            key: statistics.median(r[key] for r in runs)
            for key in ("load_s", "ready_s (load, variant, eager warm-up)", "pin_s", "all_pinned_s")
        }
        for part in ("text_vae", "blocks_setup", "first_encode"):
            res[order][f"{part}_s"] = statistics.median(r["load_parts_s"][part] for r in runs)
        print(order, res[order], flush=True)
    (args.out / "load_profile.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
