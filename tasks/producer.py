"""The producer API: submit a request, follow its progress, get its result or its error.

::

    task_id = submit(request)                       # validated here; invalid -> InvalidRequest
    result = wait(task_id, on_progress=print)       # dict (GenerationResult as JSON)
    status(task_id)                                 # {"state": "PROGRESS", "meta": {...}}

A request is validated before anything is enqueued, so an invalid one never reaches a worker.
A failed task re-raises as the ``tasks.errors`` class the worker raised (field and message kept);
broker or backend outages raise ``TransientError``.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import Celery, states
from celery.exceptions import (
    BackendGetMetaError,
    SecurityError,
    SoftTimeLimitExceeded,
    TaskRevokedError,
    TimeLimitExceeded,
)
from kombu.exceptions import OperationalError

from tasks.app import PROGRESS_STATE, get_app, make_celery
from tasks.errors import TimeLimitExceeded as TaskTimeLimit
from tasks.errors import TransientError, WorkerError, error_classes
from tasks.names import GENERATE
from tasks.schemas import GenerationRequest, validate_request
from tasks.settings import Settings

ProgressCallback = Callable[[dict[str, Any]], None]


def submit(
    request: dict[str, Any] | str | bytes | GenerationRequest,
    *,
    app: Celery | None = None,
    settings: Settings | None = None,
    task_id: str | None = None,
) -> str:
    """Validate ``request`` against ``settings.limits`` and enqueue it; returns the task id.

    ``settings`` defaults to ``Settings()`` (the environment); ``app`` to the app for those
    settings. Raises ``InvalidRequest`` (nothing enqueued) or ``TransientError`` (broker down).
    """
    if app is None:
        app = get_app() if settings is None else app_for(settings)
    settings = settings if settings is not None else Settings()
    validated = validate_request(request, settings.limits)
    task_id = task_id or str(uuid.uuid4())
    try:
        app.send_task(
            GENERATE,
            args=[validated.model_dump(mode="json", exclude_none=True)],
            task_id=task_id,
            queue=settings.queue,
        )
    except OperationalError as exc:
        raise TransientError(f"could not enqueue task {task_id}: broker unreachable ({exc})") from exc
    return task_id


def wait(
    task_id: str,
    *,
    app: Celery | None = None,
    on_progress: ProgressCallback | None = None,
    timeout: float | None = None,
    poll_interval: float = 0.5,
) -> dict[str, Any]:
    """Poll until the task ends; return its result dict or raise its error.

    ``on_progress(meta)`` is called each time the ``PROGRESS`` meta changes (see
    ``tasks.app.ProgressMeta``). A failed task raises its ``WorkerError`` subclass; no end within
    ``timeout`` seconds raises ``TimeoutError`` (the task itself keeps running).
    """
    app = app if app is not None else get_app()
    deadline = None if timeout is None else time.monotonic() + timeout
    last_progress: Any = None
    while True:
        meta = fetch_meta(app, task_id)
        state = meta["status"]
        if state == states.SUCCESS:
            result: dict[str, Any] = meta["result"]
            return result
        if state in states.PROPAGATE_STATES:
            raise task_error(task_id, meta["result"])
        if state == PROGRESS_STATE and on_progress is not None and meta["result"] != last_progress:
            last_progress = meta["result"]
            on_progress(last_progress)
        pause = poll_interval
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"task {task_id} did not finish within {timeout} s (last state {state}); "
                    "it may still be running"
                )
            pause = min(pause, left)
        time.sleep(pause)


def status(task_id: str, *, app: Celery | None = None) -> dict[str, Any]:
    """The task's state and a JSON-friendly meta: progress, result, or the error as a dict."""
    app = app if app is not None else get_app()
    meta = fetch_meta(app, task_id)
    info = meta["result"]
    if isinstance(info, BaseException):
        info = task_error(task_id, info).to_dict()
    return {"state": meta["status"], "meta": info}


def fetch_meta(app: Celery, task_id: str) -> dict[str, Any]:
    """One read of the task's stored state (state and meta from the same snapshot)."""
    connection_errors = getattr(app.backend, "connection_errors", ())
    try:
        meta: dict[str, Any] = app.backend.get_task_meta(task_id)
    except SecurityError as exc:
        raise WorkerError(f"task {task_id} stored an error that is not an exception class ({exc})") from exc
    except (BackendGetMetaError, *connection_errors) as exc:
        raise TransientError(
            f"could not read the state of task {task_id}: backend unreachable ({exc})"
        ) from exc
    return meta


def task_error(task_id: str, exc: BaseException | None) -> WorkerError:
    """The ``tasks.errors`` exception for a failed task's stored exception.

    Celery rebuilds a stored exception as ``cls(*args)`` when its module is imported here, which
    is always true for ``tasks.errors``; otherwise it makes a stand-in class of the same name, and
    the name and args are enough to rebuild ours.
    """
    if isinstance(exc, WorkerError):
        return exc
    if exc is None:
        return WorkerError(f"task {task_id} failed without an error")
    if isinstance(exc, TimeLimitExceeded | SoftTimeLimitExceeded):  # Celery's, not ours (same name)
        return TaskTimeLimit(f"task {task_id} was stopped at its time limit ({exc}s)")
    known = _error_classes().get(type(exc).__name__)
    if known is not None and exc.args and isinstance(exc.args[0], str):
        field = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else None
        return known(exc.args[0], field=field)
    if isinstance(exc, TaskRevokedError):
        return WorkerError(f"task {task_id} was revoked before it finished")
    return WorkerError(f"task {task_id} failed: {type(exc).__name__}: {exc}")


@functools.lru_cache(maxsize=8)
def app_for(settings: Settings) -> Celery:
    """One app per distinct settings value, so repeated submits share connections."""
    return make_celery(settings)


@functools.cache
def _error_classes() -> dict[str, type[WorkerError]]:
    return {cls.__name__: cls for cls in error_classes()}
