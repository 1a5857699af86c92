"""Worker process lifecycle: load once, count deliveries, exit on a poisoned device.

The Celery parent process never touches CUDA: the model loads in the pool process
(``worker_process_init``), which is the only one that generates. If the device context is lost,
that process exits (``exit_for_device_loss``); Celery's parent starts a fresh one and, with
``task_reject_on_worker_lost``, the task goes back to the queue. Deliveries are counted per task id
in Redis so a task that kills its process every time fails after ``max_deliveries``; the count
also fences a stale delivery (a worker that was presumed lost and came back) out of writing:
``DeliveryFence`` is checked at every denoising step and before every output write, and a delivery
that a newer one replaced stops (``Superseded``) without writing an output, a progress or a state.
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import redis
from botocore.client import BaseClient

from storage import LoraCache, client_from_settings
from tasks.errors import TransientError
from tasks.settings import Settings

if TYPE_CHECKING:  # the engine (torch) is imported by the pool process only, when it loads
    from tasks.results import GenerationResult
    from worker.engine import Engine
    from worker.render import OutputSink

log = logging.getLogger(__name__)

DEVICE_LOST_EXIT_CODE = 70
SETTINGS_EXIT_CODE = 78  # EX_CONFIG: a setting this worker cannot serve
STARTUP_LOG_PREFIX = "chroma-startup"
REDIS_TIMEOUT = 10  # seconds to connect or answer: an unreachable Redis must not hang a step
FENCE_WAIT = 120  # seconds an output write waits for Redis to confirm its delivery is the newest
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
    """Build the process's Runtime (engine loaded and warmed up, storage ready); once per process.

    Logs one ``chroma-startup {json}`` line with where the start went (seconds): resolve,
    weights_read, base_weights, text_vae, blocks_setup, first_encode, variant_build,
    compile_warmup, total; with compiling on, the compile counters and compile_cache (warm / cold /
    remote); and pinned_at_ready."""
    global _runtime
    with _lock:
        if _runtime is not None:
            return _runtime
        from worker import compile_cache
        from worker.engine import Engine, EngineConfig

        start = time.perf_counter()
        engine = Engine(EngineConfig.from_settings(settings))
        s3 = client_from_settings(settings)
        warm_up = engine.device.type == "cuda" and bool(settings.warmup_sizes)
        cache = compile_cache.prepare(settings, engine.device, s3) if engine.recipe.compile else None
        engine.load()
        figures: dict[str, float | str] = dict(engine.load_seconds)
        if warm_up:
            t0 = time.perf_counter()
            variant_build = engine.get_variant([])[0].build_seconds
            warm = engine.warmup(settings.warmup_sizes)
            figures["variant_build"] = variant_build
            figures["compile_warmup"] = time.perf_counter() - t0 - variant_build
            figures.update(compile_cache.counters())
            log.info("warm-up: %s", {k: round(v, 2) for k, v in warm.items()})
            compile_cache.log_phases()
        if cache is not None:
            figures["compile_cache"] = cache.state
            if warm_up and not cache.warm:
                compile_cache.keep(settings, cache, s3)
        lora_cache = LoraCache(settings.lora_cache_dir, settings.lora_cache_bytes, settings.max_lora_bytes)
        _runtime = Runtime(settings, engine, s3, lora_cache)
        figures["total"] = time.perf_counter() - start
        figures["pinned_at_ready"] = engine.base.pinned.is_set()
        if settings.health_file:
            start_heartbeat(Path(settings.health_file).expanduser())
        rounded = {k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}
        log.info("%s %s", STARTUP_LOG_PREFIX, json.dumps(rounded))
        return _runtime


HEARTBEAT_SECONDS = 15.0


def start_heartbeat(path: Path, every: float = HEARTBEAT_SECONDS) -> threading.Thread:
    """Touch ``path`` now and every ``every`` seconds while this process lives (a daemon thread):
    a container health check reads its age (scripts/healthcheck.py)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def beat() -> None:
        while True:
            try:
                path.touch()
            except OSError as exc:  # a full or read-only disk must not stop the worker
                log.warning("health file %s not touched: %s", path, exc)
            time.sleep(every)

    thread = threading.Thread(target=beat, name="health-heartbeat", daemon=True)
    thread.start()
    return thread


@functools.cache
def _redis(url: str) -> redis.Redis:
    """One client (and connection pool) per process and URL, not a new connection per task."""
    return redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT)


def delivery_key(task_id: str, retries: int) -> str:
    return f"chroma:deliveries:{task_id}:{retries}"


def count_delivery(settings: Settings, task_id: str, retries: int) -> int:
    """How many times this task (at this retry) has started, this time included."""
    client = _redis(settings.result_backend)
    key = delivery_key(task_id, retries)
    try:
        with client.pipeline() as pipe:
            pipe.incr(key)
            # As long as the task's result: every delivery may run to the time limit and be
            # delivered again a visibility timeout after its worker was lost.
            lifetime = (settings.task_time_limit + settings.visibility_timeout) * settings.max_deliveries
            pipe.expire(key, settings.result_expires + lifetime)
            count, _ = pipe.execute()
    except redis.RedisError as exc:
        # Transient: the task is retried after a backoff instead of failing for good.
        raise TransientError(
            f"could not count this delivery: result backend unreachable ({type(exc).__name__})"
        ) from exc
    return int(count)


class Superseded(Exception):
    """A newer delivery of this task has started: this one stops and writes nothing."""


def superseded(deliveries: int, delivery: int) -> bool:
    """Whether delivery number ``delivery`` was replaced, ``deliveries`` having started so far."""
    return deliveries > delivery


@dataclass(frozen=True)
class DeliveryFence:
    """Delivery ``delivery`` of a task (at ``retries``): is it still the newest one?

    A worker presumed lost (frozen, or cut off from Redis for longer than the visibility timeout)
    may come back while another worker runs the task again; the newer delivery counted itself at
    its start (``count_delivery``), so the stale one finds a higher count and stops."""

    settings: Settings
    task_id: str
    retries: int
    delivery: int

    def check(self, wait: float = 0.0) -> None:
        """Raise ``Superseded`` if a newer delivery has started. ``TransientError`` if Redis did not
        answer, after retrying with backoff for up to ``wait`` seconds."""
        deliveries = self._deliveries(wait)
        if superseded(deliveries, self.delivery):
            raise Superseded(f"delivery {self.delivery} was replaced by delivery {deliveries}")

    def _deliveries(self, wait: float) -> int:
        deadline = time.monotonic() + wait
        pause = 0.5
        while True:
            try:
                return int(
                    _redis(self.settings.result_backend).get(delivery_key(self.task_id, self.retries)) or 0
                )
            except redis.RedisError as exc:
                if time.monotonic() + pause > deadline:
                    raise TransientError(
                        "could not check that this delivery is the newest: result backend unreachable "
                        f"({type(exc).__name__})"
                    ) from exc
            time.sleep(pause)
            pause = min(2 * pause, 10.0)


class FencedOutputs:
    """An output sink that writes only while its delivery is the newest.

    Keys depend only on the task id, so a stale delivery's write would replace the newer one's:
    each write checks the fence first (waiting up to ``FENCE_WAIT`` for Redis), and a superseded
    delivery removes nothing either (the images under its keys are the newer delivery's)."""

    def __init__(self, sink: OutputSink, fence: DeliveryFence):
        self.sink, self.fence = sink, fence
        self.result_key = sink.result_key

    def begin(self) -> None:
        self.fence.check(FENCE_WAIT)
        self.sink.begin()

    def put(self, index: int, ext: str, data: bytes, content_type: str) -> tuple[str, str]:
        self.fence.check(FENCE_WAIT)
        return self.sink.put(index, ext, data, content_type)

    def put_result(self, result: GenerationResult) -> None:
        self.fence.check(FENCE_WAIT)
        self.sink.put_result(result)

    def remove(self, keys: Sequence[str]) -> None:
        try:
            self.fence.check()
        except (Superseded, TransientError) as exc:
            log.warning("task %s: stored images left in place (%s)", self.fence.task_id, exc)
            return
        self.sink.remove(keys)


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
