"""Worker process lifecycle: load once, count deliveries, exit on a poisoned device.

The Celery parent process never touches CUDA: the model loads in the pool process
(``worker_process_init``), which is the only one that generates. If the device context is lost,
that process exits (``exit_for_device_loss``); Celery's parent starts a fresh one and, with
``task_reject_on_worker_lost``, the task goes back to the queue. Deliveries are counted per task id
in Redis so a task that kills its process every time fails after ``max_deliveries``; the count
also fences a stale delivery (a worker that was presumed lost and came back) out of writing.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import redis
from botocore.client import BaseClient

from storage import LoraCache, client_from_settings
from tasks.errors import TransientError
from tasks.settings import Settings

if TYPE_CHECKING:  # the engine (torch) is imported by the pool process only, when it loads
    from worker.engine import Engine

log = logging.getLogger(__name__)

DEVICE_LOST_EXIT_CODE = 70
SETTINGS_EXIT_CODE = 78  # EX_CONFIG: a setting this worker cannot serve
STARTUP_LOG_PREFIX = "chroma-startup"
_lock = threading.Lock()
_runtime: Runtime | None = None


@dataclass
class Runtime:
    """What a worker process holds for its life: settings, the engine, storage."""

    settings: Settings
    engine: Engine
    s3: BaseClient
    lora_cache: LoraCache


def load_runtime(settings: Settings) -> Runtime:
    """Build the process's Runtime (engine loaded and warmed up, storage ready); once per process."""
    global _runtime
    with _lock:
        if _runtime is not None:
            return _runtime
        from worker.engine import Engine, EngineConfig

        start = time.perf_counter()
        engine = Engine(EngineConfig.from_settings(settings))
        engine.load()
        figures = dict(engine.load_seconds)
        if engine.device.type == "cuda" and settings.warmup_sizes:
            t0 = time.perf_counter()
            variant_build = engine.get_variant([])[0].build_seconds
            warm = engine.warmup(settings.warmup_sizes)
            figures["variant_build"] = variant_build
            figures["compile_warmup"] = time.perf_counter() - t0 - variant_build
            log.info("warm-up: %s", {k: round(v, 2) for k, v in warm.items()})
        cache = LoraCache(settings.lora_cache_dir, settings.lora_cache_bytes, settings.max_lora_bytes)
        _runtime = Runtime(settings, engine, client_from_settings(settings), cache)
        figures["total"] = time.perf_counter() - start
        log.info("%s %s", STARTUP_LOG_PREFIX, json.dumps({k: round(v, 2) for k, v in figures.items()}))
        return _runtime


@functools.cache
def _redis(url: str) -> redis.Redis:
    """One client (and connection pool) per process and URL, not a new connection per task."""
    return redis.Redis.from_url(url)


def delivery_key(task_id: str, retries: int) -> str:
    return f"chroma:deliveries:{task_id}:{retries}"


def count_delivery(settings: Settings, task_id: str, retries: int) -> int:
    """How many times this task (at this retry) has started, this time included."""
    client = _redis(settings.result_backend)
    key = delivery_key(task_id, retries)
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


def _settings_marker(parent_pid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"chroma-worker-{parent_pid}.settings-error"


def exit_for_settings(message: str, from_pool: bool) -> None:
    """Stop the worker: a setting it cannot serve (one line, naming the setting).

    In the parent (called there before anything is consumed) it exits now. From the pool process
    (``from_pool``) it leaves a note for the parent, asks the parent to shut down, and exits;
    the parent then exits with the same code (``exit_if_settings_failed``), so the whole worker
    stops instead of taking tasks it cannot do.
    """
    log.critical("cannot start: %s", message)
    if from_pool:
        _settings_marker(os.getppid()).write_text(message)
        os.kill(os.getppid(), signal.SIGTERM)
    logging.shutdown()
    os._exit(SETTINGS_EXIT_CODE)


def exit_if_settings_failed() -> None:
    """In the parent, at shutdown: exit non-zero if the pool process stopped for a setting."""
    marker = _settings_marker(os.getpid())
    if marker.exists():
        marker.unlink(missing_ok=True)
        logging.shutdown()
        os._exit(SETTINGS_EXIT_CODE)
