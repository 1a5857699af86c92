"""storage/ against a real S3 HTTP endpoint (moto's server, one for the package).

No mocked boto3: requests go over HTTP to the in-process server. GetObject calls are counted with a
botocore event hook on the real client, which observes requests without changing them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.client import BaseClient

from storage import make_client
from tests.s3server import start_s3_server
from tests.unit.storage.objects import SECRET


@pytest.fixture(scope="package")
def s3_endpoint() -> Iterator[str]:
    endpoint, stop = start_s3_server()
    yield endpoint
    stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials through boto3's standard chain; no real AWS config leaks in."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-access-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture
def client(s3_endpoint: str, aws_env: None) -> BaseClient:
    return make_client(
        endpoint_url=s3_endpoint,
        region="us-east-1",
        max_attempts=2,
        connect_timeout=2.0,
        read_timeout=10.0,
    )


@pytest.fixture
def bucket(client: BaseClient) -> str:
    name = f"b-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def get_calls(client: BaseClient) -> list[str]:
    """Keys of every GetObject the client sends."""
    calls: list[str] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        calls.append(params["Key"])

    client.meta.events.register("provide-client-params.s3.GetObject", record)
    return calls
