"""Real services for integration tests: a test-owned Redis, an S3 endpoint, worker processes.

Nothing here is a mock: Redis is ``redis-server`` (append-only persistence, so a restart keeps
accepted tasks), S3 is moto's HTTP server, and workers are ``celery -A worker worker`` processes
with the same command line production uses. ``FaultProxy`` sits between a worker and S3 when a test
needs the endpoint to answer 5xx or go away.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import redis

from tasks.cli import worker_argv
from tests.s3server import free_port

REPO = Path(__file__).resolve().parents[1]
ACCESS_KEY = "integration-access-key"
SECRET_KEY = "integration-secret-key-never-logged"


class RedisServer:
    """``redis-server`` on a free port with append-only persistence, optionally with a password
    (``requirepass``) and TLS only (a CA and server certificate made for the test)."""

    def __init__(self, folder: Path, password: str | None = None, tls: bool = False):
        if shutil.which("redis-server") is None:
            raise RuntimeError(
                "redis-server is not installed; run ./scripts/bootstrap.sh or apt-get install redis-server"
            )
        self.folder = folder
        self.password = password
        self.port = free_port()
        self.ca_file: Path | None = None
        self.process: subprocess.Popen | None = None
        if tls:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.ca_file, self._cert_file, self._key_file = write_tls_files(folder / "tls")
        self.start()

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:port`` (``rediss://`` with TLS); add ``/db`` or use ``url_for``."""
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.ca_file else 'redis'}://{auth}127.0.0.1:{self.port}"

    def url_for(self, db: int) -> str:
        """The URL of database ``db``, with the TLS options a client needs to verify the server."""
        if self.ca_file is None:
            return f"{self.url}/{db}"
        return f"{self.url}/{db}?ssl_cert_reqs=required&ssl_ca_certs={self.ca_file}"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url_for(0))

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        argv = ["redis-server", "--bind", "127.0.0.1", "--dir", str(self.folder),
                "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--logfile", "redis.log",
                "--databases", "128"]  # fmt: skip
        if self.ca_file is not None:
            argv += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self._cert_file),
                     "--tls-key-file", str(self._key_file), "--tls-ca-cert-file", str(self.ca_file),
                     "--tls-auth-clients", "no"]  # fmt: skip
        else:
            argv += ["--port", str(self.port)]
        if self.password:
            argv += ["--requirepass", self.password]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
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


def write_tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1: (ca.pem, server.pem, server.key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject, issuer, public_key, signing_key, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = certificate(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    cert = certificate(name, ca_name, key.public_key(), ca_key, ca=False)

    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


class WorkerProcess:
    """``celery -A worker worker`` with one prefork pool process, as production runs it.

    The worker leads its own process group, so a test can stop, freeze or kill the whole of it
    (parent and pool process together, as when its machine is lost)."""

    def __init__(self, env: dict[str, str], queue: str, log: Path, name: str, app: str = "worker"):
        self.name = name  # the node is name@host
        self.log_path = log
        self.log = log.open("w")
        extra = ["--loglevel", "INFO", "-n", f"{name}@%h",
                 "--without-heartbeat"]  # fmt: skip
        argv = worker_argv(queue, extra, app=app)  # the command line production uses
        self.process = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

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

    def signal_group(self, sig: signal.Signals) -> None:
        """``sig`` to the parent and its pool process at once (SIGKILL: a lost node; SIGSTOP: a frozen
        one, its sockets left open; SIGCONT: the frozen node resumes)."""
        os.killpg(self.process.pid, sig)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # a frozen worker could not stop
            self.signal_group(signal.SIGCONT)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in self.pool_children():
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):  # whatever of the group is left
            self.signal_group(signal.SIGKILL)
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
    """An HTTP proxy to S3 that answers 503, drops connections or stops listening, for fault tests.

    ``mode``: "pass"; "503" (every matching request answered 503 ServiceUnavailable); "down"
    (matching requests have their connection closed without an answer). ``fail_next``: answer 503
    to that many matching requests, then pass. A request matches when its method is in ``methods``
    (None: any) and its path contains ``path_contains``. ``stop()`` closes the listening socket and
    every open connection (clients then get "connection refused"); ``start()`` listens again on the
    same port. ``log`` records (method, path, status) with status 0 for a dropped connection.
    """

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        self.mode = "pass"  # "pass" | "503" | "down"
        self.fail_next = 0
        self.methods: set[str] | None = None
        self.path_contains = ""
        self.log: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        self._open: set = set()
        self.port = free_port()
        self.server = None
        self.start()

    def _decide(self, method: str, path: str) -> str:
        """The fate of one request ("down", "503" or "pass"), logged."""
        with self._lock:
            matches = (self.methods is None or method in self.methods) and self.path_contains in path
            if matches and self.mode == "down":
                self.log.append((method, path, 0))
                return "down"
            if matches and (self.mode == "503" or self.fail_next > 0):
                if self.mode != "503":
                    self.fail_next -= 1
                self.log.append((method, path, 503))
                return "503"
            return "pass"

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy._open.add(self.connection)

            def finish(self) -> None:
                with proxy._lock:
                    proxy._open.discard(self.connection)
                with contextlib.suppress(OSError):  # the client may have gone already
                    super().finish()

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                decision = proxy._decide(self.command, self.path)
                if decision == "down":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if decision == "503":
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
                with proxy._lock:
                    proxy.log.append((self.command, self.path, response.status))
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

        return Handler

    def start(self) -> None:
        """Listen (again) on the proxy's port."""

        class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server(("127.0.0.1", self.port), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop listening and cut every open connection: the endpoint is gone."""
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        self.server = None
        with self._lock:
            open_connections, self._open = list(self._open), set()
        for conn in open_connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        """Pass everything again and forget what was seen (listening again if stopped)."""
        with self._lock:
            self.mode, self.fail_next, self.methods, self.path_contains = "pass", 0, None, ""
            self.log = []
        if self.server is None:
            self.start()

    def seen(self, method: str | None = None, path_contains: str = "") -> list[tuple[str, str, int]]:
        """The requests logged so far, optionally one method's and paths containing a part."""
        with self._lock:
            return [e for e in self.log if (method is None or e[0] == method) and path_contains in e[1]]

    def close(self) -> None:
        self.stop()
