"""A whole worker lost, frozen or stopped mid-task: another worker completes the task, once.

Real services throughout: a test-owned ``redis-server``, moto's S3 over HTTP, ``celery -A worker
worker`` processes (each in its own process group, so the parent and its pool process are killed,
frozen or resumed together) on the tiny model. Requests of 150 steps at 64x64 keep the CPU in
the denoising loop for a few seconds per prompt. The measured times are printed (``pytest -s``).
"""

from __future__ import annotations

import hashlib
import json
import signal
import time

import pytest
import redis

from tasks.producer import fetch_meta, submit, wait
from tests.integration.conftest import (
    VISIBILITY_DEFAULTS,
    broker_is_empty,
    deliveries,
    small_request,
    wait_for_stage,
    wait_gone,
)

pytestmark = pytest.mark.integration

NODE_LOSS_LIMIT = 60  # seconds from the loss to the task completed elsewhere


def request(prompts: int, seed: int = 1) -> dict:
    """``prompts`` prompts of 150 steps at 64x64: about 3.5 s of denoising each on one CPU thread.
    ``seed=-1`` draws a seed per delivery, so two deliveries store different images."""
    base = small_request(sample_steps=150)
    base["prompts"] = [
        {**base["prompts"][0], "seed": seed if seed == -1 else seed + i} for i in range(prompts)
    ]
    return base


def start_workers(stack, count: int) -> list:
    workers = [stack.start_worker(wait=False) for _ in range(count)]
    for worker in workers:
        worker.wait_ready()
    return workers


def running_worker(stack, task_id: str):
    """The worker denoising ``task_id`` (named by its progress), once it is in the loop."""
    return stack.worker_of(wait_for_stage(stack.app, task_id, "denoise")["host"])


def wait_for_delivery(stack, task_id: str, count: int, timeout: float) -> float:
    """Until delivery number ``count`` of the task has started; the monotonic time it was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if deliveries(stack, task_id) >= count:
            return time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"delivery {count} of {task_id} did not start within {timeout}s")


def unacked_tags(stack) -> list[bytes]:
    client = redis.Redis.from_url(stack.settings.broker_url)
    try:
        return client.hkeys("unacked")
    finally:
        client.close()


def assert_completed_once_by(stack, s3, task_id: str, result: dict, worker, delivery: int) -> None:
    assert result["delivery"] == delivery
    assert result["worker"]["celery_hostname"].partition("@")[0] == worker.name
    assert stack.output_keys(s3, task_id) == [
        *(f"{i}.png" for i in range(len(result["images"]))),
        "result.json",
    ]
    time.sleep(1.0)
    assert broker_is_empty(stack)  # nothing left to be delivered again
    assert deliveries(stack, task_id) == delivery
    assert worker.text().count(f"[{task_id}] succeeded") == 1


def test_a_lost_worker_task_is_completed_by_another_within_a_minute(make_stack, s3):
    """SIGKILL of parent and pool process mid-denoise, at the production visibility settings."""
    stack = make_stack(**VISIBILITY_DEFAULTS)
    start_workers(stack, 2)
    task_id = submit(request(1), app=stack.app, settings=stack.settings)
    lost = running_worker(stack, task_id)
    (child,) = lost.pool_children()
    lost.signal_group(signal.SIGKILL)
    killed = time.monotonic()
    wait_gone(lost.process.pid)
    wait_gone(child)

    redelivered = wait_for_delivery(stack, task_id, 2, timeout=NODE_LOSS_LIMIT) - killed
    result = wait(task_id, app=stack.app, timeout=NODE_LOSS_LIMIT, poll_interval=0.2)
    completed = time.monotonic() - killed
    print(
        f"\nnode lost (visibility {VISIBILITY_DEFAULTS['visibility_timeout']}s, renewed every "
        f"{VISIBILITY_DEFAULTS['visibility_refresh_interval']}s): delivered again after {redelivered:.1f}s, "
        f"completed after {completed:.1f}s"
    )
    assert completed < NODE_LOSS_LIMIT
    (other,) = [w for w in stack.workers if w is not lost]
    assert_completed_once_by(stack, s3, task_id, result, other, delivery=2)


def test_a_frozen_worker_is_replaced_and_writes_nothing_when_it_resumes(make_stack, s3):
    """SIGSTOP of the whole worker mid-denoise (its sockets stay open), SIGCONT after the other
    worker has completed the task: the resumed delivery stops at its next step, writing nothing."""
    stack = make_stack(visibility_timeout=20, visibility_refresh_interval=5)
    start_workers(stack, 2)
    task_id = submit(request(3, seed=-1), app=stack.app, settings=stack.settings)
    frozen = running_worker(stack, task_id)
    (first_tag,) = unacked_tags(stack)
    frozen.signal_group(signal.SIGSTOP)
    stopped = time.monotonic()

    redelivered = wait_for_delivery(stack, task_id, 2, timeout=NODE_LOSS_LIMIT) - stopped
    # The task went back with a fresh delivery tag: the frozen worker's late acknowledgement of its
    # own tag cannot remove the new holder's entry.
    (second_tag,) = unacked_tags(stack)
    assert second_tag != first_tag
    result = wait(task_id, app=stack.app, timeout=NODE_LOSS_LIMIT, poll_interval=0.2)
    completed = time.monotonic() - stopped
    print(f"\nnode frozen (visibility 20s, renewed every 5s): delivered again after {redelivered:.1f}s, "
          f"completed after {completed:.1f}s")  # fmt: skip
    assert completed < NODE_LOSS_LIMIT
    (other,) = [w for w in stack.workers if w is not frozen]

    frozen.signal_group(signal.SIGCONT)
    deadline = time.monotonic() + 30
    ended = ("stopping without writing anything", f"[{task_id}] succeeded")
    while not any(line in frozen.text() for line in ended) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)

    # Everything stored is the second delivery's: result.json, each image, the task's state.
    stored = json.loads(s3.get_object(Bucket="outputs", Key=result["result_key"])["Body"].read())
    assert stored == result
    for image in stored["images"]:
        body = s3.get_object(Bucket="outputs", Key=image["key"])["Body"].read()
        assert hashlib.sha256(body).hexdigest() == image["sha256"]
    meta = fetch_meta(stack.app, task_id)
    assert meta["status"] == "SUCCESS" and meta["result"] == result
    assert_completed_once_by(stack, s3, task_id, result, other, delivery=2)
    assert f"task {task_id}: delivery 1 was replaced by delivery 2" in frozen.text()
    assert f"[{task_id}] succeeded" not in frozen.text()


def sigterm_while_running(make_stack, grace: int, prompts: int):
    """Two workers with ``grace`` seconds to stop; SIGTERM to the one running a ``prompts``-image
    task, to the parent only, as `docker stop` does -> (stack, task id, that worker, when)."""
    stack = make_stack(stop_grace=grace)
    start_workers(stack, 2)
    task_id = submit(request(prompts), app=stack.app, settings=stack.settings)
    stopping = running_worker(stack, task_id)
    stopping.process.send_signal(signal.SIGTERM)
    return stack, task_id, stopping, time.monotonic()


def test_sigterm_requeues_a_long_task_after_the_grace_and_another_worker_completes_it(make_stack, s3):
    grace = 3
    stack, task_id, stopping, signalled = sigterm_while_running(make_stack, grace, prompts=3)

    redelivered = wait_for_delivery(stack, task_id, 2, timeout=30) - signalled
    stopping.process.wait(timeout=30)
    exited = time.monotonic() - signalled
    result = wait(task_id, app=stack.app, timeout=60, poll_interval=0.2)
    print(f"\nSIGTERM, task longer than the {grace}s grace: requeued and started elsewhere after "
          f"{redelivered:.1f}s, worker exited after {exited:.1f}s")  # fmt: skip
    assert grace <= redelivered < grace + 5
    (other,) = [w for w in stack.workers if w is not stopping]
    assert_completed_once_by(stack, s3, task_id, result, other, delivery=2)


def test_sigterm_lets_a_task_finish_within_the_grace_and_the_worker_exits_then(make_stack, s3):
    grace = 40
    stack, task_id, stopping, signalled = sigterm_while_running(make_stack, grace, prompts=1)

    result = wait(task_id, app=stack.app, timeout=grace, poll_interval=0.2)
    finished = time.monotonic() - signalled
    stopping.process.wait(timeout=grace)
    exited = time.monotonic() - signalled
    print(f"\nSIGTERM, task shorter than the {grace}s grace: finished after {finished:.1f}s, "
          f"worker exited after {exited:.1f}s")  # fmt: skip
    assert exited < finished + 10 < grace  # it exits once the task is done, not at the end of the grace
    assert_completed_once_by(stack, s3, task_id, result, stopping, delivery=1)


def test_a_task_running_longer_than_the_visibility_timeout_is_not_delivered_again(make_stack, s3):
    visibility, interval = 12, 4
    stack = make_stack(visibility_timeout=visibility, visibility_refresh_interval=interval)
    start_workers(stack, 2)
    started = time.monotonic()
    task_id = submit(request(8), app=stack.app, settings=stack.settings)
    running = running_worker(stack, task_id)

    client = redis.Redis.from_url(stack.settings.broker_url)
    ages = []
    while fetch_meta(stack.app, task_id)["status"] not in ("SUCCESS", "FAILURE"):
        scores = [score for _, score in client.zrange("unacked_index", 0, -1, withscores=True)]
        ages += [time.time() - score for score in scores]
        assert deliveries(stack, task_id) == 1
        time.sleep(0.5)
    client.close()
    took = time.monotonic() - started
    result = wait(task_id, app=stack.app, timeout=10)
    print(f"\ntask of {took:.1f}s, visibility {visibility}s, renewed every {interval}s: "
          f"oldest renewal seen {max(ages):.1f}s old")  # fmt: skip
    assert took > 2 * visibility
    assert max(ages) < interval + 2
    assert_completed_once_by(stack, s3, task_id, result, running, delivery=1)
