"""The Celery side of the contract against a real Redis: app config, submit, wait, errors, CLI.

Broker and result backend are Redis databases 11 and 12 on 127.0.0.1:6379, flushed around each
test; each test uses its own queue name. No eager mode, no mocks: a "worker" here is a second app
writing task states into the real result backend, exactly as a worker process would.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from pydantic import ValidationError

from tasks.app import PROGRESS_STATE, get_app, make_celery, progress_meta, soft_time_limit
from tasks.cli import format_progress, main, worker_argv
from tasks.errors import (
    InvalidRequest,
    LoraNotFound,
    OutOfMemory,
    StorageUnavailable,
    WorkerError,
)
from tasks.names import GENERATE
from tasks.producer import status, submit, wait
from tasks.schemas import validate_request
from tasks.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379"
BROKER_DB = 11
BACKEND_DB = 12
REPO = Path(__file__).resolve().parents[2]
REQUESTS = REPO / "tests" / "data" / "requests"
GPU_MODULES = ("torch", "diffusers", "boto3", "botocore", "transformers", "safetensors", "worker", "storage")
LOADED_GPU_MODULES = f"[m for m in {GPU_MODULES!r} if m in sys.modules]"  # an expression for probes

REFERENCE = json.loads((Path(__file__).resolve().parents[2] / "examples" / "request.json").read_text())
BAD_WIDTH = {"model": "chroma", "prompts": [{"prompt": "x", "width": 4097}]}


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    yield from _flushed_db(BROKER_DB)


@pytest.fixture
def backend() -> Iterator[redis.Redis]:
    yield from _flushed_db(BACKEND_DB)


def _flushed_db(db: int) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(f"{REDIS_URL}/{db}")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def settings() -> Settings:
    return Settings(
        broker_url=f"{REDIS_URL}/{BROKER_DB}",
        result_backend=f"{REDIS_URL}/{BACKEND_DB}",
        queue=f"test-contract-{uuid.uuid4().hex[:8]}",
        task_time_limit=600,
        visibility_timeout=900,
    )


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


def cli_env(settings: Settings | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHROMA_")}
    env["PYTHONPATH"] = str(REPO)
    if settings is not None:
        env.update(
            CHROMA_BROKER_URL=settings.broker_url,
            CHROMA_RESULT_BACKEND=settings.result_backend,
            CHROMA_QUEUE=settings.queue,
        )
    return env


def run_cli(
    *args: str, settings: Settings | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=cli_env(settings),
        cwd=REPO,
        timeout=60,
    )


# --- import boundary -------------------------------------------------------------------------


def test_contract_imports_leave_gpu_stack_out() -> None:
    code = (
        "import sys, json\n"
        "import tasks, tasks.app, tasks.producer, tasks.cli\n"
        "app = tasks.app.get_app()\n"
        "assert app is tasks.app.get_app()\n"
        f"print(json.dumps({{'loaded': {LOADED_GPU_MODULES}, 'broker': app.conf.broker_url}}))\n"
    )
    env = cli_env()
    env["CHROMA_BROKER_URL"] = "redis://127.0.0.1:1/0"  # unreachable: building the app must not connect
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=60
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report == {"loaded": [], "broker": "redis://127.0.0.1:1/0"}
    assert time.monotonic() - started < 20


def test_cli_validate_and_run_stay_torch_free(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(BAD_WIDTH))
    code = (
        "import sys, json\n"
        "from tasks.cli import main\n"
        f"codes = [main(['validate', {str(REQUESTS / 'good' / 'reference.json')!r}]),\n"
        f"         main(['run', {str(bad)!r}, '--lora-dir', '.', '--out', '.'])]\n"
        f"print(json.dumps({{'codes': codes, 'loaded': {LOADED_GPU_MODULES}}}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {"codes": [0, 2], "loaded": []}


# --- app configuration -----------------------------------------------------------------------


def test_app_is_json_only_and_at_least_once(settings: Settings) -> None:
    conf = make_celery(settings).conf
    assert conf.task_serializer == "json"
    assert conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert list(conf.result_accept_content) == ["json"]
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.task_acks_on_failure_or_timeout is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_concurrency == 1
    assert conf.worker_max_tasks_per_child is None
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is False  # finish, ack after reconnect
    assert conf.broker_connection_retry_on_startup is True
    assert conf.task_track_started is True
    assert conf.result_extended is False
    assert conf.task_default_rate_limit is None
    assert conf.result_expires == settings.result_expires


def test_app_limits_and_routing_follow_settings(settings: Settings) -> None:
    conf = make_celery(settings).conf
    visibility = conf.broker_transport_options["visibility_timeout"]
    assert visibility == settings.visibility_timeout
    assert conf.result_backend_transport_options["visibility_timeout"] == settings.visibility_timeout
    assert conf.broker_transport_options["socket_keepalive"] is True
    assert conf.broker_transport_options["health_check_interval"] > 0
    assert conf.task_time_limit == settings.task_time_limit
    assert conf.task_soft_time_limit < conf.task_time_limit < visibility
    assert conf.task_default_queue == settings.queue
    assert conf.task_routes == {GENERATE: {"queue": settings.queue}}


@pytest.mark.parametrize(("hard", "soft"), [(3600, 3540), (600, 540), (100, 90), (10, 9)])
def test_soft_time_limit_is_a_little_lower(hard: int, soft: int) -> None:
    assert soft_time_limit(hard) == soft


@pytest.mark.parametrize("visibility", [3600, 3000])
def test_settings_reject_visibility_timeout_not_above_time_limit(visibility: int) -> None:
    with pytest.raises(ValidationError, match="VISIBILITY_TIMEOUT"):
        Settings(task_time_limit=3600, visibility_timeout=visibility)


def test_get_app_is_built_once() -> None:
    assert get_app() is get_app()


# --- submit ----------------------------------------------------------------------------------


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


def test_submit_applies_the_settings_limits(app: Celery, settings: Settings, broker: redis.Redis) -> None:
    strict = settings.model_copy(update={"max_prompts": 1})
    two = {"model": "chroma", "prompts": [{"prompt": "a"}, {"prompt": "b"}]}
    with pytest.raises(InvalidRequest) as caught:
        submit(two, app=app, settings=strict)
    assert caught.value.field == "prompts"
    assert broker.llen(settings.queue) == 0


# --- wait: results, errors, progress ---------------------------------------------------------


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
    first, second = progress_meta(1, 2, 5, 25, "denoise"), progress_meta(2, 2, 1, 25, "denoise")
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
    meta = progress_meta(1, 1, 3, 25, "denoise")
    worker_app.backend.store_result(task_id, meta, PROGRESS_STATE)
    assert status(task_id, app=app) == {"state": PROGRESS_STATE, "meta": meta}
    worker_app.backend.mark_as_failure(task_id, InvalidRequest("bad width", "prompts.0.width"))
    failed = status(task_id, app=app)
    assert failed == {
        "state": "FAILURE",
        "meta": {"code": "invalid_request", "field": "prompts.0.width", "message": "bad width"},
    }
    json.dumps(failed)


# --- CLI -------------------------------------------------------------------------------------


def test_cli_validate_accepts_and_summarises() -> None:
    out = run_cli("validate", str(REQUESTS / "good" / "width_1000_snaps_to_992.json"))
    assert out.returncode == 0, out.stderr
    assert "992x992 (from 1000x1000)" in out.stdout
    assert "seed 42 (42 + index)" in out.stdout
    assert out.stderr == ""


def test_cli_validate_reads_stdin() -> None:
    out = run_cli("validate", "-", stdin=json.dumps(REFERENCE))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "ok: model chroma, 1 prompt, 1 LoRA, png output"
    assert "loras.0: my_lora_job/my_lora.safetensors x1" in out.stdout
    assert "'sks a photo of a person'" in out.stdout


@pytest.mark.parametrize(
    ("request_text", "expected"),
    [
        (
            json.dumps(BAD_WIDTH),
            "error: prompts.0.width: Input should be less than or equal to 4096 (got 4097)\n",
        ),
        ("{not json", "error: request: request is not valid JSON"),
        ("[]", "error: request: request must be a JSON object\n"),
    ],
)
def test_cli_validate_rejects_with_one_line(request_text: str, expected: str) -> None:
    out = run_cli("validate", "-", stdin=request_text)
    assert out.returncode == 2
    assert out.stderr.startswith(expected)
    assert out.stderr.count("\n") == 1
    assert out.stdout == ""


def test_cli_validate_missing_file(tmp_path: Path) -> None:
    out = run_cli("validate", str(tmp_path / "absent.json"))
    assert out.returncode == 2
    assert out.stderr.startswith("error: request: cannot read ")
    assert "Traceback" not in out.stderr


def test_cli_bad_settings_name_the_variable() -> None:
    env = cli_env()
    env["CHROMA_TASK_TIME_LIMIT"] = "9000"  # above the default visibility timeout
    out = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "validate", str(REQUESTS / "good" / "minimal.json")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 1
    assert out.stderr.startswith("error: settings: CHROMA_VISIBILITY_TIMEOUT (7200s) must exceed")
    assert out.stderr.count("\n") == 1


def test_cli_usage_errors_return_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate"]) == 2
    assert main(["validate", "a.json", "--bogus"]) == 2
    assert main(["--help"]) == 0
    assert "validate" in capsys.readouterr().out


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
    worker_app.backend.store_result(task_id, progress_meta(1, 2, 3, 25, "denoise"), PROGRESS_STATE)
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


def test_progress_line_format() -> None:
    assert format_progress(progress_meta(2, 3, 5, 10, "denoise")) == (
        "prompt 2/3  step 5/10 [##########..........] denoise"
    )
    assert format_progress(progress_meta(1, 1, 0, 0, "download")) == (
        "prompt 1/1  step 0/0 [....................] download"
    )


def test_worker_command_is_one_pool_process_per_gpu() -> None:
    argv = worker_argv("gpu-queue", ["--loglevel", "INFO"])
    assert argv[0] == sys.executable
    assert argv[1:] == [
        "-m", "celery", "-A", "worker", "worker", "--pool", "prefork", "-Q", "gpu-queue",
        "--concurrency", "1", "--loglevel", "INFO",
    ]  # fmt: skip
