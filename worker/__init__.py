"""The GPU side. ``celery -A worker worker`` finds the Celery app (``app``) here.

Importing this package builds the app from the environment and registers the task; nothing
connects and no model loads until a pool process starts (see ``worker.lifecycle``).
"""

from worker import logs  # noqa: F401 (task ids in every log record)
from worker.task import app, generate

__all__ = ["app", "generate"]
