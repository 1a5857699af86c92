"""Device faults, decided on the CPU (docs/architecture.md, "Failures").

Out-of-memory fails the request with ``OutOfMemory``, frees memory and the engine goes on; a CUDA
error that leaves the context unusable (a sticky error, or a probe that fails) becomes
``DeviceLost`` and the task makes its process exit so the pool replaces it. Nothing here needs a
GPU: CUDA failures are raised by stand-ins for the work, the probe and ``torch.cuda``. The real
thing on a GPU lives in ``tests/gpu``.

The task body's own decisions (exit on ``DeviceLost``, go on after a failed progress write, stop
when the time limit fires during one) run in a subprocess, since exiting is one of them.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch

from tasks.errors import DeviceLost, OutOfMemory
from tasks.schemas import ResolvedPrompt
from tests.s3server import free_port
from worker import device as dev
from worker.device import DEVICE_LOST_MARKERS, is_device_lost, probe_device
from worker.lifecycle import DEVICE_LOST_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]
CUDA = torch.device("cuda")
CPU = torch.device("cpu")
STICKY = "CUDA error: an illegal memory access was encountered"
PROMPT = ResolvedPrompt(0, "a photo of a person", "", 64, 64, 2, 4.0, 7)


def guard_on(device: torch.device, fn, released: list | None = None):
    """``device.guard`` on ``device``, recording each release of memory."""
    released = released if released is not None else []
    return dev.guard(device, fn, release=lambda: released.append(gc.collect()))


def oom(*_args, **_kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


# -- out of memory ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", [CUDA, CPU], ids=["cuda", "cpu"])
def test_out_of_memory_becomes_a_clear_request_error_after_releasing_memory(device):
    released: list = []
    with pytest.raises(OutOfMemory) as failed:
        guard_on(device, oom, released)
    error = failed.value
    assert error.code == "out_of_memory" and error.http_status == 507
    assert "did not fit in device memory" in error.message and "smaller width/height" in error.message
    assert error.__cause__ is None  # the torch error is not chained into what Celery stores
    assert len(released) == 1


def test_the_cpus_allocator_running_out_is_out_of_memory_too():
    # The CPU allocator raises a plain RuntimeError (a 4096x4096 render's masked attention on the
    # CPU asks for 17 GB): a request error, like the card's, not a traceback.
    released: list = []
    with pytest.raises(OutOfMemory) as failed:
        guard_on(CPU, lambda: torch.empty(2**62, dtype=torch.uint8), released)
    assert failed.value.code == "out_of_memory" and len(released) == 1
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        guard_on(CPU, lambda: torch.ones(2, 3) @ torch.ones(2, 3))


def test_out_of_memory_frees_what_the_failed_work_held_before_releasing():
    held: list[weakref.ref] = []
    alive_at_release: list[bool] = []

    def work():
        activations = torch.empty(1 << 20)  # what the failed forward pass had allocated
        held.append(weakref.ref(activations))
        oom()

    with pytest.raises(OutOfMemory) as failed:
        dev.guard(CUDA, work, release=lambda: alive_at_release.append(held[0]() is not None))
    assert alive_at_release == [False], "empty_cache() ran while the failed work's tensors were alive"
    assert failed.value.__context__ is None  # a stored/logged error keeps no tensors alive


def test_after_out_of_memory_the_same_engine_renders_the_next_request(engine_factory, monkeypatch):
    engine = engine_factory("none", "float32")
    before = engine.generate([PROMPT], []).images[0].image

    monkeypatch.setattr(engine, "denoise", oom)
    with pytest.raises(OutOfMemory):
        engine.generate([PROMPT], [])
    monkeypatch.undo()

    after = engine.generate([PROMPT], []).images[0].image
    assert after.tobytes() == before.tobytes()  # nothing half-done was left behind


# -- lost device -----------------------------------------------------------------------------------


@pytest.mark.parametrize("marker", DEVICE_LOST_MARKERS)
def test_sticky_cuda_errors_mean_the_device_is_lost_without_probing(marker, monkeypatch):
    monkeypatch.setattr(dev, "probe_device", pytest.fail)
    assert is_device_lost(RuntimeError(f"CUDA error: {marker} (details)"))


@pytest.mark.parametrize("probe_ok, lost", [(True, False), (False, True)])
def test_other_cuda_errors_are_decided_by_the_probe(probe_ok, lost, monkeypatch):
    probes = []
    monkeypatch.setattr(dev, "probe_device", lambda: probes.append(1) or probe_ok)
    assert is_device_lost(torch.AcceleratorError("CUDA error: operation not supported")) is lost
    assert probes == [1]


def test_errors_that_are_not_cuda_errors_never_mean_the_device_is_lost(monkeypatch):
    monkeypatch.setattr(dev, "probe_device", pytest.fail)
    for text in ("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)", "expected scalar type Float"):
        assert not is_device_lost(RuntimeError(text))


def test_probe_synchronizes_then_runs_a_tiny_operation(monkeypatch):
    calls = []
    ones = torch.ones
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("synchronize"))
    monkeypatch.setattr(torch, "ones", lambda *a, device=None, **k: calls.append(device) or ones(*a, **k))
    assert probe_device() is True
    assert calls == ["synchronize", "cuda"]


@pytest.mark.parametrize("failure", ["synchronize", "operation", "wrong value"])
def test_a_failing_probe_says_the_context_is_poisoned(failure, monkeypatch):
    def synchronize(*_args):
        if failure == "synchronize":
            raise torch.AcceleratorError(STICKY)

    def tiny(*args, device=None, **kwargs):
        if failure == "operation":
            raise RuntimeError("CUDA error: unspecified launch failure")
        return torch.zeros(*args, **kwargs) if failure == "wrong value" else torch.ones(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(torch, "ones", tiny)
    assert probe_device() is False


def test_guard_on_cuda_turns_a_poisoned_context_into_device_lost(monkeypatch):
    monkeypatch.setattr(dev, "probe_device", lambda: False)

    def work():
        raise torch.AcceleratorError(STICKY)

    with pytest.raises(DeviceLost) as failed:
        guard_on(CUDA, work)
    assert failed.value.code == "device_lost" and "CUDA context is unusable" in failed.value.message
    assert STICKY in failed.value.message


def test_guard_passes_other_errors_through_unchanged(monkeypatch):
    monkeypatch.setattr(dev, "probe_device", lambda: True)  # the context still works

    def recoverable():
        raise RuntimeError("CUDA error: invalid configuration argument")

    def shape_bug():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    for fn in (recoverable, shape_bug):
        with pytest.raises(RuntimeError) as failed:
            guard_on(CUDA, fn)
        assert type(failed.value) is RuntimeError
    # On the CPU there is no context to lose: even a CUDA-looking message is not DeviceLost.
    monkeypatch.setattr(dev, "probe_device", lambda: False)
    with pytest.raises(RuntimeError) as failed:
        guard_on(CPU, lambda: (_ for _ in ()).throw(RuntimeError(STICKY)))
    assert not isinstance(failed.value, DeviceLost)


# -- the task body's decisions, in a process of their own -------------------------------------------

TASK_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from types import SimpleNamespace
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    import redis
    from celery.app.task import Task
    from celery.exceptions import SoftTimeLimitExceeded
    from tasks.errors import DeviceLost, OutOfMemory, TimeLimitExceeded
    from tasks.results import Progress
    import worker.celery as task
    from worker import lifecycle

    mode = sys.argv[1]
    failure = {"lost": DeviceLost("CUDA context is unusable: injected"), "oom": OutOfMemory("did not fit")}
    progress_failure = {
        "soft-limit-during-progress": SoftTimeLimitExceeded(),
        "backend-down-during-progress": redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379."),
    }
    lifecycle.count_delivery = lambda *args: 1

    def load_runtime(settings=None):
        if mode == "lost-while-loading":
            raise DeviceLost("CUDA context is unusable: lost during warm-up")
        return SimpleNamespace(engine=SimpleNamespace(release_memory=lambda: None))

    def update_state(*args, **kwargs):
        raise progress_failure[mode]

    def render(runtime, request, task_id, delivery, report, info):
        if mode in progress_failure:
            Task.update_state = update_state
            report(Progress(1, 1, 1, 2, "denoise"))
            return {"status": "succeeded"}  # the generation went on after the progress write
        raise failure[mode]

    lifecycle.load_runtime = load_runtime
    task.render = render
    task.stored_success = lambda *args: None
    if mode == "lost-while-loading":
        task.load_in_pool_process()
        sys.exit(0)
    request = {"model": "chroma", "prompts": [{"prompt": "a photo", "width": 64, "height": 64}]}
    try:
        task.generate(request)  # the task body, called directly in this process
    except OutOfMemory:
        sys.exit(3)
    except TimeLimitExceeded:
        sys.exit(4)
    sys.exit(0)
    """
)


def run_task_body(mode: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "HOME": str(tmp_path),
        # No server listens there: the body must decide without a broker or a result backend.
        "CHROMA_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
        "CHROMA_RESULT_BACKEND": f"redis://127.0.0.1:{free_port()}/1",
    }
    return subprocess.run(
        [sys.executable, "-c", TASK_SCRIPT, mode],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "mode, code",
    [("lost", DEVICE_LOST_EXIT_CODE), ("lost-while-loading", DEVICE_LOST_EXIT_CODE), ("oom", 3)],
)
def test_the_task_exits_its_process_on_a_lost_device_only(mode, code, tmp_path):
    done = run_task_body(mode, tmp_path)
    assert done.returncode == code, done.stderr[-3000:]
    lost = "device lost, exiting so the pool replaces this process" in done.stderr
    assert lost is (code == DEVICE_LOST_EXIT_CODE), done.stderr[-3000:]


def test_a_failed_progress_write_never_fails_the_generation(tmp_path):
    done = run_task_body("backend-down-during-progress", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "progress not stored (ConnectionError" in done.stderr


def test_a_time_limit_that_fires_during_a_progress_write_still_stops_the_task(tmp_path):
    done = run_task_body("soft-limit-during-progress", tmp_path)
    assert done.returncode == 4, done.stderr[-3000:]


def test_exit_for_device_loss_flushes_the_log_and_exits_with_its_code(tmp_path):
    log = tmp_path / "worker.log"
    script = textwrap.dedent(
        f"""
        import logging
        logging.basicConfig(filename={str(log)!r}, level=logging.INFO)
        from worker.lifecycle import exit_for_device_loss
        exit_for_device_loss("CUDA error: an illegal memory access was encountered")
        raise SystemExit("not reached")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == DEVICE_LOST_EXIT_CODE
    text = log.read_text()
    assert "CRITICAL" in text and "illegal memory access" in text
