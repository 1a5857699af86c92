"""Faults and bad input: nothing lost, nothing duplicated, the worker stays up.

Every test runs the real thing: a test-owned ``redis-server``, moto's S3 over HTTP (behind
``FaultProxy`` where S3 must fail), and ``celery -A worker worker`` processes on the tiny model.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest
import redis

from tasks.errors import (
    DeliveryLimitExceeded,
    InvalidLora,
    InvalidRequest,
    LoraNotFound,
    OutOfMemory,
    StorageUnavailable,
    TimeLimitExceeded,
    WorkerError,
)
from tasks.names import GENERATE
from tasks.producer import submit, wait
from tests.integration.conftest import (
    LORA_KEY,
    VISIBILITY_DEFAULTS,
    broker_is_empty,
    deliveries,
    small_request,
    wait_for_stage,
    wait_gone,
)
from tests.services import SECRET_KEY, RedisServer

pytestmark = pytest.mark.integration

# About 2-3 s of denoising on one CPU thread: long enough to be killed in the middle.
SLOW = {"width": 512, "height": 512, "sample_steps": 20}


def kill_mid_denoise(stack, worker, task_id: str, forget: bool = False) -> int:
    """SIGKILL the pool process while it denoises ``task_id``.

    ``forget``: then drop the dead delivery's stored state, so that its stale "denoise" is never
    taken for the next delivery's.
    """
    wait_for_stage(stack.app, task_id, "denoise")
    pid = worker.kill_child()
    wait_gone(pid)
    if forget:
        time.sleep(0.2)  # let Redis read whatever the dead process had already sent
        stack.app.AsyncResult(task_id).forget()
    return pid


# -- 1. worker killed mid-task ---------------------------------------------------------------------


def test_worker_killed_mid_denoise_redelivers_and_completes_once(make_stack, s3):
    stack = make_stack()
    worker = stack.start_worker()
    request = small_request(**SLOW)
    task_id = submit(request, app=stack.app, settings=stack.settings)
    killed = kill_mid_denoise(stack, worker, task_id)

    result = wait(task_id, app=stack.app, timeout=120, poll_interval=0.2)
    assert result["delivery"] == 2
    assert stack.output_keys(s3, task_id) == ["0.png", "result.json"]
    assert worker.process.poll() is None and killed not in worker.pool_children()
    # Completed once: nothing left to deliver a third time, and only one run ever succeeded.
    time.sleep(1.0)
    assert broker_is_empty(stack)
    assert deliveries(stack, task_id) == 2
    assert worker.text().count(f"[{task_id}] succeeded") == 1

    # The same message once more (an acknowledgement lost after the run had succeeded): the worker
    # returns the stored result instead of generating again.
    result_key = f"{stack.settings.output_prefix}/{task_id}/result.json"
    written = s3.head_object(Bucket="outputs", Key=result_key)["LastModified"]
    stack.app.send_task(GENERATE, args=[request], task_id=task_id)
    deadline = time.monotonic() + 30
    while worker.text().count(f"[{task_id}] succeeded") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f"task {task_id} already succeeded" in worker.text()
    assert wait(task_id, app=stack.app, timeout=10) == result
    assert deliveries(stack, task_id) == 2
    assert s3.head_object(Bucket="outputs", Key=result_key)["LastModified"] == written


def test_task_that_kills_its_worker_every_time_fails_after_bounded_deliveries(make_stack, s3):
    stack = make_stack(max_deliveries=2)
    worker = stack.start_worker()
    task_id = submit(small_request(**SLOW), app=stack.app, settings=stack.settings)
    killed = [kill_mid_denoise(stack, worker, task_id, forget=True) for _ in range(2)]

    with pytest.raises(DeliveryLimitExceeded) as failed:
        wait(task_id, app=stack.app, timeout=120, poll_interval=0.2)
    assert failed.value.code == "delivery_limit"
    assert "delivered 3 times" in str(failed.value)
    assert len(set(killed)) == 2
    assert stack.output_keys(s3, task_id) == []
    time.sleep(1.0)
    assert broker_is_empty(stack)
    # The worker is still up and serves the next task.
    good = wait(submit(small_request(), app=stack.app, settings=stack.settings), app=stack.app, timeout=60)
    assert good["delivery"] == 1


def test_every_worker_lost_mid_task_a_worker_started_later_takes_their_tasks(make_stack, s3):
    """Both workers gone at once, parent and pool process (their machines lost): nobody renews
    the two tasks, and a worker started later takes both once the visibility timeout has passed
    since their last renewal (its first scan runs as it starts). One worker lost while another
    runs: tests/integration/test_node_loss.py."""
    stack = make_stack(visibility_timeout=20, visibility_refresh_interval=5)
    first, second = stack.start_worker(wait=False), stack.start_worker(wait=False)
    for worker in (first, second):
        worker.wait_ready()
    task_ids = [
        submit(small_request(**SLOW, seed=i), app=stack.app, settings=stack.settings) for i in range(2)
    ]
    for task_id in task_ids:
        wait_for_stage(stack.app, task_id, "denoise")
    for worker in (first, second):
        children = worker.pool_children()
        worker.signal_group(signal.SIGKILL)
        for pid in [worker.process.pid, *children]:
            wait_gone(pid)
    lost = time.monotonic()

    replacement = stack.start_worker()
    results = [wait(task_id, app=stack.app, timeout=60, poll_interval=0.5) for task_id in task_ids]
    assert time.monotonic() - lost < 60
    assert [r["delivery"] for r in results] == [2, 2]
    assert {r["worker"]["celery_hostname"].partition("@")[0] for r in results} == {replacement.name}
    for task_id in task_ids:
        assert stack.output_keys(s3, task_id) == ["0.png", "result.json"]
    assert broker_is_empty(stack)


# -- 2. broker restart -----------------------------------------------------------------------------


def test_broker_restart_during_processing_loses_no_task_and_stops_none(make_stack, s3, tmp_path):
    """Redis restarts while a task renders: the task keeps its process and finishes, its worker
    keeps renewing it (so no scan hands it out again), and it is acknowledged after the reconnect.
    Cancelling running tasks on a lost connection (``worker_cancel_long_running_tasks_on_connection
    _loss``) instead kills the pool process (a model reload) and the task waits out the visibility
    timeout: measured 55.6 s instead of 16.8 s for a 4 s outage (docs/architecture.md, "Failures")."""
    own = RedisServer(tmp_path / "restart-redis")  # append-only, fsync always
    try:
        stack = make_stack(broker_url=f"{own.url}/0", result_backend=f"{own.url}/1", **VISIBILITY_DEFAULTS)
        worker = stack.start_worker()
        children = worker.pool_children()
        task_ids = [
            submit(small_request(**SLOW, seed=i), app=stack.app, settings=stack.settings) for i in range(3)
        ]
        task_ids += [submit(small_request(seed=i), app=stack.app, settings=stack.settings) for i in range(3)]
        wait_for_stage(stack.app, task_ids[0], "denoise")
        own.restart(down_seconds=4.0)  # one task mid-denoise (it ends while Redis is down), five queued

        results = [wait(task_id, app=stack.app, timeout=180, poll_interval=0.3) for task_id in task_ids]
        assert [r["task_id"] for r in results] == task_ids
        for task_id in task_ids:
            assert stack.output_keys(s3, task_id) == ["0.png", "result.json"]
        assert "Connection to broker lost" in worker.text()  # the restart did cut the worker off
        # Nothing is left to be delivered again later (for example after the visibility timeout).
        time.sleep(1.0)
        assert broker_is_empty(stack)
        assert [r["delivery"] for r in results] == [1] * len(task_ids)
        assert worker.pool_children() == children  # the running task was not cancelled
    finally:
        own.stop()


# -- 3. S3 faults ----------------------------------------------------------------------------------


def test_s3_5xx_during_download_and_upload_heals_after_retries(make_stack, s3, fault_proxy):
    stack = make_stack(s3_url=fault_proxy.url)  # s3_max_attempts=2, retry_max=1
    stack.start_worker()

    # LoRA download: both tries of the first GET fail, the task retries after a backoff.
    fault_proxy.methods, fault_proxy.fail_next = {"GET"}, 3
    task_id = submit(small_request(), app=stack.app, settings=stack.settings)
    result = wait(task_id, app=stack.app, timeout=60, poll_interval=0.2)
    assert result["worker"]["retries"] == 1
    assert [s for _, _, s in fault_proxy.seen("GET", LORA_KEY)] == [503, 503, 503, 200]
    assert stack.output_keys(s3, task_id) == ["0.png", "result.json"]

    # Upload: the image PUT fails on both tries, the task runs again and uploads.
    fault_proxy.reset()
    fault_proxy.methods, fault_proxy.fail_next = {"PUT"}, 3
    task_id = submit(small_request(), app=stack.app, settings=stack.settings)
    result = wait(task_id, app=stack.app, timeout=60, poll_interval=0.2)
    assert result["worker"]["retries"] == 1
    assert [s for _, _, s in fault_proxy.seen("PUT", f"{task_id}/0.png")] == [503, 503, 503, 200]
    assert stack.output_keys(s3, task_id) == ["0.png", "result.json"]
    assert stack.workers[0].text().count("Retry in") == 2


PERMANENT_FAULTS = [
    # (what fails, mode, methods, path part, S3 key the error names)
    ("download: endpoint drops connections", "down", None, "", LORA_KEY),
    ("download: endpoint answers 503", "503", {"GET"}, "", LORA_KEY),
    ("upload: endpoint drops connections", "down", {"PUT"}, "", "/0.png"),
    ("upload of result.json: endpoint answers 503", "503", {"PUT"}, "result.json", "/result.json"),
    ("endpoint stopped", "stopped", None, "", LORA_KEY),
]


def test_s3_permanent_failure_fails_the_task_cleanly_and_the_worker_goes_on(make_stack, s3, fault_proxy):
    stack = make_stack(s3_url=fault_proxy.url)  # s3_max_attempts=2, retry_max=1, backoff <= 1 s
    worker = stack.start_worker()
    attempts = stack.settings.s3_max_attempts * (stack.settings.retry_max + 1)
    for what, mode, methods, path_part, named in PERMANENT_FAULTS:
        fault_proxy.reset()
        if mode == "stopped":
            fault_proxy.stop()
        else:
            fault_proxy.mode, fault_proxy.methods, fault_proxy.path_contains = mode, methods, path_part
        started = time.monotonic()
        task_id = submit(small_request(), app=stack.app, settings=stack.settings)
        with pytest.raises(StorageUnavailable) as failed:
            wait(task_id, app=stack.app, timeout=60, poll_interval=0.2)
        elapsed = time.monotonic() - started
        assert failed.value.code == "storage_unavailable", what
        assert named in str(failed.value) and "try again later" in str(failed.value), what
        assert SECRET_KEY not in str(failed.value), what
        if mode != "stopped":
            failing = [e for e in fault_proxy.log if e[2] in (0, 503)]
            assert len(failing) == attempts, (what, fault_proxy.log)  # bounded: no endless retrying
        assert elapsed < 30, what
        fault_proxy.reset()
        assert stack.output_keys(s3, task_id) == [], what  # no result.json, no partial images

    # The endpoint is back: the same worker process serves the next task.
    children = worker.pool_children()
    result = wait(submit(small_request(), app=stack.app, settings=stack.settings), app=stack.app, timeout=60)
    assert result["delivery"] == 1 and worker.pool_children() == children


def test_missing_lora_fails_at_once_with_one_request_and_no_retry(make_stack, s3, fault_proxy):
    stack = make_stack(s3_url=fault_proxy.url)
    stack.start_worker()
    request = small_request()
    request["loras"] = [{"path": LORA_KEY}, {"path": "nobody/missing.safetensors"}]
    task_id = submit(request, app=stack.app, settings=stack.settings)
    with pytest.raises(LoraNotFound) as failed:
        wait(task_id, app=stack.app, timeout=60, poll_interval=0.2)
    assert failed.value.code == "lora_not_found" and failed.value.field == "loras.1.path"
    assert "s3://loras/nobody/missing.safetensors" in str(failed.value)
    assert fault_proxy.seen(path_contains="missing") == [("HEAD", "/loras/nobody/missing.safetensors", 404)]
    assert fault_proxy.seen("PUT") == []
    assert "Retry in" not in stack.workers[0].text()


# -- 4. device faults ------------------------------------------------------------------------------


def test_out_of_memory_fails_the_request_and_the_same_process_serves_the_next(make_stack, s3):
    from tests.integration.fault_injection import OOM

    stack = make_stack()
    worker = stack.start_worker(app="tests.integration.fault_injection")
    children = worker.pool_children()
    task_id = submit(small_request(prompt=f"{OOM} a photo"), app=stack.app, settings=stack.settings)
    with pytest.raises(OutOfMemory) as failed:
        wait(task_id, app=stack.app, timeout=60, poll_interval=0.2)
    assert failed.value.code == "out_of_memory" and "smaller width/height" in str(failed.value)
    assert stack.output_keys(s3, task_id) == []

    result = wait(submit(small_request(), app=stack.app, settings=stack.settings), app=stack.app, timeout=60)
    assert worker.pool_children() == children and result["worker"]["pid"] == children[0]
    assert deliveries(stack, task_id) == 1  # failed once, not redelivered


def test_device_lost_exits_the_process_and_the_task_is_delivered_again(make_stack, s3, tmp_path):
    from tests.integration.fault_injection import DEVICE_LOST_ONCE
    from worker.lifecycle import DEVICE_LOST_EXIT_CODE

    stack = make_stack()
    stack.env["FAULT_INJECTION_DIR"] = str(tmp_path)
    worker = stack.start_worker(app="tests.integration.fault_injection")
    (first,) = worker.pool_children()
    request = small_request(prompt=f"{DEVICE_LOST_ONCE} a photo")
    task_id = submit(request, app=stack.app, settings=stack.settings)

    result = wait(task_id, app=stack.app, timeout=90, poll_interval=0.2)
    assert (tmp_path / "device-lost").exists()
    assert result["delivery"] == 2 and result["worker"]["pid"] != first
    assert first not in worker.pool_children() and worker.process.poll() is None
    log = worker.text()
    assert "device lost, exiting so the pool replaces this process" in log
    assert f"exitcode {DEVICE_LOST_EXIT_CODE}" in log
    assert stack.output_keys(s3, task_id) == ["0.png", "result.json"]


# -- 5. bad input ----------------------------------------------------------------------------------

# Limits as settings: tighter than the defaults, so requests the schema accepts can exceed them.
LIMITS = {
    "max_prompts": 4,
    "max_loras": 2,
    "max_steps": 30,
    "max_side": 2048,
    "max_pixels": 1024 * 1024,
    "max_prompt_chars": 1000,
    "max_request_bytes": 64 * 1024,
    "max_lora_bytes": 256 * 1024,
}


def limit_cases() -> list[tuple[str, dict, str, str]]:
    """(name, request, field, message part) for requests the schema accepts but ``LIMITS`` refuses."""
    many_loras = small_request()
    many_loras["loras"] = [{"path": LORA_KEY, "network_multiplier": m} for m in (1.0, 0.5, 0.2)]
    many_prompts = small_request()
    many_prompts["prompts"] = many_prompts["prompts"] * 5
    return [
        ("max_prompts", many_prompts, "prompts", "at most 4"),
        ("max_loras", many_loras, "loras", "at most 2"),
        ("max_steps", small_request(sample_steps=31), "prompts.0.sample_steps", "limit is 30"),
        ("max_side", small_request(width=4096, height=64), "prompts.0.width", "at most 2048"),
        ("max_pixels", small_request(width=2048, height=1024), "prompts.0.width", "2097152 pixels"),
        ("max_prompt_chars", small_request(prompt="a" * 1001), "prompts.0.prompt", "limit is 1000"),
        ("max_request_bytes", small_request(neg="n" * 70_000), "request", "limit of 65536 bytes"),
    ]


# Files broken below the LoRA level are refused by the download's safetensors check (storage), whose
# messages differ from the engine's parser (``tests.loras`` names the parser's).
FILE_LEVEL_MESSAGES = {
    "zero_tensors": ("holds no tensors",),
    "empty_file": ("0 bytes", "too short"),
    "truncated": ("it is truncated",),
    "pickle_renamed": ("pickled", "never loaded"),
    "header_claims_gigabytes": ("header of 8589934592 bytes",),
    "header_longer_than_file": ("4096 byte header", "truncated"),
    "tensor_claims_gigabytes": ("40000000000 bytes", "truncated"),
    "non_json_header": ("not valid JSON",),
    "header_not_object": ("not a JSON object",),
    "too_big": (f"at most {LIMITS['max_lora_bytes']} bytes",),
}


def test_malformed_requests_and_loras_fail_clearly_and_the_worker_serves_a_good_task(make_stack, s3):
    from tests import loras
    from tests.unit.test_requests_corpus import BAD, field_matches, load_bad

    stack = make_stack(**LIMITS)
    worker = stack.start_worker()
    children = worker.pool_children()

    # Requests a producer that skips validation could send: the corpus, then the limits.
    cases = [(path.stem, *load_bad(path), "") for path in BAD] + limit_cases()
    assert len(cases) >= 40
    sent = [
        (name, field, part, stack.app.send_task(GENERATE, args=[request]).id)
        for name, request, field, part in cases
    ]

    # Malformed LoRA files in the LoRA bucket: each named by a request the schema accepts.
    bad_loras = {m.name: m for m in loras.MALFORMED}
    assert len(bad_loras) >= 10
    folder = stack.folder / "bad-loras"
    folder.mkdir()
    for name, malformed in bad_loras.items():
        path = folder / f"{name}.safetensors"
        malformed.build(path)
        s3.put_object(Bucket="loras", Key=f"bad/{name}.safetensors", Body=path.read_bytes())
    s3.put_object(Bucket="loras", Key="bad/too_big.safetensors", Body=b"\0" * (LIMITS["max_lora_bytes"] + 1))
    lora_tasks = {}
    for name in [*bad_loras, "too_big"]:
        request = small_request()
        request["loras"] = [{"path": f"bad/{name}.safetensors"}]
        lora_tasks[name] = submit(request, app=stack.app, settings=stack.settings)

    for name, field, part, task_id in sent:
        with pytest.raises(InvalidRequest) as failed:
            wait(task_id, app=stack.app, timeout=60, poll_interval=0.1)
        error = failed.value
        assert type(error) is InvalidRequest and error.code == "invalid_request", name
        assert field_matches(error.field, field), f"{name}: {error.field!r} != {field!r}"
        assert error.message and part in error.message and len(error.message) < 2000, (name, error.message)
        assert stack.output_keys(s3, task_id) == [], name
    for name, task_id in lora_tasks.items():
        with pytest.raises(InvalidLora) as failed:
            wait(task_id, app=stack.app, timeout=60, poll_interval=0.1)
        error = failed.value
        assert error.code == "invalid_lora" and error.field == "loras.0.path", (name, error)
        expected = FILE_LEVEL_MESSAGES.get(name) or bad_loras[name].expect
        assert all(part in error.message for part in expected), (name, expected, error.message)
        assert stack.output_keys(s3, task_id) == [], name

    # Nothing bad reached the GPU or took the worker down: the same process serves a good task.
    result = wait(submit(small_request(), app=stack.app, settings=stack.settings), app=stack.app, timeout=60)
    assert result["delivery"] == 1 and worker.pool_children() == children
    assert "Retry in" not in worker.text()


def test_time_limit_stops_a_long_generation_and_the_worker_serves_the_next(make_stack, s3):
    from tests.integration.fault_injection import HANG

    stack = make_stack(task_time_limit=10, visibility_timeout=30)  # soft limit at 9 s
    stack.start_worker(app="tests.integration.fault_injection")

    # A generation that takes a minute on this CPU: the soft limit stops it inside the task.
    long = small_request(width=1024, height=1024, sample_steps=50)
    started = time.monotonic()
    task_id = submit(long, app=stack.app, settings=stack.settings)
    with pytest.raises(TimeLimitExceeded) as failed:
        wait(task_id, app=stack.app, timeout=60, poll_interval=0.2)
    assert time.monotonic() - started < 20
    assert failed.value.code == "time_limit" and "10s time limit" in str(failed.value)
    assert stack.output_keys(s3, task_id) == []

    # Stuck where the soft limit cannot reach (a native call): the hard limit kills the process.
    stuck = small_request(prompt=f"{HANG} a photo")
    started = time.monotonic()
    task_id = submit(stuck, app=stack.app, settings=stack.settings)
    with pytest.raises(WorkerError) as failed:
        wait(task_id, app=stack.app, timeout=60, poll_interval=0.2)
    assert time.monotonic() - started < 20
    assert "time limit" in str(failed.value).lower()
    assert stack.output_keys(s3, task_id) == []

    started = time.monotonic()
    result = wait(submit(small_request(), app=stack.app, settings=stack.settings), app=stack.app, timeout=60)
    assert result["delivery"] == 1 and time.monotonic() - started < 20
    assert deliveries(stack, task_id) == 1  # the stuck task was not delivered again


# -- 6. security -----------------------------------------------------------------------------------


class _MakeDirectoryWhenUnpickled:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickled_message_is_refused_and_never_unpickled(make_stack, s3, tmp_path):
    stack = make_stack()
    worker = stack.start_worker()
    marker = tmp_path / "unpickled"
    payload = _MakeDirectoryWhenUnpickled(str(marker))
    bad = stack.app.send_task(GENERATE, args=[payload], serializer="pickle")

    good = wait(submit(small_request(), app=stack.app, settings=stack.settings), app=stack.app, timeout=60)
    assert good["delivery"] == 1
    assert not marker.exists(), "a pickled message was deserialized by the worker"
    assert deliveries(stack, bad.id) == 0  # the task body never ran
    assert stack.output_keys(s3, bad.id) == []
    assert "ContentDisallowed" in worker.text() or "Refusing to deserialize" in worker.text()
    time.sleep(0.5)
    assert broker_is_empty(stack)  # refused for good, not requeued


def test_lora_fetches_only_from_allowed_buckets(make_stack, s3, fault_proxy):
    s3.create_bucket(Bucket="extra-loras")
    body = s3.get_object(Bucket="loras", Key=LORA_KEY)["Body"].read()
    s3.put_object(Bucket="extra-loras", Key="job/lora.safetensors", Body=body)
    s3.put_object(Bucket="outputs", Key="not-a-lora/lora.safetensors", Body=body)
    stack = make_stack(s3_url=fault_proxy.url, lora_allowed_buckets="extra-loras")
    stack.start_worker()

    refused = {
        "s3://outputs/not-a-lora/lora.safetensors": "not allowed",
        "s3://other-bucket/job/lora.safetensors": "not allowed",
        "../outputs/not-a-lora/lora.safetensors": "'..'",
        "https://example.com/lora.safetensors": "other URL schemes",
        "job/lora.ckpt": "nothing pickled",
    }
    task_ids = {}
    for path, _ in refused.items():
        request = small_request()
        request["loras"] = [{"path": path}]
        task_ids[path] = stack.app.send_task(GENERATE, args=[request]).id  # skips producer checks
    for path, reason in refused.items():
        with pytest.raises(InvalidRequest) as failed:
            wait(task_ids[path], app=stack.app, timeout=60, poll_interval=0.1)
        assert failed.value.field == "loras.0.path" and reason in str(failed.value), (path, failed.value)
    assert fault_proxy.seen() == []  # nothing was fetched for any of them

    request = small_request()
    request["loras"] = [{"path": "s3://extra-loras/job/lora.safetensors"}]
    result = wait(submit(request, app=stack.app, settings=stack.settings), app=stack.app, timeout=60)
    assert result["loras"][0]["uri"] == "s3://extra-loras/job/lora.safetensors"
    assert all("/extra-loras/" in path for _, path, _ in fault_proxy.seen(path_contains="lora.safetensors"))


def test_a_token_sent_in_a_request_is_refused_without_being_echoed(make_stack, s3):
    stack = make_stack()
    worker = stack.start_worker()
    token = f"hf_{uuid.uuid4().hex}"
    request = {**small_request(), "hf_token": token}
    task_id = stack.app.send_task(GENERATE, args=[request]).id  # a producer that skips validation
    with pytest.raises(InvalidRequest) as failed:
        wait(task_id, app=stack.app, timeout=60, poll_interval=0.1)
    assert failed.value.field == "hf_token"
    assert token not in json.dumps(failed.value.to_dict())
    assert token not in worker.text()


def test_password_and_tls_redis_urls_work_and_no_secret_leaks(make_stack, s3, tmp_path):
    password = f"pw-{uuid.uuid4().hex}"
    own = RedisServer(tmp_path / "tls-redis", password=password, tls=True)
    try:
        assert own.url.startswith("rediss://")
        with pytest.raises(redis.AuthenticationError):  # the password is really required
            redis.Redis(host="127.0.0.1", port=own.port, ssl=True, ssl_ca_certs=str(own.ca_file)).ping()
        stack = make_stack(broker_url=own.url_for(0), result_backend=own.url_for(1))
        worker = stack.start_worker()

        result = wait(
            submit(small_request(), app=stack.app, settings=stack.settings), app=stack.app, timeout=60
        )
        assert stack.output_keys(s3, result["task_id"]) == ["0.png", "result.json"]
        missing = small_request()
        missing["loras"] = [{"path": "nobody/missing.safetensors"}]
        with pytest.raises(LoraNotFound) as failed:
            wait(submit(missing, app=stack.app, settings=stack.settings), app=stack.app, timeout=60)

        stored = s3.get_object(Bucket="outputs", Key=result["result_key"])["Body"].read().decode()
        texts = {
            "worker log": worker.text(),
            "result": json.dumps(result),
            "result.json": stored,
            "error": json.dumps(failed.value.to_dict()),
        }
        for secret in (password, SECRET_KEY):
            for where, text in texts.items():
                assert secret not in text, f"secret found in the {where}"
        assert "rediss://:**@" in worker.text()  # the banner shows the URL with its password masked
    finally:
        own.stop()
