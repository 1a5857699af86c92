"""Load: 200 tasks through 2 worker processes on one queue; none lost, none duplicated.

Prints throughput and the queue-wait distribution (the worker's start time of a task minus the
producer's submit time, both wall clocks of this machine). With ``RECORD_RESULTS=1`` it also
records them in ``bench/RESULTS.md`` under "Queue load (CPU, tiny model)".
"""

from __future__ import annotations

import collections
import os
import platform
import re
import statistics
import time
from pathlib import Path

import pytest
import redis

from tasks.producer import submit, wait
from tests.integration.conftest import small_request

pytestmark = pytest.mark.integration

TASKS = 200
WORKERS = 2
RESULTS_MD = Path(__file__).resolve().parents[2] / "bench" / "RESULTS.md"
HEADING = "## Queue load (CPU, tiny model)"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def test_200_tasks_through_2_workers_none_lost_none_duplicated(make_stack, s3):
    stack = make_stack()
    workers = [stack.start_worker(wait=False) for _ in range(WORKERS)]
    for worker in workers:
        worker.wait_ready()
    # "ready." comes from the parent; the pool process loads the model after it. Queue wait
    # should measure the queue, not that first load.
    deadline = time.monotonic() + 60
    while not all("engine ready" in w.text() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)

    submitted: dict[str, float] = {}
    for i in range(TASKS):
        request = small_request(seed=i, sample_steps=1 + i % 2)
        submitted_at = time.time()
        submitted[submit(request, app=stack.app, settings=stack.settings)] = submitted_at
    first_submit = min(submitted.values())
    results = {
        task_id: wait(task_id, app=stack.app, timeout=300, poll_interval=0.05) for task_id in submitted
    }
    wall = time.time() - first_submit

    # 200 results, each its own task's, each run exactly once.
    assert len(results) == TASKS and len(set(submitted)) == TASKS
    assert all(result["task_id"] == task_id for task_id, result in results.items())
    assert [result["delivery"] for result in results.values()] == [1] * TASKS
    logs = "".join(worker.text() for worker in workers)
    succeeded = collections.Counter(re.findall(r"chroma\.generate\[([0-9a-f-]+)\] succeeded", logs))
    assert set(succeeded) == set(submitted) and set(succeeded.values()) == {1}
    backend = redis.Redis.from_url(stack.settings.result_backend)
    counts = [int(backend.get(f"chroma:deliveries:{task_id}:0") or 0) for task_id in submitted]
    assert counts == [1] * TASKS

    # 200 result.json objects, one image each, nothing else.
    keys = []
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket="outputs", Prefix=stack.settings.output_prefix + "/"
    )
    for page in pages:
        keys += [item["Key"] for item in page.get("Contents", [])]
    assert sorted(keys) == sorted(
        f"{stack.settings.output_prefix}/{task_id}/{name}"
        for task_id in submitted
        for name in ("0.png", "result.json")
    )

    # Both processes took work from the one queue.
    per_worker = collections.Counter(result["worker"]["celery_hostname"] for result in results.values())
    assert len(per_worker) == WORKERS and min(per_worker.values()) >= TASKS // 10, per_worker

    waits = [results[task_id]["worker"]["started_at"] - submitted[task_id] for task_id in submitted]
    assert min(waits) > -1.0  # same clock on both sides
    report = {
        "tasks": TASKS,
        "workers": WORKERS,
        "wall_s": wall,
        "throughput_per_s": TASKS / wall,
        "wait_p50_s": percentile(waits, 0.50),
        "wait_p90_s": percentile(waits, 0.90),
        "wait_p99_s": percentile(waits, 0.99),
        "wait_max_s": max(waits),
        "wait_min_s": min(waits),
        "wait_mean_s": statistics.fmean(waits),
        "submit_s": max(submitted.values()) - first_submit,
        "per_worker": sorted(per_worker.values()),
    }
    print("\nqueue load:", {k: round(v, 3) if isinstance(v, float) else v for k, v in report.items()})
    if os.environ.get("RECORD_RESULTS") == "1" and RESULTS_MD.exists():
        record(report)


def record(report: dict) -> None:
    """Replace (or append) the queue-load section of bench/RESULTS.md."""
    import celery

    section = "\n".join(
        [
            HEADING,
            "",
            f"{report['tasks']} tasks (64x64, 1-2 steps, one LoRA) submitted at once to one queue, "
            f"{report['workers']} worker processes (`celery -A worker worker --pool prefork "
            "--concurrency 1`), "
            f"tiny model on the CPU ({os.cpu_count()} cores, Python {platform.python_version()}, "
            f"Celery {celery.__version__}), Redis and moto S3 on the same machine. "
            "Queue wait = worker start of the task - producer submit time.",
            "",
            "| tasks | wall s | tasks/s | wait min s | wait p50 s | wait p90 s | wait p99 s | wait max s "
            "| per worker |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {report['tasks']} | {report['wall_s']:.1f} | {report['throughput_per_s']:.1f} "
            f"| {report['wait_min_s']:.2f} | {report['wait_p50_s']:.2f} | {report['wait_p90_s']:.2f} "
            f"| {report['wait_p99_s']:.2f} | {report['wait_max_s']:.2f} "
            f"| {' / '.join(map(str, report['per_worker']))} |",
            "",
            "All tasks are submitted in a burst, so the wait grows with a task's place in the queue: "
            "the spread shows the service rate, not unfairness.",
            "",
            "Command: `RECORD_RESULTS=1 python -m pytest tests/integration/test_load.py -q -s "
            "-p no:warnings`",
            "",
        ]
    )
    text = RESULTS_MD.read_text(encoding="utf-8")
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    RESULTS_MD.write_text(text, encoding="utf-8")
