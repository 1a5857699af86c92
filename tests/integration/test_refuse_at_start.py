"""A setting the worker cannot serve stops the whole worker at start, before it consumes anything:
exit code 78, one line naming the setting, the queued task left for a worker that can serve it."""

from __future__ import annotations

import pytest
import redis

from tasks.producer import submit
from tests.integration.conftest import small_request
from worker.lifecycle import SETTINGS_EXIT_CODE

pytestmark = pytest.mark.integration


def queued(stack) -> int:
    client = redis.Redis.from_url(stack.settings.broker_url)
    try:
        return int(client.llen(stack.settings.queue))
    finally:
        client.close()


def cannot_start_lines(worker) -> list[str]:
    return [line for line in worker.text().splitlines() if "cannot start:" in line]


@pytest.mark.parametrize(
    "setting, value, named",
    [
        ("transformer", "/nowhere/chroma.safetensors", "CHROMA_TRANSFORMER"),
        ("rope_axes", "2,2,2", "CHROMA_ROPE_AXES"),
        ("device", "cuda:7", "CHROMA_DEVICE"),
        ("kernels", "on", "CHROMA_KERNELS"),
    ],
)
def test_the_parent_refuses_before_it_consumes(make_stack, s3, setting, value, named):
    """Checked in the Celery parent (worker.preflight), before the pool starts."""
    stack = make_stack(device="cpu") if setting == "kernels" else make_stack()
    submit(small_request(), app=stack.app, settings=stack.settings)
    worker = stack.start_worker(wait=False, **{setting: value})
    assert worker.process.wait(timeout=90) == SETTINGS_EXIT_CODE, worker.text()[-3000:]
    lines = cannot_start_lines(worker)
    assert len(lines) == 1 and f"{named}: " in lines[0], worker.text()[-3000:]
    assert "Traceback" not in worker.text()
    assert queued(stack) == 1, "the task stays queued for a worker that can serve it"


def test_what_only_the_device_can_tell_stops_the_whole_worker(make_stack, s3):
    """float8-fast on a machine without float8 matmuls: found when the pool process loads; the
    parent then exits with the same code instead of taking tasks it cannot do."""
    stack = make_stack()
    worker = stack.start_worker(wait=False, quantization="float8-fast")
    assert worker.process.wait(timeout=120) == SETTINGS_EXIT_CODE, worker.text()[-3000:]
    lines = cannot_start_lines(worker)
    assert lines and "CHROMA_QUANTIZATION: 'float8-fast' needs float8 matmuls" in lines[0]
    assert "Traceback" not in worker.text()
