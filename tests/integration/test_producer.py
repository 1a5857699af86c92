"""The producer side of the contract against a test-owned Redis: submit, wait, errors, the CLI.

Each test gets two flushed databases of the session's ``redis-server`` and its own queue name. No
eager mode, no mocks: a "worker" here is a second app writing task states into the real result
backend, exactly as a worker process would.
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from tasks.app import PROGRESS_STATE, make_celery
from tasks.errors import (
    InvalidRequest,
    LoraNotFound,
    OutOfMemory,
    StorageUnavailable,
    WorkerError,
)
from tasks.names import GENERATE
from tasks.producer import status, submit, wait
from tasks.results import Progress
from tasks.schemas import validate_request
from tasks.settings import Settings
from tests.cli import BAD_WIDTH, REFERENCE, REQUESTS, run_cli

pytestmark = pytest.mark.integration
_databases = itertools.cycle(range(100, 128, 2))  # flushed around each test; make_stack takes 1..99


@pytest.fixture
def settings(redis_server) -> Iterator[Settings]:
    db = next(_databases)
    clients = [redis.Redis.from_url(redis_server.url_for(n)) for n in (db, db + 1)]
    for client in clients:
        client.flushdb()
    yield Settings(
        broker_url=redis_server.url_for(db),
        result_backend=redis_server.url_for(db + 1),
        queue=f"test-contract-{uuid.uuid4().hex[:8]}",
        task_time_limit=600,
        visibility_timeout=900,
    )
    for client in clients:
        client.flushdb()
        client.close()


@pytest.fixture
def broker(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.broker_url)
    yield client
    client.close()


@pytest.fixture
def backend(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.result_backend)
    yield client
    client.close()


@pytest.fixture
def app(settings: Settings, broker: redis.Redis, backend: redis.Redis) -> Iterator[Celery]:
    app = make_celery(settings)
    yield app
    app.close()


@pytest.fixture
def worker_app(settings: Settings, app: Celery) -> Iterator[Celery]:
    """A second app standing in for the worker process: it writes task states to the backend."""
    other = make_celery(settings)
    yield other
    other.close()


def test_invalid_request_enqueues_nothing(app: Celery, settings: Settings, broker: redis.Redis) -> None:
    with pytest.raises(InvalidRequest) as caught:
        submit(BAD_WIDTH, app=app, settings=settings)
    assert caught.value.field == "prompts.0.width"
    assert broker.llen(settings.queue) == 0
    assert broker.dbsize() == 0


def test_valid_request_enqueues_one_json_message(
    app: Celery, settings: Settings, broker: redis.Redis
) -> None:
    task_id = submit(REFERENCE, app=app, settings=settings)
    assert broker.llen(settings.queue) == 1
    message = json.loads(broker.lindex(settings.queue, 0))
    assert message["content-type"] == "application/json"
    assert message["headers"]["task"] == GENERATE
    assert message["headers"]["id"] == task_id
    assert message["properties"]["delivery_info"]["routing_key"] == settings.queue
    assert message["properties"]["body_encoding"] == "base64"
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert kwargs == {}
    assert args == [validate_request(REFERENCE).model_dump(mode="json", exclude_none=True)]
    # The worker validates again: what was sent must pass the same check.
    assert validate_request(args[0], settings.limits).prompts[0].seed == 42
    uuid.UUID(task_id)


def test_submit_uses_the_given_task_id(app: Celery, settings: Settings, broker: redis.Redis) -> None:
    assert submit(json.dumps(REFERENCE), app=app, settings=settings, task_id="job-123") == "job-123"
    message = json.loads(broker.lindex(settings.queue, 0))
    assert message["headers"]["id"] == "job-123"


@pytest.mark.parametrize("task_id", ["../escape", "", "a/b", "x" * 129, "line\nbreak"])
def test_unsafe_task_id_enqueues_nothing(
    app: Celery, settings: Settings, broker: redis.Redis, task_id: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        submit(REFERENCE, app=app, settings=settings, task_id=task_id)
    assert caught.value.field == "task_id"
    assert broker.dbsize() == 0


def test_submit_applies_the_settings_limits(app: Celery, settings: Settings, broker: redis.Redis) -> None:
    strict = settings.model_copy(update={"max_prompts": 1})
    two = {"model": "chroma", "prompts": [{"prompt": "a"}, {"prompt": "b"}]}
    with pytest.raises(InvalidRequest) as caught:
        submit(two, app=app, settings=strict)
    assert caught.value.field == "prompts"
    assert broker.llen(settings.queue) == 0


@pytest.mark.parametrize(
    "error",
    [
        InvalidRequest("width must be at most 4096", "prompts.0.width"),
        LoraNotFound("no object at s3://loras/x.safetensors", "loras.0.path"),
        OutOfMemory("1024x1024 did not fit; try a smaller size"),
        StorageUnavailable("S3 endpoint timed out"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_failure_round_trips_as_the_same_error(
    app: Celery, worker_app: Celery, backend: redis.Redis, error: WorkerError
) -> None:
    task_id = str(uuid.uuid4())
    worker_app.backend.mark_as_failure(task_id, error)
    stored = json.loads(backend.get(f"celery-task-meta-{task_id}"))  # JSON, never pickle
    assert stored["result"]["exc_module"] == "tasks.errors"
    rebuilt = app.backend.get_task_meta(task_id)["result"]  # Celery's own cls(*args) from JSON
    assert type(rebuilt) is type(error) and rebuilt.args == (error.message, error.field)
    with pytest.raises(WorkerError) as caught:
        wait(task_id, app=app, timeout=5, poll_interval=0.01)
    assert type(caught.value) is type(error)
    assert (caught.value.field, caught.value.message, caught.value.code) == (
        error.field,
        error.message,
        error.code,
    )


def test_error_of_an_unknown_module_is_rebuilt_by_class_name(app: Celery, worker_app: Celery) -> None:
    task_id = str(uuid.uuid4())
    stored = {
        "exc_type": "LoraNotFound",
        "exc_module": "worker.module_the_producer_never_imports",
        "exc_message": ["no object at loras/x.safetensors", "loras.0.path"],
    }
    worker_app.backend.store_result(task_id, stored, "FAILURE")
    with pytest.raises(LoraNotFound) as caught:
        wait(task_id, app=app, timeout=5, poll_interval=0.01)
    assert caught.value.field == "loras.0.path"


def test_foreign_error_becomes_a_worker_error(app: Celery, worker_app: Celery) -> None:
    task_id = str(uuid.uuid4())
    worker_app.backend.mark_as_failure(task_id, ValueError("boom"))
    with pytest.raises(WorkerError) as caught:
        wait(task_id, app=app, timeout=5, poll_interval=0.01)
    assert type(caught.value) is WorkerError
    assert "ValueError: boom" in caught.value.message
    assert task_id in caught.value.message


def test_revoked_task_raises(app: Celery, worker_app: Celery) -> None:
    task_id = str(uuid.uuid4())
    worker_app.backend.mark_as_revoked(task_id, "cancelled by user")
    with pytest.raises(WorkerError, match="revoked"):
        wait(task_id, app=app, timeout=5, poll_interval=0.01)


def test_progress_is_reported_once_per_change_then_the_result(app: Celery, worker_app: Celery) -> None:
    task_id = str(uuid.uuid4())
    first, second = Progress(1, 2, 5, 25, "denoise").as_meta(), Progress(2, 2, 1, 25, "denoise").as_meta()
    result = {"task_id": task_id, "images": [], "result_key": f"generations/{task_id}/result.json"}
    seen: list[dict[str, Any]] = []
    changed = threading.Event()

    def on_progress(meta: dict[str, Any]) -> None:
        seen.append(meta)
        changed.set()

    def run_task() -> None:
        for meta in (first, second):
            changed.clear()
            worker_app.backend.store_result(task_id, meta, PROGRESS_STATE)
            assert changed.wait(5)
            time.sleep(0.1)  # many polls of an unchanged meta: each must be reported once
        worker_app.backend.mark_as_done(task_id, result)

    task = threading.Thread(target=run_task)
    task.start()
    try:
        assert wait(task_id, app=app, on_progress=on_progress, timeout=10, poll_interval=0.01) == result
    finally:
        task.join(10)
    assert seen == [first, second]


def test_wait_timeout_names_the_task(app: Celery) -> None:
    task_id = str(uuid.uuid4())
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=task_id):
        wait(task_id, app=app, timeout=0.2, poll_interval=0.05)
    assert 0.2 <= time.monotonic() - started < 2


def test_status_reports_state_and_json_meta(app: Celery, worker_app: Celery) -> None:
    task_id = str(uuid.uuid4())
    assert status(task_id, app=app) == {"state": "PENDING", "meta": None}
    meta = Progress(1, 1, 3, 25, "denoise").as_meta()
    worker_app.backend.store_result(task_id, meta, PROGRESS_STATE)
    assert status(task_id, app=app) == {"state": PROGRESS_STATE, "meta": meta}
    worker_app.backend.mark_as_failure(task_id, InvalidRequest("bad width", "prompts.0.width"))
    failed = status(task_id, app=app)
    assert failed == {
        "state": "FAILURE",
        "meta": {"code": "invalid_request", "field": "prompts.0.width", "message": "bad width"},
    }
    json.dumps(failed)


def test_cli_submit_prints_task_id_and_enqueues(settings: Settings, broker: redis.Redis) -> None:
    out = run_cli(
        "submit", str(REQUESTS / "good" / "reference.json"), "--task-id", "cli-1", settings=settings
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "cli-1\n"
    assert json.loads(broker.lindex(settings.queue, 0))["headers"]["id"] == "cli-1"


def test_cli_submit_invalid_enqueues_nothing(settings: Settings, broker: redis.Redis) -> None:
    out = run_cli("submit", "-", settings=settings, stdin=json.dumps(BAD_WIDTH))
    assert out.returncode == 2
    assert out.stderr.startswith("error: prompts.0.width: ")
    assert broker.dbsize() == 0


def _finish_when_enqueued(
    worker_app: Celery, broker: redis.Redis, queue: str, task_id: str, end: Any
) -> None:
    deadline = time.monotonic() + 20
    while broker.llen(queue) == 0:
        assert time.monotonic() < deadline, "the CLI never enqueued the task"
        time.sleep(0.02)
    worker_app.backend.store_result(task_id, Progress(1, 2, 3, 25, "denoise").as_meta(), PROGRESS_STATE)
    time.sleep(1.5)  # the CLI polls every 0.5 s
    if isinstance(end, BaseException):
        worker_app.backend.mark_as_failure(task_id, end)
    else:
        worker_app.backend.mark_as_done(task_id, end)


def test_cli_submit_wait_shows_progress_and_outputs(
    settings: Settings, broker: redis.Redis, worker_app: Celery
) -> None:
    task_id = str(uuid.uuid4())
    uri = f"s3://outputs/generations/{task_id}/0.png"
    result = {
        "task_id": task_id,
        "images": [
            {
                "index": 0,
                "uri": uri,
                "key": f"generations/{task_id}/0.png",
                "width": 1024,
                "height": 1024,
                "seed": 42,
            }
        ],
        "result_key": f"generations/{task_id}/result.json",
    }
    task = threading.Thread(
        target=_finish_when_enqueued, args=(worker_app, broker, settings.queue, task_id, result)
    )
    task.start()
    out = run_cli("submit", "-", "--wait", "--timeout", "20", "--task-id", task_id, settings=settings,
                  stdin=json.dumps(REFERENCE))  # fmt: skip
    task.join(20)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == task_id
    assert f"image 0: {uri} (1024x1024, seed 42)" in lines
    assert lines[-1] == f"result.json: generations/{task_id}/result.json"
    assert "prompt 1/2  step 3/25 [##" in out.stderr


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (OutOfMemory("1024x1024 did not fit; try a smaller size"), 1, "out_of_memory: 1024x1024 did not fit"),
        (
            LoraNotFound("no object at loras/x.safetensors", "loras.0.path"),
            2,
            "lora_not_found: loras.0.path: no",
        ),
    ],
    ids=["device", "invalid"],
)
def test_cli_submit_wait_reports_task_failure(
    settings: Settings, broker: redis.Redis, worker_app: Celery, error: WorkerError, code: int, line: str
) -> None:
    task_id = str(uuid.uuid4())
    task = threading.Thread(
        target=_finish_when_enqueued, args=(worker_app, broker, settings.queue, task_id, error)
    )
    task.start()
    out = run_cli(
        "submit", "-", "--wait", "--task-id", task_id, settings=settings, stdin=json.dumps(REFERENCE)
    )
    task.join(20)
    assert out.returncode == code
    assert out.stderr.splitlines()[-1] == f"error: {error.code}: {error}"
    assert out.stderr.splitlines()[-1].startswith(f"error: {line}")
    assert "Traceback" not in out.stderr
