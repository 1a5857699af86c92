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
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import boto3  # noqa: E402
import redis  # noqa: E402

from tasks.app import make_celery  # noqa: E402
from tasks.errors import WorkerError  # noqa: E402
from tasks.producer import status, submit, wait  # noqa: E402
from tasks.settings import Settings  # noqa: E402

ACCESS_KEY = "queue-bench-access-key"
SECRET_KEY = "queue-bench-secret-key"
LORA_BUCKET, OUTPUT_BUCKET, OUTPUT_PREFIX = "loras", "outputs", "generations"
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
ENGINE_STAGES = ("encode", "denoise", "decode", "variant_build", "variant_hit")
STAGES = ("download", "variant_build", "variant_hit", "encode", "denoise", "decode", "upload")
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


# -- services ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_env(binary: str) -> dict[str, str]:
    """The environment for ``binary``: an unpacked Debian package finds its libraries beside it."""
    env = dict(os.environ)
    libs = Path(binary).resolve().parents[1] / "lib" / "x86_64-linux-gnu"
    if libs.is_dir() and not str(libs).startswith("/usr/"):
        env["LD_LIBRARY_PATH"] = (
            f"{libs}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else str(libs)
        )
    return env


def start_redis(binary: str, folder: Path) -> tuple[subprocess.Popen, int]:
    """Its own redis-server on a free port, persistence as the compose file configures it; a fresh
    folder, so nothing an earlier run left in the queue comes back."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    port = free_port()
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder), "--save", "",
            "--appendonly", "yes", "--appendfsync", "everysec", "--logfile", "redis.log"]  # fmt: skip
    process = subprocess.Popen(argv, env=redis_env(binary), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    client = redis.Redis(port=port)
    for _ in range(200):
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            client.ping()
            return process, port
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not answer PING")


def start_s3(folder: Path) -> tuple[subprocess.Popen, str]:
    """moto's S3 server over HTTP, in its own process (as tests/s3server.py, but not in a thread)."""
    port = free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with (folder / "s3.log").open("w") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            raise RuntimeError(f"moto's server exited: {(folder / 's3.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
            return process, endpoint
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.05)
    raise RuntimeError("moto's server did not answer")


def stop_process(process: subprocess.Popen, timeout: float = 10) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Stack:
    """Redis, S3 and the producer's app and settings: what every section shares."""

    def __init__(self, work: Path, redis_binary: str):
        self.redis_process, port = start_redis(redis_binary, work / "redis")
        self.s3_process, self.endpoint = start_s3(work)
        self.redis_url = f"redis://127.0.0.1:{port}"
        self.settings = Settings(
            broker_url=f"{self.redis_url}/0",
            result_backend=f"{self.redis_url}/1",
            s3_endpoint_url=self.endpoint,
        )
        self.app = make_celery(self.settings)
        self.s3 = boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        )  # fmt: skip
        for bucket in (LORA_BUCKET, OUTPUT_BUCKET):
            self.s3.create_bucket(Bucket=bucket)

    def output_keys(self, task_id: str) -> list[str]:
        prefix = f"{OUTPUT_PREFIX}/{task_id}/"
        listed = self.s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix=prefix).get("Contents", [])
        return sorted(item["Key"].removeprefix(prefix) for item in listed)

    def redis_db(self, db: int) -> redis.Redis:
        return redis.Redis.from_url(f"{self.redis_url}/{db}")

    def close(self) -> None:
        self.app.close()
        stop_process(self.s3_process)
        stop_process(self.redis_process)


# -- the worker -------------------------------------------------------------------------------------


class LogWatch(threading.Thread):
    """Follows a worker log: when celery's "ready." first shows, and each ``chroma-startup`` line."""

    STARTUP = re.compile(r"chroma-startup (\{.*\})\s*$")

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path = path
        self.ready_at: float | None = None
        self.startups: list[tuple[float, dict[str, Any]]] = []
        self.stopped = threading.Event()
        self.start()

    def run(self) -> None:
        offset, partial = 0, ""
        while not self.stopped.is_set():
            with self.path.open(errors="replace") as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
            *lines, partial = (partial + chunk).split("\n")
            for line in lines:
                self.scan(line)
            self.stopped.wait(0.05)

    def scan(self, line: str) -> None:
        now = time.time()
        if self.ready_at is None and line.rstrip().endswith("ready."):
            self.ready_at = now
        match = self.STARTUP.search(line)
        if match:
            try:
                self.startups.append((now, json.loads(match.group(1))))
            except json.JSONDecodeError:
                self.startups.append((now, {"unparsed": match.group(1)[:500]}))


class Worker:
    """``python -m tasks.cli worker --loglevel INFO``: the celery parent and its one pool process."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.log_path = log_path
        self.log_file = log_path.open("w")
        argv = [sys.executable, "-m", "tasks.cli", "worker", "--loglevel", "INFO"]
        self.launched = time.time()
        self.process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=self.log_file, stderr=subprocess.STDOUT
        )
        self.watch = LogWatch(log_path)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"worker exited with {self.process.returncode}:\n{tail}")

    def pool_pids(self) -> list[int]:
        """The celery parent's children (the pool process), as tests/services.py reads them."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children")
        if children.exists():
            return [int(p) for p in children.read_text().split()]
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(stat.parent.name))
            except (OSError, IndexError, ValueError):
                continue
        return found

    def kill_pool(self) -> int:
        pids = self.pool_pids()
        if not pids:
            raise RuntimeError("the worker has no pool process")
        os.kill(pids[0], signal.SIGKILL)
        return pids[0]

    def stop(self) -> None:
        pool = self.pool_pids()
        stop_process(self.process, timeout=10)
        for pid in pool:
            with contextlib.suppress(ProcessLookupError):  # gone with its parent
                os.kill(pid, signal.SIGKILL)
        self.watch.stopped.set()
        self.log_file.close()


def worker_env(stack: Stack, args: argparse.Namespace, sources: dict[str, str]) -> dict[str, str]:
    """The environment production gives a worker, pointing at this bench's services and weights."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHROMA_", "AWS_"))}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    settings = {
        "BROKER_URL": stack.settings.broker_url,
        "RESULT_BACKEND": stack.settings.result_backend,
        "S3_ENDPOINT_URL": stack.endpoint,
        "LORA_BUCKET": LORA_BUCKET,
        "OUTPUT_BUCKET": OUTPUT_BUCKET,
        "OUTPUT_PREFIX": OUTPUT_PREFIX,
        "LORA_CACHE_DIR": str(args.cache_root / "loras"),
        "COMPILE_CACHE_DIR": str(args.cache_root / "compile"),
        # The first worker keeps its compile artifacts in S3 too; "restart_remote" starts from them.
        "COMPILE_CACHE_URI": f"s3://{OUTPUT_BUCKET}/compile-cache",
        "HEALTH_FILE": str(args.cache_root / "alive"),
        "TRANSFORMER": sources["transformer"],
        "TEXT_ENCODER": sources["text_encoder"],
        "TOKENIZER": sources["tokenizer"],
        "VAE": sources["vae"],
    }
    if args.device != "cuda":
        settings["DEVICE"] = args.device
    if args.warmup_sizes:
        settings["WARMUP_SIZES"] = args.warmup_sizes
    env.update({f"CHROMA_{k}": v for k, v in settings.items()})
    env.update(
        {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "PYTHONPATH": os.pathsep.join(paths if str(ROOT) in paths else [*paths, str(ROOT)]),
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    return env


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


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


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


class GpuMemory(threading.Thread):
    """Peak ``nvidia-smi`` memory.used (MiB) of the card, polled every half second."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_mib = 0
        self.samples = 0
        self.stopped = threading.Event()
        self.start()

    def run(self) -> None:
        argv = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        while not self.stopped.is_set():
            try:
                out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
                self.peak_mib = max([self.peak_mib, *(int(v) for v in out.split())])
                self.samples += 1
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return
            self.stopped.wait(0.5)


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


# -- report -----------------------------------------------------------------------------------------


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
    return {
        "requests": len(done),
        "errors": len(records) - len(done),
        "images": images,
        "wall_s": pct("wall_s"),
        "wall_per_image_s": pct("wall_per_image_s"),
        "engine_per_image_s": {"p50": percentile([r["engine_s"] / r["images"] for r in done], 50)},
        "overhead_per_image_s": pct("overhead_per_image_s"),
        "outside_timings_per_image_s": {
            "p50": percentile([r["outside_timings_s"] / r["images"] for r in done], 50)
        },
        "dispatch_s": pct("dispatch_s"),
        "overhead_goal_s": 0.3,
        "overhead_goal_met": percentile([r["overhead_per_image_s"] for r in done], 50) <= 0.3,
        "stage_totals_s": stage_totals,
        "stage_per_image_s": {s: round(v / images, 3) for s, v in stage_totals.items()},
        "variant_hits": sum(bool(r["variant_cache_hit"]) for r in done),
        "variant_misses": sum(not r["variant_cache_hit"] for r in done),
        "deliveries_other_than_1": sum(r["delivery"] != 1 for r in done),
    }


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
    rows.append(("overhead goal: p50 <= 0.3 s per image", met))
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


# -- main -------------------------------------------------------------------------------------------


def write_weights(args: argparse.Namespace) -> dict[str, Any]:
    """bench/weights.py in a process of its own: the bench process never holds the weights."""
    argv = [sys.executable, str(ROOT / "bench" / "weights.py"), "--scale", args.scale,
            "--device", args.device, "--work", str(args.work),
            "--loras", "4", "--lora-rank", str(args.lora_rank)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"bench/weights.py failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cache_files(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file()) if root.exists() else 0


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
    ap.add_argument(
        "--restart", action=argparse.BooleanOptionalAction, default=True, help="the restart section"
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
    if not args.restart:
        skip.add("restart")
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

    def restart() -> dict[str, Any]:
        worker.stop()
        workers.remove(worker)
        second = Worker(env, args.out / "worker-2.log")
        workers.append(second)
        out = measure_start(stack, second, probe, budget)
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
        current = workers[-1]
        current.stop()
        workers.remove(current)
        fresh = args.cache_root / "compile-fresh"
        shutil.rmtree(fresh, ignore_errors=True)
        third = Worker({**env, "CHROMA_COMPILE_CACHE_DIR": str(fresh)}, args.out / "worker-3.log")
        workers.append(third)
        return measure_start(stack, third, probe, budget)

    section("restart_remote", 0.7 * start_s + 20, restart_remote)


if __name__ == "__main__":
    sys.exit(main())
