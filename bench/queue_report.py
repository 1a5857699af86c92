"""What bench/queue_bench.py reports: each request's record, the batch's summary, the versions it ran
with, and the summary table printed last."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from importlib import metadata
from typing import Any

from queue_stack import redis_env

ENGINE_STAGES = ("encode", "denoise", "decode", "variant_build", "variant_hit")
STAGES = ("download", "variant_build", "variant_hit", "encode", "denoise", "decode", "upload")
OVERHEAD_GOAL_S = 0.3  # queue + storage seconds per image over the engine's own (p50)


# -- records ----------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def request_record(name: str, result: dict[str, Any], submitted: float, done: float) -> dict[str, Any]:
    """One request's wall time against the engine's own time, from its result.json."""
    timings = result["timings"]
    images = len(result["images"])
    wall = done - submitted
    engine = sum(timings.get(k, 0.0) for k in ENGINE_STAGES)
    first = result["images"][0]
    return {
        "name": name,
        "task_id": result["task_id"],
        "images": images,
        "size": f"{first['width']}x{first['height']}",
        "guidance": first["guidance_scale"],
        "wall_s": round(wall, 3),
        "wall_per_image_s": round(wall / images, 3),
        "engine_s": round(engine, 3),
        "overhead_s": round(wall - engine, 3),
        "overhead_per_image_s": round((wall - engine) / images, 3),
        "outside_timings_s": round(wall - sum(timings.values()), 3),
        "dispatch_s": round(result["worker"]["started_at"] - submitted, 3),
        "timings": timings,
        "variant_cache_hit": result["variant"]["cache_hit"],
        "delivery": result["delivery"],
        "peak_memory_bytes": result["worker"].get("peak_memory_bytes"),
    }


def versions_here(redis_binary: str) -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    found: dict[str, Any] = {
        name: version(name)
        for name in ("torch", "celery", "kombu", "redis", "diffusers", "torchao", "transformers", "moto")
    }
    found["python"] = sys.version.split()[0]
    banner = subprocess.run(
        [redis_binary, "--version"], capture_output=True, text=True, env=redis_env(redis_binary)
    )
    match = re.search(r"v=(\S+)", banner.stdout)
    found["redis_server"] = match.group(1) if match else (banner.stdout + banner.stderr).strip()[:200]
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        found["nvidia_smi"] = smi.stdout.strip()
    return found


def batch_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in records if "error" not in r]
    if not done:
        return {"requests": 0, "errors": len(records)}
    images = sum(r["images"] for r in done)

    def pct(key: str) -> dict[str, float | None]:
        values = [r[key] for r in done]
        return {"p50": percentile(values, 50), "p95": percentile(values, 95)}

    stage_totals = {s: round(sum(r["timings"].get(s, 0.0) for r in done), 3) for s in STAGES}
    overhead = pct("overhead_per_image_s")
    return {
        "requests": len(done),
        "errors": len(records) - len(done),
        "images": images,
        "wall_s": pct("wall_s"),
        "wall_per_image_s": pct("wall_per_image_s"),
        "engine_per_image_s": {"p50": percentile([r["engine_s"] / r["images"] for r in done], 50)},
        "overhead_per_image_s": overhead,
        "outside_timings_per_image_s": {
            "p50": percentile([r["outside_timings_s"] / r["images"] for r in done], 50)
        },
        "dispatch_s": pct("dispatch_s"),
        "overhead_goal_s": OVERHEAD_GOAL_S,
        "overhead_goal_met": overhead["p50"] <= OVERHEAD_GOAL_S,
        "stage_totals_s": stage_totals,
        "stage_per_image_s": {s: round(v / images, 3) for s, v in stage_totals.items()},
        "variant_hits": sum(bool(r["variant_cache_hit"]) for r in done),
        "variant_misses": sum(not r["variant_cache_hit"] for r in done),
        "deliveries_other_than_1": sum(r["delivery"] != 1 for r in done),
    }


# -- the table --------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


Rows = list[tuple[str, str]]


def start_rows(res: dict[str, Any]) -> Rows:
    rows: Rows = []
    cached = sum(res.get("cache_files_at_start", {}).values())
    first = "start, cold caches" if not cached else f"start, {cached} cached kernel files"
    for label, key in (
        (first, "start"),
        ("start again, same caches", "restart"),
        ("start, empty cache dir, artifacts from S3", "restart_remote"),
    ):
        start = res.get(key)
        if not isinstance(start, dict) or "ready_line_s" not in start:
            continue
        rows.append((f"{label}: launch -> celery 'ready.', s", fmt(start["ready_line_s"])))
        rows.append((f"{label}: launch -> first task started, s", fmt(start["first_task_started_s"])))
        line = start.get("startup")
        if line:
            parts = ", ".join(f"{k} {fmt(v, 1)}" for k, v in line.items() if isinstance(v, int | float))
            rows.append((f"{label}: chroma-startup, cache {line.get('compile_cache', '-')}", parts))
    return rows


def batch_rows(batch: dict[str, Any]) -> Rows:
    rows = [
        ("batch: requests / images / errors", f"{batch['requests']} / {batch['images']} / {batch['errors']}")
    ]
    for key, label in (
        ("wall_s", "submit -> result.json per request"),
        ("wall_per_image_s", "submit -> result.json per image"),
        ("overhead_per_image_s", "queue + storage overhead per image"),
        ("dispatch_s", "submit -> task started in the pool"),
    ):
        rows.append((f"{label}, p50 / p95, s", f"{fmt(batch[key]['p50'], 3)} / {fmt(batch[key]['p95'], 3)}"))
    met = "met" if batch["overhead_goal_met"] else "NOT MET"
    rows.append((f"overhead goal: p50 <= {OVERHEAD_GOAL_S} s per image", met))
    rows.append(
        (
            "engine per image (encode+denoise+decode+variant), p50, s",
            fmt(batch["engine_per_image_s"]["p50"], 3),
        )
    )
    per_image = batch["stage_per_image_s"]
    rows.append(("worker stages per image, s", ", ".join(f"{s} {per_image[s]:.3f}" for s in STAGES)))
    rows.append(("variant hits / misses", f"{batch['variant_hits']} / {batch['variant_misses']}"))
    return rows


def fault_rows(fault: dict[str, Any]) -> Rows:
    killed = fault["killed_at"]
    return [
        (
            "fault: pool process killed at prompt / step",
            f"{killed['prompt']}/{killed['prompts']} / {killed['step']}",
        ),
        (
            "fault: state, delivery, deliveries counted",
            f"{fault['state']}, {fault['delivery']}, {fault['deliveries_counted']}",
        ),
        ("fault: output keys", " ".join(fault["output_keys"])),
        (
            "fault: kill -> redelivered task started / done, s",
            f"{fault['kill_to_redelivered_start_s']} / {fault['kill_to_done_s']}",
        ),
        ("fault: redelivered, completed once, keys exactly once", "yes" if fault["ok"] else "NO"),
    ]


def summary_table(res: dict[str, Any]) -> Rows:
    v = res["versions"]
    header = (
        f"torch {v.get('torch')} CUDA {v.get('worker_cuda') or '-'} GPU {v.get('worker_gpu') or '-'} | "
        f"celery {v.get('celery')} kombu {v.get('kombu')} redis-server {v.get('redis_server')} | "
        f"diffusers {v.get('diffusers')} torchao {v.get('torchao')}"
    )
    rows: Rows = [("versions", header)]
    rows.append(
        ("random weights written (0: already there), s", fmt(res.get("weights", {}).get("components_s")))
    )
    rows += start_rows(res)
    for timings in res.get("restart", {}).get("full_image_timings", []):
        stages = ", ".join(f"{k} {v:.3f}" for k, v in timings.items())
        rows.append(("one full image in the restarted worker, s", stages))
    if res.get("batch_summary", {}).get("requests"):
        rows += batch_rows(res["batch_summary"])
    memory = res.get("peak_memory", {})
    peaks = f"{fmt(memory.get('torch_gib'))} / {fmt(memory.get('nvidia_smi_gib'))}"
    rows.append(("peak GPU memory: torch (result.json) / nvidia-smi, GiB", peaks))
    if isinstance(res.get("fault"), dict) and "ok" in res["fault"]:
        rows += fault_rows(res["fault"])
    for name, error in res.get("errors", {}).items():
        rows.append((f"{name} FAILED", error.strip().splitlines()[-1][:80]))
    if res.get("skipped_for_time"):
        rows.append(("skipped to end by --deadline", ",".join(res["skipped_for_time"])))
    if res.get("cut_by_deadline"):
        rows.append(("cut short by --deadline", ",".join(res["cut_by_deadline"])))
    rows.append(("total wall time, s", fmt(res.get("total_s"), 1)))
    return rows
