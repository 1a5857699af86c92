"""The producer when Redis cannot be used: down, a wrong password, TLS refused, a server that never
answers. ``submit``, ``wait`` and ``status`` raise ``TransientError`` within
``PRODUCER_MAX_SECONDS``, nothing is enqueued by a failed submit, and the CLI prints one line and
exits 1. Real servers only: ``redis-server`` with ``requirepass`` or TLS, and for "down" a free
port nobody listens on.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tasks.app import PRODUCER_MAX_SECONDS
from tasks.errors import TransientError
from tasks.producer import app_for, status, submit, wait
from tasks.settings import Settings
from tests.cli import REPO, REQUESTS, cli_env
from tests.s3server import free_port
from tests.services import RedisServer, write_tls_files

pytestmark = pytest.mark.integration
REQUEST = {"model": "chroma", "prompts": [{"prompt": "a photo"}]}


@dataclass
class Servers:
    plain: RedisServer
    password: RedisServer
    tls: RedisServer
    silent_port: int
    other_ca: Path  # a CA that did not sign the TLS server's certificate


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    folder = tmp_path_factory.mktemp("outages")
    started: list[RedisServer] = []
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    try:
        for kwargs in ({}, {"password": "right-password"}, {"tls": True}):
            started.append(RedisServer(folder / f"redis{len(started)}", **kwargs))
        other_ca = write_tls_files(folder / "other-ca")[0]
        yield Servers(*started, silent_port=silent.getsockname()[1], other_ca=other_ca)
    finally:
        silent.close()
        for server in started:
            server.stop()


def tls_url(port: int, ca: Path, db: int) -> str:
    return f"rediss://127.0.0.1:{port}/{db}?ssl_cert_reqs=required&ssl_ca_certs={ca}"


def url(servers: Servers, case: str, db: int) -> str:
    """A URL of database ``db`` that fails in the way ``case`` names."""
    tls, plain, password = servers.tls.port, servers.plain.port, servers.password.port
    return {
        "down": f"redis://127.0.0.1:{free_port()}/{db}",
        "wrong password": f"redis://:wrong-password@127.0.0.1:{password}/{db}",
        "no password": f"redis://127.0.0.1:{password}/{db}",
        "TLS to a plain server": tls_url(plain, servers.tls.ca_file, db),  # type: ignore[arg-type]
        "plain to a TLS server": f"redis://127.0.0.1:{tls}/{db}",
        "unknown CA": tls_url(tls, servers.other_ca, db),
        "never answers": f"redis://127.0.0.1:{servers.silent_port}/{db}",
    }[case]


CASES = [
    "down",
    "wrong password",
    "no password",
    "TLS to a plain server",
    "plain to a TLS server",
    "unknown CA",
    "never answers",
]


def timed(call: Callable[[], Any]) -> tuple[TransientError, float]:
    """The TransientError ``call`` raises and how long it took; a call that hangs fails the test
    (it is left running in a daemon thread) instead of hanging the suite."""
    outcome: list[BaseException | None] = []
    thread = threading.Thread(target=lambda: outcome.append(_raised(call)), daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(PRODUCER_MAX_SECONDS + 15)
    elapsed = time.monotonic() - started
    assert outcome, f"no answer after {elapsed:.0f} s"
    assert isinstance(outcome[0], TransientError), repr(outcome[0])
    return outcome[0], elapsed


def _raised(call: Callable[[], Any]) -> BaseException | None:
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread, which checks its type
        return exc
    return None


def one_line_exit_1(args: list[str], settings: Settings) -> str:
    env = cli_env(settings)
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "tasks.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert time.monotonic() - started < PRODUCER_MAX_SECONDS + 5  # + the interpreter's start
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: transient: "), out.stderr
    return out.stderr


@pytest.mark.parametrize("case", CASES)
def test_backend_failure_is_transient_in_bounded_time(servers: Servers, case: str) -> None:
    good_broker = servers.plain.url_for(60)
    queue = f"outage-{case.replace(' ', '-')}"
    settings = Settings(broker_url=good_broker, result_backend=url(servers, case, 61), queue=queue)
    app = app_for(settings)
    error, elapsed = timed(lambda: submit(REQUEST, settings=settings, task_id="t-backend"))
    assert elapsed < PRODUCER_MAX_SECONDS, elapsed
    assert "result backend (CHROMA_RESULT_BACKEND)" in error.message
    with redis.Redis.from_url(good_broker) as broker:
        assert broker.llen(queue) == 0  # the failed submit sent nothing
    for call in (lambda: status("t-backend", app=app), lambda: wait("t-backend", app=app, timeout=60)):
        error, elapsed = timed(call)
        assert elapsed < PRODUCER_MAX_SECONDS, elapsed
        assert error.retryable and error.http_status == 503
    one_line_exit_1(["status", "t-backend"], settings)


@pytest.mark.parametrize("case", CASES)
def test_broker_failure_is_transient_in_bounded_time(servers: Servers, case: str) -> None:
    settings = Settings(
        broker_url=url(servers, case, 62), result_backend=servers.plain.url_for(63), queue="q"
    )
    error, elapsed = timed(lambda: submit(REQUEST, settings=settings))
    assert elapsed < PRODUCER_MAX_SECONDS, elapsed
    assert "broker (CHROMA_BROKER_URL)" in error.message
    line = one_line_exit_1(["submit", str(REQUESTS / "good" / "minimal.json")], settings)
    assert "could not enqueue task" in line


def test_a_password_never_appears_in_the_error(servers: Servers) -> None:
    wrong = f"redis://:wrong-password@127.0.0.1:{servers.password.port}"
    settings = Settings(broker_url=f"{wrong}/0", result_backend=f"{wrong}/1")
    error, _ = timed(lambda: submit(REQUEST, settings=settings))
    assert "wrong-password" not in str(error)
    assert "wrong-password" not in one_line_exit_1(["status", "t1"], settings)


@pytest.mark.parametrize("which", ["password", "tls"])
def test_the_bounded_producer_still_works(servers: Servers, which: str) -> None:
    server: RedisServer = getattr(servers, which)
    settings = Settings(broker_url=server.url_for(64), result_backend=server.url_for(65), queue=f"ok-{which}")
    task_id = submit(REQUEST, settings=settings)
    with redis.Redis.from_url(server.url_for(64)) as broker:
        assert broker.llen(settings.queue) == 1
        broker.delete(settings.queue)
    assert status(task_id, app=app_for(settings)) == {"state": "PENDING", "meta": None}
