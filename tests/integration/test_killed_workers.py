"""A pool process or whole workers killed mid-task: the task is delivered again and completes once,
and a task that kills its worker every time fails after bounded deliveries.
"""

from __future__ import annotations

import signal
import time

import pytest

from tasks.errors import DeliveryLimitExceeded
from tasks.names import GENERATE
from tasks.producer import submit, wait
from tests.integration.conftest import (
    SLOW,
    broker_is_empty,
    deliveries,
    small_request,
    wait_for_stage,
    wait_gone,
)

pytestmark = pytest.mark.integration


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
