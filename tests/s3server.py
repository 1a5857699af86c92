"""A real S3 HTTP endpoint for tests: moto's server in a thread on a free localhost port.

Sets nothing global (no environment variables, no patched boto3). Callers supply credentials the
way production does, through boto3's standard chain (e.g. ``monkeypatch.setenv``).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from moto.server import ThreadedMotoServer


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_s3_server() -> tuple[str, Callable[[], None]]:
    """Start an S3 server; return its endpoint URL and the function that stops it."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return f"http://127.0.0.1:{port}", server.stop
