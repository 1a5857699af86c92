"""Uploads of a task's images and its result document.

Plain ``put_object`` to keys that depend only on the task id (``storage.keys``): a redelivered task
overwrites its own outputs, so uploads are idempotent. Each upload carries ``Content-MD5`` so the
server rejects a body damaged in transit. Errors are translated by ``storage.s3.storage_errors``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from typing import Any

from botocore.client import BaseClient
from botocore.exceptions import ClientError

from storage.s3 import is_missing_key, storage_errors, strip_etag

logger = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/json"


def upload_bytes(client: BaseClient, bucket: str, key: str, data: bytes, content_type: str) -> str:
    """Store ``data`` at ``s3://bucket/key`` (overwriting); the object's ETag ("" if none came back)."""
    md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")
    with storage_errors("upload", bucket, key):
        response = client.put_object(
            Bucket=bucket, Key=key, Body=data, ContentType=content_type, ContentMD5=md5
        )
    etag = strip_etag(response.get("ETag"))
    logger.info("uploaded s3://%s/%s (%d bytes, %s)", bucket, key, len(data), content_type)
    return etag or ""


def download_bytes(client: BaseClient, bucket: str, key: str) -> bytes | None:
    """The object at ``s3://bucket/key``, or None when there is no such key."""
    with storage_errors("download", bucket, key):
        try:
            response = client.get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if is_missing_key(exc):
                return None
            raise
        data: bytes = response["Body"].read()
        return data


def upload_result(client: BaseClient, bucket: str, key: str, result: dict[str, Any]) -> str:
    """Store ``result`` as UTF-8 JSON (``application/json``); the object's ETag."""
    data = json.dumps(result, ensure_ascii=False, allow_nan=False, indent=2).encode("utf-8")
    return upload_bytes(client, bucket, key, data, JSON_CONTENT_TYPE)
