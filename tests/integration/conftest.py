"""Integration fixtures: test-owned Redis, moto's S3 over HTTP, real worker processes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
import redis

from tasks.app import PROGRESS_STATE, make_celery
from tasks.producer import fetch_meta
from tasks.settings import Settings
from tests.s3server import start_s3_server
from tests.services import ACCESS_KEY, SECRET_KEY, FaultProxy, RedisServer, WorkerProcess, worker_env

LORA_KEY = "my_lora_job/my_lora.safetensors"
# The production renewal settings; the fixture's stacks otherwise use a long visibility timeout.
VISIBILITY_DEFAULTS = {
    name: Settings.model_fields[name].default
    for name in ("visibility_timeout", "visibility_refresh_interval")
}
EXAMPLE = json.loads((Path(__file__).resolve().parents[2] / "examples" / "request.json").read_text())


def small_request(**prompt) -> dict:
    """The example request at a size the CPU renders in a fraction of a second."""
    spec = {
        "prompt": "[trigger] a photo of a person",
        "width": 64,
        "height": 64,
        "sample_steps": 2,
        "seed": 1,
    }
    spec.update(prompt)
    return {"model": "chroma", "trigger_word": "sks", "prompts": [spec], "loras": [{"path": LORA_KEY}]}


# About 2-3 s of denoising on one CPU thread: long enough to be killed in the middle.
SLOW = {"width": 512, "height": 512, "sample_steps": 20}


pytestmark = pytest.mark.integration


def wait_for_stage(app, task_id: str, stage: str, timeout: float = 60) -> dict:
    """Poll the backend until the task reports ``stage`` in its PROGRESS meta."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = fetch_meta(app, task_id)
        if meta["status"] == PROGRESS_STATE and meta["result"].get("stage") == stage:
            return meta["result"]
        if meta["status"] in ("SUCCESS", "FAILURE"):
            raise AssertionError(f"task {task_id} ended ({meta['status']}) before stage {stage!r}")
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} did not reach stage {stage!r} within {timeout}s")


def wait_gone(pid: int, timeout: float = 10) -> None:
    """Until ``pid`` has exited (a zombie counts as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().split(") ")[1].startswith("Z"):
                    return
        except (FileNotFoundError, ProcessLookupError):  # reaped meanwhile
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still alive")


def broker_is_empty(stack) -> bool:
    """No message left in the queue and none delivered-but-unacknowledged."""
    client = redis.Redis.from_url(stack.settings.broker_url)
    try:
        return client.llen(stack.settings.queue) == 0 and client.hlen("unacked") == 0
    finally:
        client.close()


def deliveries(stack, task_id: str, retries: int = 0) -> int:
    client = redis.Redis.from_url(stack.settings.result_backend)
    try:
        return int(client.get(f"chroma:deliveries:{task_id}:{retries}") or 0)
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    endpoint, stop = start_s3_server()
    yield endpoint
    stop()


@pytest.fixture(scope="session")
def s3(s3_endpoint, tiny_sources, tmp_path_factory):
    from worker.tiny import write_lora

    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )
    client.create_bucket(Bucket="loras")
    client.create_bucket(Bucket="outputs")
    lora = write_lora(tmp_path_factory.mktemp("lora") / "lora.safetensors")
    client.put_object(Bucket="loras", Key=LORA_KEY, Body=lora.read_bytes())
    return client


@dataclass
class Stack:
    """One isolated deployment: its own queue, output prefix and Redis databases."""

    settings: Settings
    env: dict[str, str]
    folder: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def app(self):
        if not hasattr(self, "_app"):
            self._app = make_celery(self.settings)
        return self._app

    def start_worker(self, wait: bool = True, app: str = "worker", **overrides: str) -> WorkerProcess:
        """A worker process for this stack; ``app`` is the module ``celery -A`` loads."""
        env = dict(self.env)
        env.update({f"CHROMA_{k.upper()}": str(v) for k, v in overrides.items()})
        name = f"w{len(self.workers)}-{uuid.uuid4().hex[:6]}"
        worker = WorkerProcess(env, self.settings.queue, self.folder / f"{name}.log", name, app=app)
        self.workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def worker_of(self, host: str) -> WorkerProcess:
        """The worker whose Celery node name is ``host`` (``name@machine``)."""
        return next(worker for worker in self.workers if host.partition("@")[0] == worker.name)

    def output_keys(self, s3, task_id: str) -> list[str]:
        prefix = f"{self.settings.output_prefix}/{task_id}/"
        listing = s3.list_objects_v2(Bucket="outputs", Prefix=prefix)
        return sorted(item["Key"].removeprefix(prefix) for item in listing.get("Contents", []))


_db = iter(range(1, 99, 2))  # tests/integration/test_producer.py takes 100..127


@pytest.fixture
def make_stack(redis_server, s3, s3_endpoint, tiny_sources, tmp_path) -> Iterator:
    stacks: list[Stack] = []

    def make(s3_url: str | None = None, **overrides) -> Stack:
        db = next(_db, None)
        if db is None:
            raise RuntimeError("out of Redis databases for this session")
        values = {
            "broker_url": f"{redis_server.url}/{db}",
            "result_backend": f"{redis_server.url}/{db + 1}",
            "queue": f"q-{uuid.uuid4().hex[:8]}",
            "s3_endpoint_url": s3_url or s3_endpoint,
            "lora_bucket": "loras",
            "output_bucket": "outputs",
            "output_prefix": f"gen-{uuid.uuid4().hex[:8]}",
            "lora_cache_dir": str(tmp_path / f"lora-cache-{len(stacks)}"),
            "transformer": tiny_sources.transformer,
            "text_encoder": tiny_sources.text_encoder,
            "tokenizer": tiny_sources.tokenizer,
            "vae": tiny_sources.vae,
            "task_time_limit": 300,
            "visibility_timeout": 600,
            "s3_max_attempts": 2,
            "s3_connect_timeout": 1.0,
            "s3_read_timeout": 5.0,
            "retry_max": 1,
            "retry_backoff_max": 1,
        }
        values.update(overrides)
        settings = Settings(**values)
        env = worker_env({f"CHROMA_{k.upper()}": str(v) for k, v in values.items()})
        stack = Stack(settings, env, tmp_path)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        for worker in stack.workers:
            worker.stop()
        if hasattr(stack, "_app"):
            stack._app.close()


@pytest.fixture
def fault_proxy(s3_endpoint) -> Iterator[FaultProxy]:
    proxy = FaultProxy(s3_endpoint)
    yield proxy
    proxy.close()
