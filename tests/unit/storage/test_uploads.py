"""Uploads: images and result.json written, read back, and failing without a credential in the error."""

from __future__ import annotations

import json
import os

import pytest
from botocore.client import BaseClient

from storage import output_key, result_key, upload_bytes, upload_result
from tasks.errors import StorageUnavailable
from tests.unit.storage.objects import SECRET


def test_upload_bytes_overwrites_and_reads_back(client: BaseClient, bucket: str) -> None:
    key = output_key("generations", "task-1", 0, "png")
    upload_bytes(client, bucket, key, b"first", "image/png")
    etag = upload_bytes(client, bucket, key, b"second", "image/png")
    got = client.get_object(Bucket=bucket, Key=key)
    assert got["Body"].read() == b"second"
    assert got["ContentType"] == "image/png"
    assert got["ETag"].strip('"') == etag
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]] == [key]


def test_upload_result_is_json(client: BaseClient, bucket: str) -> None:
    key = result_key("generations", "task-1")
    result = {"task_id": "task-1", "images": [{"index": 0, "prompt": "ünïcode"}], "timings": {"denoise": 1.5}}
    upload_result(client, bucket, key, result)
    got = client.get_object(Bucket=bucket, Key=key)
    assert got["ContentType"] == "application/json"
    assert json.loads(got["Body"].read().decode("utf-8")) == result


def test_upload_to_missing_bucket_is_storage_unavailable(client: BaseClient, bucket: str) -> None:
    with pytest.raises(StorageUnavailable, match="bucket does not exist"):
        upload_bytes(client, f"{bucket}-absent", "t/0.png", b"png", "image/png")


def test_upload_sends_no_credentials_in_errors(client: BaseClient) -> None:
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET
    with pytest.raises(StorageUnavailable) as info:
        upload_result(client, "no-such-bucket-xyz", "t/result.json", {})
    assert SECRET not in str(info.value) and "test-access-key-id" not in str(info.value)
