"""The Celery task: validate, bound deliveries, call ``run_job``, report progress, map errors."""

from __future__ import annotations

import logging

from celery import signals
from celery.exceptions import SoftTimeLimitExceeded

from tasks.app import PROGRESS_STATE, get_app, progress_meta
from tasks.errors import DeliveryLimitExceeded, DeviceLost, TimeLimitExceeded, TransientError
from tasks.names import GENERATE
from tasks.schemas import validate_request
from tasks.settings import Settings
from worker import lifecycle

log = logging.getLogger(__name__)
app = get_app()
settings = Settings()


@signals.worker_process_init.connect
def _load_in_pool_process(**_kwargs) -> None:
    try:
        lifecycle.load_worker(settings)
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
    task_id = self.request.id
    delivery = lifecycle.count_delivery(settings, task_id, self.request.retries)
    if delivery > settings.max_deliveries:
        raise DeliveryLimitExceeded(
            f"task was delivered {delivery} times and its worker was lost each time; "
            "it is not retried again (check the worker logs for the cause)"
        )
    checked = validate_request(request, settings.limits)
    try:
        worker = lifecycle.load_worker(settings)
    except Exception as exc:
        raise TransientError(f"worker could not load its model: {type(exc).__name__}") from exc

    def report(stage: str, index: int, total: int, step: int, steps: int) -> None:
        self.update_state(state=PROGRESS_STATE, meta=progress_meta(index + 1, total, step, steps, stage))

    info = {"celery_hostname": self.request.hostname, "retries": self.request.retries}
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
