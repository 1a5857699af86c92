"""The Celery side of the worker; ``celery -A worker worker`` finds ``app`` here.

Importing this module reads the settings (the environment), builds the app and registers the
task; nothing connects and no model loads until the worker starts. The parent checks its settings
before it consumes (``worker.preflight``); the single pool process loads the model
(``worker_process_init``) and is the only one that touches CUDA.

The parent also keeps its tasks from being handed to another worker while it lives, and hands
them back when it stops (``worker.fleet``: renewals from ``worker_ready``, a fresh delivery tag
for a task put back, the stop grace on SIGTERM).

The task body: return a stored success (its acknowledgement was lost), count and bound the
deliveries, validate, render (``worker.render.render_request``) with S3 in and out, map errors.
Progress writes are advisory: a backend outage delays them (bounded retries) but never fails the
generation. A delivery that a newer one replaced (its worker was presumed lost) stops at its next
step or write, writes nothing and leaves no state (``Ignore``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import replace
from typing import Any

from celery import signals, states
from celery.exceptions import Ignore, SoftTimeLimitExceeded

from tasks.app import PROGRESS_STATE, make_celery
from tasks.errors import DeliveryLimitExceeded, DeviceLost, TimeLimitExceeded, TransientError
from tasks.names import GENERATE
from tasks.quiet import quiet
from tasks.results import Progress
from tasks.schemas import GenerationRequest, validate_request
from tasks.settings import Settings, SettingsError
from worker import fleet, lifecycle, logs, preflight

log = logging.getLogger(__name__)
BACKEND_RETRIES = 30  # jittered exponential backoff capped at 10 s: a minute or two of outage

settings = Settings()
app = make_celery(settings)
# Worker side only: a state or result written while Redis restarts waits for it to come back
# (bounded) instead of failing the task; producers keep failing fast (tasks.producer).
app.conf.update(result_backend_always_retry=True, result_backend_max_retries=BACKEND_RETRIES)
signals.after_setup_logger.connect(logs.add_task_ids)
fleet.renew_delivery_tags_on_restore()


@signals.worker_init.connect
def _check_settings(**_kwargs: Any) -> None:
    """In the parent, before the pool starts and before anything is consumed."""
    quiet(settings.verbose)  # before torch and the model libraries load; the pool processes inherit it
    try:
        preflight.check(settings)
    except SettingsError as exc:
        lifecycle.exit_for_settings(str(exc), from_pool=False)
    # Imported once here and inherited by every pool process, which then starts seconds sooner
    # (torch alone; nothing that touches CUDA is imported or called before the fork).
    import torch  # noqa: F401


@signals.worker_process_init.connect
def load_in_pool_process(**_kwargs: Any) -> None:
    try:
        lifecycle.load_runtime(settings)
    except DeviceLost as exc:  # e.g. during warm-up: this process can do no device work
        lifecycle.exit_for_device_loss(str(exc))
    except SettingsError as exc:  # something only the device could tell: stop the whole worker
        lifecycle.exit_for_settings(str(exc), from_pool=True)
    except Exception:
        # Tasks will see the error as transient and go back to the queue for another worker.
        log.exception("worker failed to load its model")


@signals.worker_ready.connect
def _renew_held_tasks(sender: Any, **_kwargs: Any) -> None:
    """In the parent, once the pool has forked and the consumer is up."""
    fleet.start_refresher(sender, settings.broker_url, settings.visibility_refresh_interval)


@signals.worker_shutting_down.connect
def _stop_grace(how: str, **_kwargs: Any) -> None:
    """SIGTERM (a warm shutdown): the running task may finish within the grace, else it is requeued."""
    if how == "Warm":
        log.warning(
            "stopping: a running task has %ss to finish, then goes back to the queue", settings.stop_grace
        )
        fleet.requeue_after_grace(settings.stop_grace)


@signals.worker_shutdown.connect
def _exit_code(**_kwargs: Any) -> None:
    lifecycle.exit_if_settings_failed()


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
        runtime = lifecycle.load_runtime(settings)
    except DeviceLost as exc:
        lifecycle.exit_for_device_loss(str(exc))
        raise
    except Exception as exc:
        raise TransientError(f"worker could not load its model: {type(exc).__name__}") from exc

    host = self.request.hostname or socket.gethostname()
    fence = lifecycle.DeliveryFence(settings, task_id, self.request.retries, delivery)

    def report(progress: Progress) -> None:
        try:
            fence.check()  # every step: a delivery that was replaced stops here (Superseded)
        except TransientError as exc:  # unknown: go on; every write checks again and waits
            log.warning("task %s: %s", task_id, exc)
        try:
            self.update_state(state=PROGRESS_STATE, meta=replace(progress, host=host).as_meta())
        except SoftTimeLimitExceeded:
            raise  # the time limit fired during the write: it must still stop the task
        except Exception as exc:  # noqa: BLE001 - progress is advisory; the generation goes on
            log.warning("task %s: progress not stored (%s: %s)", task_id, type(exc).__name__, exc)

    info = {
        "celery_hostname": host,
        "pid": os.getpid(),
        "retries": self.request.retries,
        "started_at": started_at,
    }
    try:
        return render(runtime, checked, task_id, fence, report, info)
    except lifecycle.Superseded as exc:
        # Presumed lost and back: the newer delivery owns the outputs and the task's state.
        log.warning("task %s: %s; stopping without writing anything", task_id, exc)
        raise Ignore() from exc
    except DeviceLost as exc:
        lifecycle.exit_for_device_loss(str(exc))
        raise
    except SoftTimeLimitExceeded:
        runtime.engine.release_memory()
        raise TimeLimitExceeded(
            f"generation ran past the {settings.task_time_limit}s time limit and was stopped; "
            "send fewer prompts, fewer steps or smaller images"
        ) from None


def render(
    runtime, request: GenerationRequest, task_id: str, fence: lifecycle.DeliveryFence, report, info
) -> dict:
    """``render_request`` with LoRAs from S3 and outputs to S3 (while ``fence`` holds), as JSON."""
    from worker.render import S3Loras, S3Outputs, render_request

    log.info(
        "task %s: delivery %d, %d prompts, %d LoRAs",
        task_id,
        fence.delivery,
        len(request.prompts),
        len(request.loras),
    )
    result = render_request(
        runtime.engine,
        request,
        task_id=task_id,
        loras=S3Loras(runtime.s3, runtime.lora_cache, runtime.settings),
        sink=lifecycle.FencedOutputs(S3Outputs(runtime.s3, runtime.settings, task_id), fence),
        progress=report,
        delivery=fence.delivery,
        worker=info,
    )
    return result.model_dump(mode="json")


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
