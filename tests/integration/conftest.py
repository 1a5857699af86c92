"""Integration fixtures: test-owned Redis, moto's S3 over HTTP, real worker processes."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest

from tasks.app import make_celery
from tasks.settings import Settings
from tests.s3server import start_s3_server
from tests.services import ACCESS_KEY, SECRET_KEY, FaultProxy, RedisServer, WorkerProcess, worker_env

LORA_KEY = "my_lora_job/my_lora.safetensors"
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


pytestmark = pytest.mark.integration


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
