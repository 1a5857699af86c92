"""The producer API: submit a request, follow its progress, get its result or its error.

::

    task_id = submit(request)                       # validated here; invalid -> InvalidRequest
    result = wait(task_id, on_progress=print)       # dict (GenerationResult as JSON)
    status(task_id)                                 # {"state": "PROGRESS", "meta": {...}}

A request is validated before anything is enqueued, so an invalid one never reaches a worker.
A failed task re-raises as the ``tasks.errors`` class the worker raised (field and message kept).

A broker or result backend that is down, refuses the password, fails TLS or does not answer
raises ``TransientError`` (503) within ``tasks.app.PRODUCER_MAX_SECONDS``: the app built here
(``app_for``, ``tasks.app.make_producer``) bounds every connect and reply, and the errors Celery,
kombu and redis-py raise for it are translated once, in ``unreachable``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import uuid
from collections.abc import Callable, Iterator
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
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tasks.app import PROGRESS_STATE, app_for, default_settings, get_app
from tasks.errors import InvalidRequest, TransientError, WorkerError, error_classes
from tasks.errors import TimeLimitExceeded as TaskTimeLimit
from tasks.keys import check_task_id
from tasks.names import GENERATE
from tasks.request_text import one_line
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

    ``settings`` defaults to the environment's (``default_settings``); ``app`` to the app for those
    settings. ``task_id`` must be safe as an object-key segment (``tasks.keys.check_task_id``).
    Raises ``InvalidRequest`` (nothing enqueued) or ``TransientError`` (broker or backend
    unreachable; nothing enqueued, or at worst a task the caller may submit again with its id).
    """
    settings = settings if settings is not None else default_settings()
    app = app if app is not None else app_for(settings)
    validated = validate_request(request, settings.limits)
    if task_id is None:
        task_id = str(uuid.uuid4())
    try:
        check_task_id(task_id)
    except ValueError as exc:
        raise InvalidRequest(str(exc), field="task_id") from None
    with unreachable(f"could not enqueue task {task_id}"):
        app.send_task(
            GENERATE,
            args=[validated.model_dump(mode="json", exclude_none=True)],
            task_id=task_id,
            queue=settings.queue,
        )
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
    ``tasks.results.Progress.as_meta``). A failed task raises its ``WorkerError`` subclass; no end within
    ``timeout`` seconds raises ``TimeoutError`` (the task itself keeps running); a backend that
    cannot be read raises ``TransientError``.
    """
    if timeout is not None and not (math.isfinite(timeout) and timeout >= 0):
        raise ValueError(f"timeout must be a finite number of seconds >= 0 or None, got {timeout!r}")
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
    try:
        with unreachable(f"could not read the state of task {task_id}"):
            meta: dict[str, Any] = app.backend.get_task_meta(task_id)
    except SecurityError as exc:
        raise WorkerError(f"task {task_id} stored an error that is not an exception class ({exc})") from exc
    return meta


# What Celery, kombu and redis-py raise when a broker or backend cannot be used: kombu wraps the
# broker's errors in OperationalError; the backend's reads raise redis-py's own (a refused password
# is an AuthenticationError, a failed TLS handshake a ConnectionError around the ssl error, a
# database index the server lacks a ResponseError); sockets raise OSError (ssl.SSLError is one);
# BackendGetMetaError ends the backend's own retries.
_UNREACHABLE = (OperationalError, BackendGetMetaError, RedisError, OSError)


@contextlib.contextmanager
def unreachable(action: str) -> Iterator[None]:
    """Translate a broker or backend failure inside the block into ``TransientError``."""
    try:
        yield
    except _UNREACHABLE as exc:
        raise TransientError(f"{action}: {_unreachable_reason(exc)}") from exc
    except RuntimeError as exc:
        # send_task subscribes to the task's result channel first; when the backend cannot be
        # reached, Celery's result consumer gives up with a bare RuntimeError caused by the redis
        # error (celery.backends.asynchronous.reconnect_on_error).
        if not isinstance(exc.__cause__, _UNREACHABLE):
            raise
        raise TransientError(f"{action}: {_unreachable_reason(exc.__cause__)}") from exc


def _unreachable_reason(exc: BaseException) -> str:
    """Which service failed and how, from the innermost redis-py or socket error."""
    broker = isinstance(exc, OperationalError)
    where = "broker (CHROMA_BROKER_URL)" if broker else "result backend (CHROMA_RESULT_BACKEND)"
    cause: BaseException = exc
    while isinstance(cause, OperationalError) and cause.__cause__ is not None:
        cause = cause.__cause__
    text = one_line(str(cause) or type(cause).__name__)
    if isinstance(cause, RedisTimeoutError | TimeoutError):
        return f"{where} did not answer in time ({text}); is it up, and is TLS (rediss://) set as it expects?"
    return f"{where} unreachable ({text})"


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


@functools.cache
def _error_classes() -> dict[str, type[WorkerError]]:
    return {cls.__name__: cls for cls in error_classes()}
