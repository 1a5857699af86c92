"""The services and processes bench/queue_bench.py runs, each started on this machine and stopped by it.

Its own ``redis-server`` on a free port and moto's S3 server over HTTP in a process of its own
(``Stack``), the worker launched as production launches it (``Worker``, with ``worker_env``), its
log followed for celery's "ready." line and the ``chroma-startup`` lines (``LogWatch``), the card's
memory polled through ``nvidia-smi`` (``GpuMemory``), and the random weights and LoRAs written by
bench/weights.py in a process of its own (``write_weights``), and how many files a worker cache
holds (``cache_files``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import redis

from tasks.app import make_celery
from tasks.settings import Settings
from tests.s3server import free_port

ROOT = Path(__file__).resolve().parents[1]
ACCESS_KEY = "queue-bench-access-key"
SECRET_KEY = "queue-bench-secret-key"
LORA_BUCKET, OUTPUT_BUCKET, OUTPUT_PREFIX = "loras", "outputs", "generations"


# -- services ---------------------------------------------------------------------------------------


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


# -- the card, the weights, the caches --------------------------------------------------------------


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
