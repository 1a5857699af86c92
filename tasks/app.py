"""The Celery app shared by producers and workers, configured for at-least-once delivery.

``make_celery(settings)`` builds an app from explicit settings (tests, embedding); ``get_app()``
builds the process-wide one from ``Settings()`` on first use. Neither connects to anything: Celery
opens broker and backend connections lazily, on the first send, poll or worker start.

Queue semantics (docs/architecture.md, "Queue semantics"):

- JSON only, both ways (no pickle): a message or a stored result that is not JSON is refused.
- At-least-once: late acknowledgement, requeue when the worker process is lost, prefetch 1. A
  delivered task stays in Redis's unacknowledged set, scored by when it was last known to be held;
  each worker renews the score of the tasks it holds every ``visibility_refresh_interval`` seconds
  (``worker.fleet``), and every worker scans every ``RESTORE_SCAN_INTERVAL`` seconds for tasks whose
  score is older than ``visibility_timeout``: those of a lost or frozen worker go back to the head
  of the queue. Bounding redeliveries is the worker's job (``Settings.max_deliveries``); a delivery
  that a newer one replaced stops without writing (``worker.lifecycle.DeliveryFence``). A broker
  restart does not stop a running task: it finishes and is acknowledged after the reconnect (the
  worker also retries result writes while Redis is away).
- One generation at a time per worker process (``worker_concurrency=1``; the worker command
  runs one prefork pool process: the only process that touches CUDA, replaced when it dies).

Progress: while it runs, the task stores the custom state ``PROGRESS_STATE`` with a
``tasks.results.Progress`` as its meta; ``tasks.producer.wait`` and the CLI show it.
"""

from __future__ import annotations

import functools

from celery import Celery
from celery.exceptions import ImproperlyConfigured

from tasks.names import GENERATE
from tasks.request_text import one_line
from tasks.results import PROGRESS_STATE
from tasks.settings import Settings, SettingsError

__all__ = ["PROGRESS_STATE", "get_app", "make_celery", "make_producer", "soft_time_limit"]

# Seconds between the soft time limit (SoftTimeLimitExceeded raised in the task, which can still
# clean up and report) and the hard one (the process is killed).
SOFT_LIMIT_MARGIN = 60
REDIS_HEALTH_CHECK_INTERVAL = 25
REDIS_CONNECT_TIMEOUT = 10
# kombu's scan for tasks whose holder went silent (kombu >= 5.7 options; its defaults scan every
# ~100 s). The scan's mutex expires soon, so a worker lost in the middle of a scan holds up the
# others' scans for seconds, not kombu's default 5 minutes.
RESTORE_SCAN_INTERVAL = 5
RESTORE_MUTEX_EXPIRE = 15
# The producer side (tasks.producer, the CLI) must fail fast instead of retrying for the worker's
# patience: each connect and each reply waits at most PRODUCER_SOCKET_TIMEOUT seconds, a failed
# connection is tried PRODUCER_RETRIES more times PRODUCER_RETRY_INTERVAL apart, so submit, wait
# and status raise TransientError within PRODUCER_MAX_SECONDS (tests/integration/test_producer.py
# measures each failure: down, wrong password, TLS refused, a server that never answers).
PRODUCER_SOCKET_TIMEOUT = 3.0
PRODUCER_RETRIES = 1
PRODUCER_RETRY_INTERVAL = 0.5
PRODUCER_MAX_SECONDS = 15


def soft_time_limit(hard_limit: int) -> int:
    """A little below the hard limit: a minute, or a tenth of it for short limits."""
    return hard_limit - min(SOFT_LIMIT_MARGIN, max(1, hard_limit // 10))


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings``; nothing connects until it is used."""
    app = Celery("chroma_worker", broker=settings.broker_url, backend=settings.result_backend)
    app.conf.update(
        # Serialization: JSON only, for messages and for stored results.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # At-least-once delivery.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        # Broker connection lost mid-task (Redis restart): let the generation finish; its worker
        # renews it once Redis is back and acknowledges it after the reconnect. Cancelling instead
        # kills the pool process (a model reload) and the task waits out the visibility timeout:
        # 55.6 s instead of 16.8 s to complete a task over a 4 s outage (tests/integration). If
        # the outage outlasts the visibility timeout and another worker takes the task, this one
        # stops at its next step without writing (worker.lifecycle.DeliveryFence).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": RESTORE_SCAN_INTERVAL,
            "unacked_restore_throttle": 1,  # scan on every interval, not every 10th
            "unacked_mutex_expire": RESTORE_MUTEX_EXPIRE,
            "socket_keepalive": True,
            "socket_connect_timeout": REDIS_CONNECT_TIMEOUT,
            "health_check_interval": REDIS_HEALTH_CHECK_INTERVAL,
        },
        # Result backend (Redis): same keepalive and health check as the broker connection.
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
        redis_socket_keepalive=True,
        redis_socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
        redis_backend_health_check_interval=REDIS_HEALTH_CHECK_INTERVAL,
        redis_retry_on_timeout=True,
        result_expires=settings.result_expires,
        # Task arguments stay out of the result store: a raw message could carry what a request
        # must not (result.json keeps the validated request).
        result_extended=False,
        task_track_started=True,
        # Limits. The visibility timeout is independent of them: a running task's worker renews it.
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=soft_time_limit(settings.task_time_limit),
        task_default_rate_limit=None,
        # Routing: one queue, named by the settings.
        task_default_queue=settings.queue,
        task_routes={GENERATE: {"queue": settings.queue}},
        # One generation at a time per worker process (one process per GPU).
        worker_concurrency=1,
        # The pool child loads the model before it reports alive: allow a cold load.
        worker_proc_alive_timeout=settings.task_time_limit,
        enable_utc=True,
        timezone="UTC",
    )
    return app


def make_producer(settings: Settings) -> Celery:
    """The app a producer uses: ``make_celery(settings)`` with connections bounded in time.

    A worker keeps the patient defaults (a running task waits out a Redis restart); a producer
    fails within ``PRODUCER_MAX_SECONDS`` so a web request gets ``TransientError`` (503) instead of
    hanging or retrying for minutes. A broker or backend URL Celery cannot use raises
    ``SettingsError`` here, before anything is sent.
    """
    app = make_celery(settings)
    retry = {
        "max_retries": PRODUCER_RETRIES,
        "interval_start": 0,
        "interval_step": PRODUCER_RETRY_INTERVAL,
        "interval_max": PRODUCER_RETRY_INTERVAL,
    }
    sockets = {"socket_timeout": PRODUCER_SOCKET_TIMEOUT, "socket_connect_timeout": PRODUCER_SOCKET_TIMEOUT}
    app.conf.update(
        # Broker: connecting (kombu's ensure_connection reads these transport options) and publishing.
        broker_connection_timeout=PRODUCER_SOCKET_TIMEOUT,
        broker_connection_max_retries=PRODUCER_RETRIES,
        broker_transport_options={**app.conf.broker_transport_options, **sockets, **retry},
        task_publish_retry=True,
        task_publish_retry_policy=retry,
        # Result backend: reads (wait, status) and the subscription send_task opens.
        redis_socket_timeout=PRODUCER_SOCKET_TIMEOUT,
        redis_socket_connect_timeout=PRODUCER_SOCKET_TIMEOUT,
        redis_retry_on_timeout=False,
        result_backend_transport_options={**app.conf.result_backend_transport_options, "retry_policy": retry},
        result_backend_always_retry=False,
    )
    check_urls(app)  # after the update: it builds the backend, which reads its options once
    return app


def check_urls(app: Celery) -> None:
    """Parse the broker and result backend URLs (scheme, host, port, options) without connecting."""
    try:
        with app.connection_for_write() as connection:
            _ = connection.transport
    except (ValueError, KeyError, TypeError, ImportError) as exc:
        raise SettingsError("broker_url", f"not a broker URL Celery can use ({_reason(exc)})") from None
    try:
        _ = app.backend
    except (ValueError, KeyError, TypeError, ImportError, ImproperlyConfigured) as exc:
        raise SettingsError(
            "result_backend", f"not a result backend URL Celery can use ({_reason(exc)})"
        ) from None


def _reason(exc: Exception) -> str:
    text = one_line(
        " ".join(str(exc).split()).strip("'")
    )  # the URL itself is not echoed: it may hold a password
    return text[:150] or type(exc).__name__


@functools.cache
def default_settings() -> Settings:
    """The environment's settings (``Settings()``), read once per process for the producer API."""
    return Settings()


@functools.lru_cache(maxsize=8)
def app_for(settings: Settings) -> Celery:
    """One producer app per distinct settings value, so repeated submits share connections."""
    return make_producer(settings)


def get_app() -> Celery:
    """The process-wide producer app, for the environment's settings."""
    return app_for(default_settings())
