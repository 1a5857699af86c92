"""Redis restarted while a task renders, and Redis behind a password and TLS: no task lost or stopped,
no secret in a log, a result or an error.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis

from tasks.errors import LoraNotFound
from tasks.producer import submit, wait
from tests.integration.conftest import (
    SLOW,
    VISIBILITY_DEFAULTS,
    broker_is_empty,
    small_request,
    wait_for_stage,
)
from tests.services import SECRET_KEY, RedisServer

pytestmark = pytest.mark.integration


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
