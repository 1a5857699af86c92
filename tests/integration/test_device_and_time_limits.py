"""Device faults and time limits: out of memory, a lost device, a generation past its time limit or
stuck where Python cannot stop it; the worker goes on serving.

The workers run as ``celery -A tests.integration.fault_injection worker``: the production worker,
with the device faults a prompt asks for injected.
"""

from __future__ import annotations

import time

import pytest

from tasks.errors import OutOfMemory, TimeLimitExceeded, WorkerError
from tasks.producer import submit, wait
from tests.integration.conftest import deliveries, small_request

pytestmark = pytest.mark.integration


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
