#!/usr/bin/env python3
"""Container health of a GPU worker, cheap enough to run every 30 s: no Celery import, no broker.

With ``CHROMA_HEALTH_FILE`` set, the worker is healthy while that file was touched within
``CHROMA_HEALTH_MAX_AGE`` seconds: the worker's pool process touches it once its model is loaded
and warmed up, then every 15 s (``worker.lifecycle.start_heartbeat``). Without it, the worker is
judged by its processes: a ``celery ... worker`` parent that has its pool process. Exit 0 healthy,
1 not (the reason on stdout, which ``docker inspect`` shows).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tasks.settings import Settings


def heartbeat_age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def celery_workers() -> dict[int, int]:
    """pid -> parent pid of every process running ``celery ... worker``."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"celery" not in b" ".join(argv) or b"worker" not in argv:
                continue
            stat = (proc / "stat").read_text()
            found[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


def check(settings: Settings) -> str | None:
    """None when healthy, else why not."""
    if settings.health_file:
        path = Path(settings.health_file).expanduser()
        age = heartbeat_age(path)
        if age is None:
            return f"{path} not written yet (loading or warming up)"
        limit = settings.health_max_age
        return None if age <= limit else f"{path} last touched {age:.0f} s ago (> {limit} s)"
    workers = celery_workers()
    parents = [pid for pid, ppid in workers.items() if ppid not in workers]
    if not parents:
        return "no celery worker process"
    if not any(ppid in parents for ppid in workers.values()):
        return "the celery worker has no pool process"
    return None


def main() -> int:
    problem = check(Settings())
    print(problem or "ok")
    return 0 if problem is None else 1


if __name__ == "__main__":
    sys.exit(main())
