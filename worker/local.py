"""``chroma-worker run``: one request on this machine, no broker, no object storage.

LoRA paths resolve under a folder (``s3://bucket/key`` becomes ``<folder>/bucket/key``); images and
result.json go to another. It is ``worker.render.render_request`` with folder sources and sinks.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from pathlib import Path

from tasks.results import GenerationResult, Progress
from tasks.schemas import GenerationRequest
from tasks.settings import Settings
from worker.engine import Engine, EngineConfig
from worker.render import FolderLoras, FolderOutputs, render_request


def run_local(
    request: GenerationRequest,
    settings: Settings,
    lora_dir: Path,
    out_dir: Path,
    *,
    device: str | None = None,
    on_load: Callable[[str], None] | None = None,
    progress: Callable[[Progress], None] | None = None,
    engine: Engine | None = None,
) -> GenerationResult:
    """Render ``request`` with LoRAs from ``lora_dir`` into ``out_dir`` (images + result.json).

    ``device`` overrides ``settings.device``; ``engine`` reuses a loaded engine instead of making one.
    """
    if engine is None:
        config = EngineConfig.from_settings(settings)
        if device is not None:
            config = dataclasses.replace(config, device=device)
        engine = Engine(config)
    engine.load(on_load)
    return render_request(
        engine,
        request,
        task_id=f"local-{uuid.uuid4().hex[:12]}",
        loras=FolderLoras(lora_dir, settings.max_lora_bytes),
        sink=FolderOutputs(out_dir),
        progress=progress,
    )
