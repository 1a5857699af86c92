"""The ``chroma-worker`` command run as a user runs it: a subprocess with only the settings given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tasks.settings import Settings

REPO = Path(__file__).resolve().parents[1]
REQUESTS = REPO / "tests" / "data" / "requests"
REFERENCE = json.loads((REPO / "examples" / "request.json").read_text())
BAD_WIDTH = {"model": "chroma", "prompts": [{"prompt": "x", "width": 4097}]}


def cli_env(settings: Settings | None = None) -> dict[str, str]:
    """This process's environment without any ``CHROMA_*``, plus the queue settings given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHROMA_")}
    env["PYTHONPATH"] = str(REPO)
    if settings is not None:
        env.update(
            CHROMA_BROKER_URL=settings.broker_url,
            CHROMA_RESULT_BACKEND=settings.result_backend,
            CHROMA_QUEUE=settings.queue,
        )
    return env


def run_cli(
    *args: str, settings: Settings | None = None, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=cli_env(settings),
        cwd=REPO,
        timeout=timeout,
    )
