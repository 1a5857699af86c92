"""Every worker log record carries the id of the task it belongs to (``-`` outside tasks)."""

from __future__ import annotations

import logging

from celery import current_task

FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] [task %(task_id)s] %(name)s: %(message)s"


class TaskIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        request = getattr(current_task, "request", None)
        record.task_id = getattr(request, "id", None) or "-"
        return True


def add_task_ids(logger: logging.Logger, **_kwargs) -> None:
    """Celery's ``after_setup_logger`` receiver (connected by ``worker.celery``)."""
    for handler in logger.handlers:
        handler.addFilter(TaskIdFilter())
        handler.setFormatter(logging.Formatter(FORMAT))
