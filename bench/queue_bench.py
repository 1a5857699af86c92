"""The real stack on one machine, end to end: Redis, S3 over HTTP, a production worker, the producer API.

Starts its own ``redis-server`` on a free port and moto's S3 server over HTTP in a process of its
own, writes Chroma's components with random weights and four ai-toolkit LoRAs (bench/weights.py),
uploads the LoRAs, and launches the worker exactly as production does (``python -m tasks.cli worker
--loglevel INFO``, i.e. ``chroma-worker worker``) with CHROMA_* pointing at all of it. Then, most
wanted first:

  start    launch -> celery's "ready." line -> the first task STARTED (a small probe request is
           queued at launch) -> the probe's result; the worker's own ``chroma-startup {json}`` line
           is parsed when it logs one
  batch    >= 16 requests through ``tasks.producer.submit`` / ``wait``, one at a time: 4 LoRAs x 2
           multipliers x 2 sizes, some with several prompts, some with guidance 1 (no CFG). Wall
           time submit -> result.json, the worker's stage timings, and the queue + storage overhead
           per image: (wall - encode - denoise - decode - variant) / images
  fault    a long request; SIGKILL of the pool process mid-denoise (step >= 3); the task must be
           redelivered and completed once (delivery 2), with exactly its images + result.json in S3
  restart  the worker stopped and a new one started on the same cache dirs: start with artifacts

A section expected to end after ``--deadline`` seconds (from this process's start) is skipped and
listed; waits inside a section stop 20 s past it. Writes ``--out``/queue_bench.json, the bench log
and the worker logs, and prints a summary table last. On a GPU machine run it through
bench/queue_bench.sh, which installs the carried wheels and redis-server first::

    bash bench/queue_bench.sh --out $OUT                              # full size, CUDA
    bash bench/queue_bench.sh --scale tiny --device cpu --out /tmp/qb # the code paths on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from queue_report import batch_summary, request_record, summary_table, versions_here  # noqa: E402
from queue_stack import (  # noqa: E402  (bench/queue_stack.py)
    LORA_BUCKET,
    OUTPUT_BUCKET,
    OUTPUT_PREFIX,
    GpuMemory,
    Stack,
    Worker,
    cache_files,
    worker_env,
    write_weights,
)

from tasks.errors import WorkerError  # noqa: E402
from tasks.producer import status, submit, wait  # noqa: E402

SIZES = {  # the batch's two sizes (width, height)
    "full": ((1024, 1024), (768, 1344)),
    "smoke": ((512, 512), (384, 672)),
    "tiny": ((64, 64), (64, 96)),
}
STEPS = {"full": 25, "smoke": 3, "tiny": 2}
FAULT_STEPS = {"full": 25, "smoke": 25, "tiny": 60}  # long enough to catch it mid-denoise
MULTIPLIERS = (1.0, 0.5)
PROMPT = (
    "a cinematic photo of a red fox standing in a snowy forest at dawn with soft golden light "
    "falling through the tall pine trees while mist rises from a frozen river in the valley below"
)
GRACE_S = 20.0
START = time.time()
LOG: list[str] = []


def log(msg: str) -> None:
    line = f"[{time.time() - START:7.1f}s] {msg}"
    print(line, flush=True)
    LOG.append(line)


# -- time budget ------------------------------------------------------------------------------------


class Budget:
    """``--deadline`` seconds from the start: whether a section fits, how long a wait may last."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def elapsed(self) -> float:
        return time.time() - START

    def fits(self, expected_s: float) -> bool:
        return not self.deadline or self.elapsed() + expected_s <= self.deadline

    def wait_limit(self, fallback_s: float = 3600.0) -> float:
        if not self.deadline:
            return fallback_s
        return max(1.0, self.deadline + GRACE_S - self.elapsed())


# -- requests ---------------------------------------------------------------------------------------


def prompt_spec(text: str, size: tuple[int, int], steps: int, guidance: float, seed: int) -> dict[str, Any]:
    width, height = size
    return {"prompt": text, "width": width, "height": height, "sample_steps": steps,
            "guidance_scale": guidance, "seed": seed}  # fmt: skip


def batch_requests(scale: str, lora_keys: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """4 LoRAs x 2 multipliers x 2 sizes; every 4th has two prompts, every 4th guidance 1 (no CFG).

    Each (LoRA, multiplier) comes twice in a row, so its first request builds the variant and the
    second finds it cached.
    """
    requests = []
    for key in lora_keys:
        for multiplier in MULTIPLIERS:
            for size in SIZES[scale]:
                n = len(requests)
                guidance = 1.0 if n % 4 == 2 else 4.0
                count = 2 if n % 4 == 3 else 1
                prompts = [
                    prompt_spec(f"{PROMPT} {i}", size, STEPS[scale], guidance, 1000 + n * 10 + i)
                    for i in range(count)
                ]
                name = f"{Path(key).stem} x{multiplier:g} {size[0]}x{size[1]} g{guidance:g} p{count}"
                loras = [{"path": key, "network_multiplier": multiplier}]
                requests.append((name, {"model": "chroma", "prompts": prompts, "loras": loras}))
    return requests


def probe_request(scale: str) -> dict[str, Any]:
    """The first task a new worker takes: one small image, no LoRA (the base variant is built)."""
    return {"model": "chroma", "prompts": [prompt_spec(PROMPT, SIZES[scale][0], 2, 4.0, 7)]}


def fault_request(scale: str, lora_key: str, prompts: int = 4) -> dict[str, Any]:
    specs = [
        prompt_spec(f"{PROMPT} {i}", SIZES[scale][0], FAULT_STEPS[scale], 4.0, 500 + i)
        for i in range(prompts)
    ]
    return {"model": "chroma", "prompts": specs, "loras": [{"path": lora_key, "network_multiplier": 1.0}]}


# -- measuring --------------------------------------------------------------------------------------


def poll_until(check: Callable[[], Any], limit_s: float, worker: Worker, every: float = 0.02) -> Any:
    """The first truthy ``check()``, polling; the worker dying or ``limit_s`` passing raises."""
    deadline = time.time() + limit_s
    while time.time() < deadline:
        found = check()
        if found:
            return found
        worker.check_alive()
        time.sleep(every)
    raise TimeoutError(f"not seen within {limit_s:.0f} s")


def started(stack: Stack, task_id: str) -> bool:
    return status(task_id, app=stack.app)["state"] in ("STARTED", "PROGRESS", "SUCCESS")


def measure_start(stack: Stack, worker: Worker, probe: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """Launch -> "ready." -> the probe task STARTED -> its result; and the worker's own breakdown."""
    task_id = submit(probe, app=stack.app, settings=stack.settings)
    first_started = poll_until(lambda: started(stack, task_id) and time.time(), budget.wait_limit(), worker)
    result = wait(task_id, app=stack.app, timeout=budget.wait_limit(), poll_interval=0.02)
    done = time.time()
    poll_until(lambda: worker.watch.ready_at, 10, worker)
    out = {
        "ready_line_s": round(worker.watch.ready_at - worker.launched, 2),
        "first_task_started_s": round(first_started - worker.launched, 2),
        "probe_done_s": round(done - worker.launched, 2),
        "probe_timings": result["timings"],
        "probe_variant_cache_hit": result["variant"]["cache_hit"],
    }
    if worker.watch.startups:
        seen, line = worker.watch.startups[0]
        out["startup_line_s"] = round(seen - worker.launched, 2)
        out["startup"] = line
    return out


def run_batch(stack: Stack, worker: Worker, requests, budget: Budget) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    out: dict[str, Any] = {"requests": records}
    for name, request in requests:
        if records and not budget.fits(1.5 * records[-1]["wall_s"]):
            out["cut_by_deadline_after"] = len(records)
            log(f"batch cut by the deadline after {len(records)} requests")
            break
        submitted = time.time()
        task_id = submit(request, app=stack.app, settings=stack.settings)
        try:
            result = wait(task_id, app=stack.app, timeout=budget.wait_limit(), poll_interval=0.02)
        except (WorkerError, TimeoutError) as exc:
            records.append({"name": name, "task_id": task_id, "error": f"{type(exc).__name__}: {exc}"})
            log(f"  {name}: FAILED {exc}")
            worker.check_alive()
            if isinstance(exc, TimeoutError):
                break
            continue
        record = request_record(name, result, submitted, time.time())
        records.append(record)
        hit = "hit" if record["variant_cache_hit"] else "miss"
        log(
            f"  {name}: {record['wall_s']:.2f} s, overhead {record['overhead_per_image_s']:.3f} s/image, "
            f"variant {hit}"
        )
    return out


def run_fault(stack: Stack, worker: Worker, request: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """SIGKILL the pool process mid-denoise; the task must come back and complete exactly once."""
    submitted = time.time()
    task_id = submit(request, app=stack.app, settings=stack.settings)

    def mid_denoise() -> dict[str, Any] | None:
        state = status(task_id, app=stack.app)
        meta = state["meta"] if isinstance(state["meta"], dict) else {}
        denoising = state["state"] == "PROGRESS" and meta.get("stage") == "denoise"
        return meta if denoising and meta.get("step", 0) >= 3 else None

    seen = poll_until(mid_denoise, budget.wait_limit(), worker)
    killed = worker.kill_pool()
    killed_at = time.time()
    log(f"  killed pool process {killed} at prompt {seen['prompt']}/{seen['prompts']} step {seen['step']}")
    result = wait(task_id, app=stack.app, timeout=budget.wait_limit(), poll_interval=0.05)
    done = time.time()
    time.sleep(1.0)  # let a stray second delivery show itself
    images = len(request["prompts"])
    keys = stack.output_keys(task_id)
    expected = sorted([*(f"{i}.png" for i in range(images)), "result.json"])
    with contextlib.closing(stack.redis_db(0)) as broker, contextlib.closing(stack.redis_db(1)) as backend:
        counted = int(backend.get(f"chroma:deliveries:{task_id}:0") or 0)
        broker_empty = broker.llen(stack.settings.queue) == 0 and broker.hlen("unacked") == 0
    out = {
        "task_id": task_id,
        "killed_pid": killed,
        "killed_at": {k: seen[k] for k in ("prompt", "prompts", "step", "steps")},
        "killed_after_s": round(killed_at - submitted, 2),
        "state": status(task_id, app=stack.app)["state"],
        "delivery": result["delivery"],
        "deliveries_counted": counted,
        "output_keys": keys,
        "keys_exactly_once": keys == expected,
        "broker_empty": broker_empty,
        "result_pid": result["worker"]["pid"],
        "kill_to_redelivered_start_s": round(result["worker"]["started_at"] - killed_at, 2),
        "kill_to_done_s": round(done - killed_at, 2),
        "timings": result["timings"],
    }
    out["ok"] = (
        out["state"] == "SUCCESS"
        and out["delivery"] == 2
        and out["deliveries_counted"] == 2
        and out["keys_exactly_once"]
        and out["broker_empty"]
        and out["result_pid"] != killed
    )
    later = [line for seen_at, line in worker.watch.startups if seen_at > killed_at]
    if later:
        out["pool_restart_startup"] = later[0]
    return out


# -- main -------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SIZES), default="full")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu (CHROMA_DEVICE for the worker)")
    ap.add_argument("--out", type=Path, default=Path("queue-bench-out"))
    ap.add_argument(
        "--work", type=Path, default=None, help="weights and services (default /tmp/chroma-queue-bench/SCALE)"
    )
    ap.add_argument(
        "--cache-root",
        type=Path,
        default=Path(os.environ.get("CHROMA_BENCH_CACHE", "/tmp/chroma-queue-bench/cache")),
        help="the worker's caches: LoRAs here (HOME, TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR: the wrapper)",
    )
    ap.add_argument("--redis-server", default=os.environ.get("REDIS_SERVER") or shutil.which("redis-server"))
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument(
        "--warmup-sizes", default="", help="CHROMA_WARMUP_SIZES for the worker (default: production's)"
    )
    ap.add_argument("--skip", default="", help="comma list of sections: batch,fault,restart,restart_remote")
    ap.add_argument("--deadline", type=float, default=540, help="seconds from start (0: none)")
    args = ap.parse_args()
    args.work = args.work or Path(f"/tmp/chroma-queue-bench/{args.scale}")
    if not args.redis_server:
        ap.error("no redis-server: put one on PATH, set REDIS_SERVER or pass --redis-server")
    return args


def main() -> int:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    budget = Budget(args.deadline)
    res: dict[str, Any] = {"versions": versions_here(args.redis_server)}
    res.update({"argv": sys.argv, "scale": args.scale, "device": args.device, "sizes": SIZES[args.scale],
                "steps": STEPS[args.scale], "deadline_s": args.deadline})  # fmt: skip
    res["cache_files_at_start"] = {"compile": cache_files(args.cache_root / "compile")}
    shutil.rmtree(args.cache_root / "loras", ignore_errors=True)  # every LoRA download is a real one
    log(f"versions {res['versions']}")

    def save() -> None:
        (args.out / "queue_bench.json").write_text(json.dumps(res, indent=2, default=str))
        (args.out / "queue_bench.log").write_text("\n".join(LOG) + "\n")

    stack = Stack(args.work, args.redis_server)  # first: a service that cannot start fails in seconds
    log(f"redis {stack.redis_url}, S3 {stack.endpoint}")
    try:
        res["weights"] = write_weights(args)
    except BaseException:
        stack.close()
        raise
    log(f"weights {res['weights']}")
    lora_keys = []
    for i, path in enumerate(res["weights"]["loras"]):
        key = f"bench/lora-{i}.safetensors"
        stack.s3.upload_file(path, LORA_BUCKET, key)
        lora_keys.append(key)
    log(f"LoRAs uploaded to s3://{LORA_BUCKET}/bench/")
    gpu = GpuMemory() if args.device != "cpu" and shutil.which("nvidia-smi") else None
    env = worker_env(stack, args, res["weights"]["sources"])
    res["errors"], res["peak_memory"] = {}, {}
    workers = [Worker(env, args.out / "worker-1.log")]
    try:
        run_sections(res, args, stack, workers, env, lora_keys, skip, budget, save)
    finally:
        for worker in workers:
            worker.stop()
        stack.close()
        if gpu:
            gpu.stopped.set()
            res["peak_memory"]["nvidia_smi_gib"] = round(gpu.peak_mib / 1024, 2)
        res["total_s"] = round(time.time() - START, 1)
        res["table"] = summary_table(res)
        save()
    print("\n" + "-" * 100)
    for name, value in res["table"]:
        print(f"{name:<58} {value}")
    return 0 if not res["errors"] and res.get("fault", {}).get("ok", True) else 1


def run_sections(res, args, stack: Stack, workers: list[Worker], env, lora_keys, skip, budget, save) -> None:
    """start, batch, fault, restart: each skipped when it would end after the deadline. ``workers``
    holds the running worker (the restart section replaces it)."""
    worker = workers[0]

    def section(name: str, expected_s: float, fn: Callable[[], Any]) -> None:
        if name in skip:
            return
        if not budget.fits(expected_s):
            res.setdefault("skipped_for_time", []).append(name)
            log(
                f"section {name} skipped: {budget.elapsed():.0f} s + ~{expected_s:.0f} s "
                f"> {args.deadline:g} s"
            )
            return
        log(f"section {name}")
        try:
            res[name] = fn()
        except TimeoutError as exc:
            if not budget.fits(0):
                res.setdefault("cut_by_deadline", []).append(name)
                log(f"section {name} cut by the deadline: {exc}")
            else:
                res["errors"][name] = traceback.format_exc()[-3000:]
                log(f"section {name} FAILED: {exc}")
        except Exception as exc:  # noqa: BLE001 - report it and go on to the next section
            res["errors"][name] = traceback.format_exc()[-3000:]
            log(f"section {name} FAILED: {type(exc).__name__}: {exc}")
        save()

    probe = probe_request(args.scale)
    section("start", 0, lambda: measure_start(stack, worker, probe, budget))
    if "start" not in res:
        return
    start_s = res["start"]["first_task_started_s"]
    requests = batch_requests(args.scale, lora_keys)
    section("batch", 0, lambda: run_batch(stack, worker, requests, budget))
    records = res.get("batch", {}).get("requests", [])
    res["batch_summary"] = batch_summary(records)
    per_image = res["batch_summary"].get("wall_per_image_s", {}).get("p50") or 5.0
    peaks = [r["peak_memory_bytes"] for r in records if r.get("peak_memory_bytes")]
    res["peak_memory"]["torch_gib"] = round(max(peaks) / 2**30, 2) if peaks else None
    if records and "worker" not in res["versions"]:
        first = stack.s3.get_object(
            Bucket=OUTPUT_BUCKET, Key=f"{OUTPUT_PREFIX}/{records[0]['task_id']}/result.json"
        )
        seen = json.loads(first["Body"].read())["versions"]
        res["versions"].update(
            {"worker_cuda": seen.get("cuda"), "worker_gpu": seen.get("gpu"), "worker": seen}
        )
    fault = fault_request(args.scale, lora_keys[0])
    # A killed pool process loads and warms up again before the task comes back: about a start.
    fault_cost = (
        0.7 * start_s + 2 * len(fault["prompts"]) * per_image * FAULT_STEPS[args.scale] / STEPS[args.scale]
    )
    section("fault", fault_cost + 10, lambda: run_fault(stack, worker, fault, budget))

    def replace_worker(worker_env: dict[str, str], log_name: str) -> Worker:
        """Stop the running worker and start another: the next start to measure."""
        current = workers.pop()
        current.stop()
        workers.append(Worker(worker_env, args.out / log_name))
        return workers[-1]

    def restart() -> dict[str, Any]:
        out = measure_start(stack, replace_worker(env, "worker-2.log"), probe, budget)
        # The default path's speed in this worker: one full image, no LoRA, twice (worker timings).
        full = {
            "model": "chroma",
            "prompts": [prompt_spec(PROMPT, SIZES[args.scale][0], STEPS[args.scale], 4.0, 11)],
        }
        out["full_image_timings"] = []
        for _ in range(2):
            if not budget.fits(3 * per_image):
                break
            task_id = submit(full, app=stack.app, settings=stack.settings)
            result = wait(task_id, app=stack.app, timeout=budget.wait_limit(), poll_interval=0.02)
            out["full_image_timings"].append(result["timings"])
        return out

    section("restart", 0.7 * start_s + 20, restart)

    def restart_remote() -> dict[str, Any]:
        """A worker on a machine that never compiled: an empty compile cache folder, the first
        worker's artifacts in S3 (CHROMA_COMPILE_CACHE_URI)."""
        fresh = args.cache_root / "compile-fresh"
        shutil.rmtree(fresh, ignore_errors=True)
        third = replace_worker({**env, "CHROMA_COMPILE_CACHE_DIR": str(fresh)}, "worker-3.log")
        return measure_start(stack, third, probe, budget)

    section("restart_remote", 0.7 * start_s + 20, restart_remote)


if __name__ == "__main__":
    sys.exit(main())
