"""``celery -A tests.integration.fault_injection worker``: the production worker, with device
faults injected when a prompt asks for one. Nothing else differs from ``celery -A worker``.

A CPU has no CUDA context to poison and no device memory to run out of, so the faults are raised
where the engine renders one image (``Engine.render``, inside ``worker.device.guard``):

- ``[inject:oom]``: ``torch.OutOfMemoryError`` after allocating a buffer, as a CUDA
  allocation failure would; ``guard`` must turn it into ``OutOfMemory``.
- ``[inject:device-lost-once]``: ``DeviceLost`` the first time (a marker file in
  ``$FAULT_INJECTION_DIR`` remembers it across processes); the task must exit the process.
- ``[inject:hang]``: a generation stuck where Python cannot interrupt it (a hung kernel or
  driver call): the soft time limit's signal is blocked, so only the hard limit can stop it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from tasks.errors import DeviceLost
from worker.celery import app  # noqa: F401 - the Celery app `celery -A` looks for
from worker.engine import Engine

OOM = "[inject:oom]"
DEVICE_LOST_ONCE = "[inject:device-lost-once]"
HANG = "[inject:hang]"

_render = Engine.render


def _render_with_faults(self, variant, p, *args, **kwargs):
    if OOM in p.prompt:
        held = torch.empty(32 * 2**20, dtype=torch.uint8)  # what the failed work held  # noqa: F841
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
    if DEVICE_LOST_ONCE in p.prompt:
        marker = Path(os.environ["FAULT_INJECTION_DIR"]) / "device-lost"
        if not marker.exists():
            marker.touch()
            raise DeviceLost("CUDA context is unusable: CUDA error: an illegal memory access (injected)")
    if HANG in p.prompt:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # Celery's soft time limit
        time.sleep(3600)
    return _render(self, variant, p, *args, **kwargs)


Engine.render = _render_with_faults
