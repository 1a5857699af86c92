"""Real services for integration tests: a test-owned Redis, an S3 endpoint, worker processes.

Nothing here is a mock: Redis is ``redis-server`` (append-only persistence, so a restart keeps
accepted tasks), S3 is moto's HTTP server, and workers are ``celery -A worker worker`` processes
with the same command line production uses. ``FaultProxy`` sits between a worker and S3 when a test
needs the endpoint to answer 5xx or go away.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socketserver
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import redis

from tests.s3server import free_port

REPO = Path(__file__).resolve().parents[1]
ACCESS_KEY = "integration-access-key"
SECRET_KEY = "integration-secret-key-never-logged"


class RedisServer:
    def __init__(self, folder: Path):
        if shutil.which("redis-server") is None:
            raise RuntimeError(
                "redis-server is not installed; run ./scripts/bootstrap.sh or apt-get install redis-server"
            )
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--logfile", "redis.log",
             "--databases", "64"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # redis fsyncs the append-only file on SIGTERM
            self.process.wait(timeout=10)

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()


class WorkerProcess:
    """``celery -A worker worker`` with one prefork pool process, as production runs it."""

    def __init__(self, env: dict[str, str], queue: str, log: Path, name: str):
        self.log_path = log
        self.log = log.open("w")
        argv = [sys.executable, "-m", "celery", "-A", "worker", "worker", "--pool", "prefork",
                "--concurrency", "1", "-Q", queue, "--loglevel", "INFO", "-n", f"{name}@%h",
                "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip
        self.process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.text()[-3000:]}")
            if "ready." in self.text():
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout}s:\n{self.text()[-3000:]}")

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pool_children(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []

    def kill_child(self) -> int:
        children = self.pool_children()
        assert children, "worker has no pool process"
        os.kill(children[0], signal.SIGKILL)
        return children[0]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in self.pool_children():
            os.kill(pid, signal.SIGKILL)
        self.log.close()


def worker_env(settings_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHROMA_", "AWS_"))}
    env.update(
        {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(settings_env)
    return env


class FaultProxy:
    """An HTTP proxy to S3 that can answer 503 or refuse connections, for fault tests."""

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        self.mode = "pass"  # "pass" | "503" | "down"
        self.fail_next = 0  # answer 503 to this many requests, then pass
        self.requests = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                proxy.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.mode == "down":
                    self.close_connection = True
                    self.connection.close()
                    return
                if proxy.mode == "503" or proxy.fail_next > 0:
                    proxy.fail_next = max(0, proxy.fail_next - 1)
                    payload = b"<Error><Code>ServiceUnavailable</Code><Message>down</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.port = free_port()
        self.server = Server(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
