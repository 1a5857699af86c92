"""S3 failing: transient errors healed by retries, permanent ones failing the task cleanly and boundedly,
a missing LoRA failing at once, LoRAs fetched only from allowed buckets.

S3 is moto's server over HTTP, behind ``FaultProxy`` where it must fail.
"""

from __future__ import annotations

import time

import pytest

from tasks.errors import InvalidRequest, LoraNotFound, StorageUnavailable
from tasks.names import GENERATE
from tasks.producer import submit, wait
from tests.integration.conftest import LORA_KEY, small_request
from tests.services import SECRET_KEY

pytestmark = pytest.mark.integration


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
