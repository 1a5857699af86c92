"""Worker process lifecycle: load once, count deliveries, exit on a poisoned device.

The Celery parent process never touches CUDA: the model loads in the pool process
(``worker_process_init``), which is the only one that generates. If the device context is lost,
that process exits (``exit_for_device_loss``); Celery's parent starts a fresh one and, with
``task_reject_on_worker_lost``, the task goes back to the queue. Deliveries are counted per task id
in Redis so a task that kills its process every time fails after ``max_deliveries``.
"""

from __future__ import annotations

import functools
import logging
import os
import threading

import redis

from tasks.errors import TransientError
from tasks.settings import Settings

log = logging.getLogger(__name__)

DEVICE_LOST_EXIT_CODE = 70
_lock = threading.Lock()
_worker = None


def load_worker(settings: Settings):
    """Build the process's Worker (engine loaded, storage ready); once per process."""
    global _worker
    with _lock:
        if _worker is not None:
            return _worker
        from storage import LoraCache, client_from_settings
        from worker.engine import Engine, EngineConfig
        from worker.job import Worker

        engine = Engine(EngineConfig.from_settings(settings))
        engine.load()
        if engine.device.type == "cuda" and settings.warmup_size_list:
            log.info("warm-up: %s", engine.warmup(settings.warmup_size_list))
        cache = LoraCache(settings.lora_cache_dir, settings.lora_cache_bytes, settings.max_lora_bytes)
        _worker = Worker(settings, engine, client_from_settings(settings), cache)
        return _worker


@functools.cache
def _redis(url: str) -> redis.Redis:
    """One client (and connection pool) per process and URL, not a new connection per task."""
    return redis.Redis.from_url(url)


def count_delivery(settings: Settings, task_id: str, retries: int) -> int:
    """How many times this task (at this retry) has started, this time included."""
    client = _redis(settings.result_backend)
    key = f"chroma:deliveries:{task_id}:{retries}"
    try:
        with client.pipeline() as pipe:
            pipe.incr(key)
            # As long as the task's result: a redelivery after a visibility timeout (the whole
            # worker was lost) can come long after the previous delivery.
            pipe.expire(key, settings.result_expires + settings.visibility_timeout * settings.max_deliveries)
            count, _ = pipe.execute()
    except redis.RedisError as exc:
        # Transient: the task is retried after a backoff instead of failing for good.
        raise TransientError(
            f"could not count this delivery: result backend unreachable ({type(exc).__name__})"
        ) from exc
    return int(count)


def exit_for_device_loss(reason: str) -> None:
    """Leave now: the CUDA context is unusable and nothing in this process can recover it."""
    log.critical("device lost, exiting so the pool replaces this process: %s", reason)
    logging.shutdown()
    os._exit(DEVICE_LOST_EXIT_CODE)
