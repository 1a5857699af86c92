"""The Celery task: validate, bound deliveries, call ``run_job``, report progress, map errors.

A delivery of a task that already succeeded (its acknowledgement was lost) returns the stored
result without generating again. Progress writes are advisory: a broker/backend outage delays them
(bounded retries) but never fails the generation.
"""

from __future__ import annotations

import logging
import os
import time

from celery import signals, states
from celery.exceptions import SoftTimeLimitExceeded

from tasks.app import PROGRESS_STATE, get_app, progress_meta
from tasks.errors import DeliveryLimitExceeded, DeviceLost, TimeLimitExceeded, TransientError
from tasks.names import GENERATE
from tasks.schemas import validate_request
from tasks.settings import Settings
from worker import lifecycle

log = logging.getLogger(__name__)
BACKEND_RETRIES = 30  # jittered exponential backoff capped at 10 s: a minute or two of outage
app = get_app()
settings = Settings()
# Worker side only: a state or result written while Redis restarts waits for it to come back
# (bounded) instead of failing the task; producers keep failing fast (tasks.producer).
app.conf.update(result_backend_always_retry=True, result_backend_max_retries=BACKEND_RETRIES)


@signals.worker_process_init.connect
def _load_in_pool_process(**_kwargs) -> None:
    try:
        lifecycle.load_worker(settings)
    except DeviceLost as exc:  # e.g. during warm-up: this process can do no device work
        lifecycle.exit_for_device_loss(str(exc))
    except Exception:
        # Tasks will see the error as transient and go back to the queue for another worker.
        log.exception("worker failed to load its model")


@app.task(
    name=GENERATE,
    bind=True,
    autoretry_for=(TransientError,),
    retry_backoff=2,
    retry_backoff_max=settings.retry_backoff_max,
    retry_jitter=True,
    max_retries=settings.retry_max,
)
def generate(self, request: dict) -> dict:
    started_at = time.time()
    task_id = self.request.id
    done = stored_success(self.backend, task_id)
    if done is not None:
        # A run finished but its acknowledgement was lost with its worker: do not run it twice.
        log.info("task %s already succeeded; returning its stored result", task_id)
        return done
    delivery = lifecycle.count_delivery(settings, task_id, self.request.retries)
    if delivery > settings.max_deliveries:
        raise DeliveryLimitExceeded(
            f"task was delivered {delivery} times and its worker was lost each time; "
            "it is not retried again (check the worker logs for the cause)"
        )
    checked = validate_request(request, settings.limits)
    try:
        worker = lifecycle.load_worker(settings)
    except DeviceLost as exc:
        lifecycle.exit_for_device_loss(str(exc))
        raise
    except Exception as exc:
        raise TransientError(f"worker could not load its model: {type(exc).__name__}") from exc

    def report(stage: str, index: int, total: int, step: int, steps: int) -> None:
        try:
            self.update_state(state=PROGRESS_STATE, meta=progress_meta(index + 1, total, step, steps, stage))
        except SoftTimeLimitExceeded:
            raise  # the time limit fired during the write: it must still stop the task
        except Exception as exc:  # noqa: BLE001 - progress is advisory; the generation goes on
            log.warning("task %s: progress not stored (%s: %s)", task_id, type(exc).__name__, exc)

    info = {
        "celery_hostname": self.request.hostname,
        "pid": os.getpid(),
        "retries": self.request.retries,
        "started_at": started_at,
    }
    try:
        return worker_run(worker, checked, task_id, delivery, report, info)
    except DeviceLost as exc:
        lifecycle.exit_for_device_loss(str(exc))
        raise
    except SoftTimeLimitExceeded:
        worker.engine.release_memory()
        raise TimeLimitExceeded(
            f"generation ran past the {settings.task_time_limit}s time limit and was stopped; "
            "send fewer prompts, fewer steps or smaller images"
        ) from None


def stored_success(backend, task_id: str | None) -> dict | None:
    """The stored result of ``task_id`` if an earlier delivery of it already succeeded."""
    if task_id is None:
        return None
    try:
        meta = backend.get_task_meta(task_id, cache=False)
    except Exception as exc:  # noqa: BLE001 - unknown means run it: outputs are idempotent
        log.warning("task %s: could not read its stored state (%s)", task_id, type(exc).__name__)
        return None
    return meta["result"] if meta.get("status") == states.SUCCESS else None


def worker_run(worker, request, task_id, delivery, report, info):
    from worker.job import run_job

    log.info(
        "task %s: delivery %d, %d prompts, %d LoRAs",
        task_id,
        delivery,
        len(request.prompts),
        len(request.loras),
    )
    return run_job(worker, request, task_id=task_id, delivery=delivery, report=report, worker_info=info)
