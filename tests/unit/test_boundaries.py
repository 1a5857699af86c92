"""Import boundaries: the engine stands alone, and importing the worker package has no effects."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.cli import REPO, cli_env

QUEUE_AND_STORAGE = ("celery", "kombu", "redis", "boto3", "botocore")


def imported_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter whose ``os.environ`` records every read the project's own
    modules make (third-party libraries may walk the whole environment: not ours to judge)."""
    probe = (
        "import os, sys, json\n"
        "reads = []\n"
        "OURS = ('tasks', 'worker', 'storage')\n"
        "class Env(type(os.environ)):\n"
        "    def __getitem__(self, key):\n"
        "        frame = sys._getframe(1)\n"
        "        while frame.f_globals.get('__name__') in ('os', '_collections_abc', 'collections.abc'):\n"
        "            frame = frame.f_back\n"
        "        caller = frame.f_globals.get('__name__', '')\n"
        "        if caller.split('.')[0] in OURS: reads.append(f'{caller}:{key}')\n"
        "        return super().__getitem__(key)\n"
        "os.environ.__class__ = Env\n"
        f"{code}\n"
        f"print(json.dumps({{'loaded': [m for m in {QUEUE_AND_STORAGE!r} if m in sys.modules],"
        " 'reads': reads}))\n"
    )
    env = cli_env()
    env["CHROMA_QUEUE"] = "set-so-a-read-would-show"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_engine_imports_without_queue_or_storage_and_reads_no_settings():
    report = imported_after("import worker.engine, worker.sampling, worker.variants, worker.preview")
    assert report == {"loaded": [], "reads": []}


def test_the_probe_sees_a_read_by_the_project():
    """A function of a module named like ours that reads the environment is caught."""
    report = imported_after(
        "namespace = {'__name__': 'worker.reads_settings'}\n"
        "exec('import os\\ndef read():\\n    return os.environ.get(\\'CHROMA_QUEUE\\')', namespace)\n"
        "namespace['read']()"
    )
    assert report["reads"] == ["worker.reads_settings:CHROMA_QUEUE"]


def test_importing_the_worker_package_builds_no_app():
    report = imported_after("import worker")
    assert report == {"loaded": [], "reads": []}


def test_celery_finds_the_app_in_worker_celery():
    from celery.app.utils import find_app

    app = find_app("worker")
    assert app.main == "chroma_worker"
    assert "chroma.generate" in app.tasks
