"""The S3 client storage/ makes and the errors it translates: its configuration, a credential in the
endpoint refused, botocore errors mapped to ``tasks.errors`` without the secret, bounded retries."""

from __future__ import annotations

from pathlib import Path

import pytest
from botocore.client import BaseClient
from botocore.exceptions import ClientError

from storage import LoraCache, client_from_settings, make_client, storage_error, upload_bytes
from tasks.errors import LoraNotFound, StorageUnavailable, WorkerError
from tasks.settings import Settings
from tests.s3server import free_port
from tests.unit.storage.objects import FIELD, SECRET


def test_client_config(s3_endpoint: str, aws_env: None, bucket: str, client: BaseClient) -> None:
    settings = Settings(s3_endpoint_url=s3_endpoint, s3_max_attempts=3, s3_connect_timeout=1.5)
    configured = client_from_settings(settings)
    config = configured.meta.config
    assert configured.meta.endpoint_url == s3_endpoint
    assert config.retries == {"mode": "standard", "total_max_attempts": 3}
    assert config.s3 == {"addressing_style": "path"}
    assert config.connect_timeout == 1.5
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"

    urls: list[str] = []
    configured.meta.events.register("before-send.s3.PutObject", lambda request, **_: urls.append(request.url))
    configured.put_object(Bucket=bucket, Key="k/x.bin", Body=b"x")
    assert urls == [f"{s3_endpoint}/{bucket}/k/x.bin"]  # path-style


def test_endpoint_with_credentials_is_refused() -> None:
    with pytest.raises(ValueError, match="AWS_ACCESS_KEY_ID") as info:
        make_client(
            endpoint_url=f"http://user:{SECRET}@127.0.0.1:9000",
            region="us-east-1",
            max_attempts=1,
            connect_timeout=1,
            read_timeout=1,
        )
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("status", "code", "lora_field", "expected"),
    [
        (503, "SlowDown", None, StorageUnavailable),
        (500, "InternalError", FIELD, StorageUnavailable),
        (429, "TooManyRequests", None, StorageUnavailable),
        (400, "RequestTimeout", None, StorageUnavailable),
        (403, "AccessDenied", FIELD, StorageUnavailable),
        (404, "NoSuchKey", FIELD, LoraNotFound),
        (404, "404", FIELD, LoraNotFound),
        (404, "NoSuchBucket", None, StorageUnavailable),
    ],
)
def test_client_error_classification(
    status: int, code: str, lora_field: str | None, expected: type[WorkerError]
) -> None:
    exc = ClientError(
        {
            "Error": {"Code": code, "Message": f"echo {SECRET}"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "GetObject",
    )
    error = storage_error(
        exc, action="download", bucket="loras", key="a/b.safetensors", lora_field=lora_field
    )
    assert type(error) is expected
    assert "s3://loras/a/b.safetensors" in str(error)
    assert SECRET not in str(error)


def test_missing_object_is_lora_not_found(client: BaseClient, bucket: str, tmp_path: Path) -> None:
    cache = LoraCache(tmp_path, max_bytes=10**6, max_file_bytes=10**6)
    with pytest.raises(LoraNotFound) as info:
        cache.fetch(client, bucket, "job/missing.safetensors", field=FIELD)
    assert info.value.field == FIELD
    assert f"s3://{bucket}/job/missing.safetensors" in str(info.value)
    with pytest.raises(LoraNotFound):
        cache.fetch(client, f"{bucket}-absent", "x.safetensors", field=FIELD)


def unreachable_client(max_attempts: int) -> tuple[BaseClient, list[str]]:
    """A client of a port nobody listens on, and the methods of the requests it sends."""
    closed = make_client(
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        region="us-east-1",
        max_attempts=max_attempts,
        connect_timeout=0.5,
        read_timeout=0.5,
    )
    sends: list[str] = []
    closed.meta.events.register("before-send.s3", lambda request, **_: sends.append(request.method))
    return closed, sends


def test_endpoint_down_is_storage_unavailable(aws_env: None, tmp_path: Path) -> None:
    closed, sends = unreachable_client(max_attempts=1)
    cache = LoraCache(tmp_path, max_bytes=10**6, max_file_bytes=10**6)
    with pytest.raises(StorageUnavailable) as info:
        cache.fetch(closed, "loras", "a.safetensors", field=FIELD)
    assert info.value.retryable
    assert "s3://loras/a.safetensors" in str(info.value)
    assert SECRET not in str(info.value)
    assert sends == ["HEAD"]  # max_attempts=1: no retry


def test_retries_are_bounded_by_max_attempts(aws_env: None) -> None:
    closed, sends = unreachable_client(max_attempts=2)
    with pytest.raises(StorageUnavailable, match="upload"):
        upload_bytes(closed, "outputs", "t/0.png", b"png", "image/png")
    assert sends == ["PUT", "PUT"]
