"""The q/k/v kernel (``worker.kernels``) alone at full size: launch shapes, against inductor.

For the single block's shape (both guidance segments packed: 2 x 4096 image + 39 text rows, the
product 21504 wide) and the double block's image stream (8192 rows, 9216 wide), times each launch
shape (rows per program x warps) of ``qkv_heads``, the same function compiled by inductor from
plain torch ops (``kernels.reference``), and a plain copy of the same bytes (what the card's
memory gives). Each figure is the median of ``--repeats`` CUDA-event timings of ``--runs`` calls,
after warm-up; bandwidth counts the bytes each must move once. Every launch shape's output is
checked against the reference. Usage::

    python bench/kernel_bench.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]
# A fresh inductor cache per run, as bench.py and step_profile.py use: no other run's kernels.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))

import torch  # noqa: E402
from measure import event_ms, rel  # noqa: E402  (bench/measure.py)

from worker import kernels  # noqa: E402

HEADS, DIM = 24, 128


def measure(name: str, rows: int, width: int, args: argparse.Namespace, randn) -> dict:
    """One shape: inductor, a plain copy and each launch shape of the kernel."""
    raw = randn(rows, width)
    bias = randn(3 * HEADS * DIM) * 0.1
    q_scale, k_scale = 1 + 0.1 * randn(DIM), 1 + 0.1 * randn(DIM)
    angle = randn(rows, DIM // 2, dtype=torch.float32) * 3
    cos, sin = angle.cos(), angle.sin()
    pe = torch.stack((torch.stack((cos, -sin), -1), torch.stack((sin, cos), -1)), -2)  # (rows, D/2, 2, 2)
    moved = rows * 3 * HEADS * DIM * 2 * 2 + pe.numel() * 4  # q/k/v read and written once, the table
    entry: dict = {"rows": rows, "width": width, "bytes_moved": moved}
    args_in = (raw, bias, q_scale, k_scale, pe, HEADS)
    want = kernels.reference(*args_in)

    compiled = torch.compile(kernels.reference)
    entry["inductor_rel_diff"] = rel(compiled(*args_in), want)
    ms = event_ms(lambda: compiled(*args_in), args.runs, args.repeats)
    entry["inductor_us"] = round(ms * 1e3, 1)
    entry["inductor_tb_s"] = round(moved / ms / 1e9, 2)

    dst = torch.empty(rows, 3 * HEADS * DIM, device=raw.device, dtype=raw.dtype)
    ms = event_ms(lambda: dst.copy_(raw[:, : 3 * HEADS * DIM]), args.runs, args.repeats)
    entry["copy_us"] = round(ms * 1e3, 1)
    entry["copy_tb_s"] = round(rows * 3 * HEADS * DIM * 4 / ms / 1e9, 2)

    launches = {}
    for block in [int(b) for b in args.blocks.split(",")]:
        for warps in [int(w) for w in args.warps.split(",")]:
            kernels.BLOCK_ROWS, kernels.NUM_WARPS = block, warps
            key = f"{block}x{warps}"
            try:
                out = kernels.qkv_heads(*args_in)
                ms = event_ms(lambda: kernels.qkv_heads(*args_in), args.runs, args.repeats)
                launches[key] = {
                    "us": round(ms * 1e3, 1),
                    "tb_s": round(moved / ms / 1e9, 2),
                    "rel_diff": rel(out, want),
                }
            except Exception as exc:  # a shape that does not compile: keep the others
                launches[key] = {"error": repr(exc)[:300]}
            print(name, key, launches[key], flush=True)
    entry["launches"] = launches
    entry["best"] = min((k for k in launches if "us" in launches[k]), key=lambda k: launches[k]["us"])
    print(name, {k: v for k, v in entry.items() if k != "launches"}, flush=True)
    return entry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("kernel-out"))
    ap.add_argument("--blocks", default="8,16,32,64")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    gen = torch.Generator(device).manual_seed(0)
    res: dict = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }
    import triton

    res["triton"] = triton.__version__

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    shapes = {"single": (2 * 4096 + 39, 7 * HEADS * DIM), "double_image": (8192, 3 * HEADS * DIM)}
    for name, (rows, width) in shapes.items():
        res[name] = measure(name, rows, width, args, randn)
        (args.out / "kernel_bench.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
