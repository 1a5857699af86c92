"""How a worker shares the queue with the rest of the fleet: it holds its tasks, hands them back.

Redis (kombu's transport) keeps every delivered, unacknowledged task in a hash, indexed by a sorted
set scored with the time of delivery; every worker scans that index every few seconds and puts
back at the head of the queue each task whose score is older than the visibility timeout
(``tasks.app``). Three pieces here make that a liveness check instead of an age check
(docs/architecture.md, "Queue semantics"):

- ``VisibilityRefresher``: a thread in the worker's main process (the consumer) that sets the score
  of every task the worker holds to "now" every ``visibility_refresh_interval`` seconds. A task
  whose worker is lost or frozen stops being renewed and goes back to the queue one visibility
  timeout later; a task that runs for hours on a live worker never does.
- ``renew_delivery_tags_on_restore``: kombu puts a task back with the delivery tag it had, so the
  late acknowledgement of a worker presumed lost (a frozen node resumed) would delete the new
  holder's entry, and the task would be lost if that holder died too. A task put back gets a fresh
  tag. (A stale run also stops without writing: ``worker.lifecycle.DeliveryFence``.)
- ``requeue_after_grace``: a stopping worker (SIGTERM) lets its running task finish for
  ``stop_grace`` seconds, then cancels it, which puts it back at the head of the queue at once.

Every process that consumes the queue must run the refresher (``celery -A worker worker`` does): a
consumer without it has its tasks put back after the visibility timeout while they still run.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import threading
import time
import uuid
import weakref
from collections.abc import Iterable

import redis

log = logging.getLogger(__name__)

REDIS_TIMEOUT = 5  # seconds to connect or answer: a silent Redis must not stall the renewals for long


class VisibilityRefresher:
    """Renews the unacknowledged-index score of every task this worker holds, on its own thread.

    ``ZADD ... XX`` only updates members that are there: a task acknowledged or put back meanwhile
    is never brought back. The thread lives as long as the process (a daemon): it must go on during
    a warm shutdown, while the running task finishes.
    """

    def __init__(self, client: redis.Redis, index_key: str, interval: float):
        self.client, self.index_key, self.interval = client, index_key, interval
        self._stop = threading.Event()
        self._failing = False
        self.thread = threading.Thread(target=self._run, name="visibility-refresh", daemon=True)

    def start(self) -> None:
        log.info("renewing held tasks in %s every %ss", self.index_key, self.interval)
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def refresh(self) -> int:
        """Set the score of every held task to now; how many tasks this worker holds."""
        tags = held_delivery_tags()
        if tags:
            now = time.time()
            self.client.zadd(self.index_key, dict.fromkeys(tags, now), xx=True)
        return len(tags)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except redis.RedisError as exc:
                if not self._failing:  # once per outage, not every interval
                    log.warning("could not renew held tasks (%s: %s); retrying", type(exc).__name__, exc)
                self._failing = True
                continue
            if self._failing:
                log.info("renewing held tasks again")
            self._failing = False


def held_delivery_tags() -> list[str]:
    """Delivery tags of the tasks this worker holds and has not acknowledged: reserved, running, or
    waiting for their countdown (a retry). Read from Celery's worker state, in the main process."""
    from celery.worker import state

    requests = [*list(state.requests.values()), *_snapshot(state.scheduled_requests)]
    return sorted({r.message.delivery_tag for r in requests if not r.acknowledged})


def _snapshot(requests: weakref.WeakSet) -> Iterable:
    """The members of a WeakSet the event loop may change meanwhile (another thread)."""
    for _ in range(3):
        try:
            return list(requests)
        except RuntimeError:  # changed size during iteration: read it again
            continue
    return []


_refresher: VisibilityRefresher | None = None


def start_refresher(consumer, broker_url: str, interval: float) -> VisibilityRefresher:
    """Start the process's refresher once (Celery's ``worker_ready``, after the pool has forked:
    threads are not inherited by the pool process). Key names come from the consumer's channel,
    so a ``global_keyprefix`` or renamed keys in the transport options are followed."""
    global _refresher
    if _refresher is None:
        channel = consumer.task_consumer.channel
        index_key = channel.global_keyprefix + channel.unacked_index_key
        client = redis.Redis.from_url(
            broker_url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
        )
        _refresher = VisibilityRefresher(client, index_key, interval)
        _refresher.start()
    return _refresher


# -- a task put back gets a fresh delivery tag ----------------------------------------------------

_RESTORE_PARAMETERS = ["self", "payload", "exchange", "routing_key", "pipe", "leftmost"]


def renew_delivery_tags_on_restore() -> None:
    """Give every task kombu's Redis transport puts back a fresh delivery tag.

    kombu (5.7) routes each way a task goes back (the scan for expired tasks, a channel closing
    with tasks unacknowledged, a reject with requeue) through ``Channel._do_restore_message``; the
    payload's ``properties.delivery_tag`` becomes the tag of the next delivery. Wrapped here, in
    one place; tests/integration/test_node_loss.py fails if kombu stops honouring it.
    """
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.Channel._do_restore_message
    if getattr(original, "renews_delivery_tag", False):
        return
    parameters = list(inspect.signature(original).parameters)
    if parameters != _RESTORE_PARAMETERS:
        raise RuntimeError(
            f"kombu's Redis Channel._do_restore_message takes {parameters}, not {_RESTORE_PARAMETERS}: "
            "this kombu is not the one the worker was built for (pyproject.toml pins it)"
        )

    def _do_restore_message(self, payload, exchange, routing_key, pipe, leftmost=False):
        properties = payload.get("properties")
        if isinstance(properties, dict):
            properties["delivery_tag"] = str(uuid.uuid4())
        return original(self, payload, exchange, routing_key, pipe, leftmost)

    _do_restore_message.renews_delivery_tag = True  # type: ignore[attr-defined]
    kombu_redis.Channel._do_restore_message = _do_restore_message


# -- stopping: finish within the grace period, or go back to the queue ----------------------------

_grace_timer: threading.Timer | None = None


def requeue_after_grace(grace: float) -> None:
    """On a warm shutdown (SIGTERM), escalate to a cold one (SIGQUIT) after ``grace`` seconds.

    A warm shutdown stops consuming and waits for the running task without bound, then exits at
    once; the cold one cancels the task, and closing the broker channel puts it back at the head
    of the queue. Celery's own ``worker_soft_shutdown_timeout`` sleeps its whole timeout even when
    the task ends sooner (measured: a 15 s timeout and a task ending 5 s after SIGTERM, exit after
    16.6 s; this way, 6.8 s). Runs in the signal handler: it only starts a timer.
    """
    global _grace_timer
    if _grace_timer is not None:
        return
    _grace_timer = threading.Timer(grace, os.kill, (os.getpid(), signal.SIGQUIT))
    _grace_timer.daemon = True
    _grace_timer.start()
