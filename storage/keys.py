"""Object keys: where LoRAs are read from and where a task's outputs go. Pure functions.

::

    LoRA     s3://<lora bucket>/<lora prefix>/<path>        (path relative to the prefix)
             s3://<bucket>/<key>                             (path given as an s3:// URI)
    image    s3://<output bucket>/<output prefix>/<task id>/<index>.<ext>
    result   s3://<output bucket>/<output prefix>/<task id>/result.json

Output keys depend only on the task id, so a redelivered task overwrites its own outputs. Every
function raises ``ValueError`` for input that would escape its place (``..``, absolute paths,
unsafe task ids); the rules are ``tasks.keys``'s, which requests and task ids already passed in the
producer, so such an error means a caller skipped validation.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from tasks.keys import MAX_KEY_BYTES, check_lora_path_shape, check_task_id, join_key, key_bytes, lora_key
from tasks.keys import lora_bucket as bucket_of_uri

__all__ = ["lora_location", "output_key", "result_key", "uri"]

_EXTENSION = re.compile(r"[a-z0-9]{1,10}")


def lora_location(
    path: str, *, lora_bucket: str, lora_prefix: str, allowed_buckets: Collection[str] | None = None
) -> tuple[str, str]:
    """(bucket, key) of a request's LoRA ``path``: a key under the LoRA prefix, or ``s3://bucket/key``.

    The prefix applies only to relative paths. ``allowed_buckets``, when given, re-checks the
    allow-list for ``s3://`` paths (the configured LoRA bucket is always allowed).
    """
    check_lora_path_shape(path)
    uri_bucket = bucket_of_uri(path)
    if (
        uri_bucket is not None
        and allowed_buckets is not None
        and uri_bucket not in (lora_bucket, *allowed_buckets)
    ):
        raise ValueError(f"bucket {uri_bucket!r} is not allowed for LoRAs")
    return uri_bucket or lora_bucket, _check_key_length(lora_key(path, lora_prefix))


def output_key(output_prefix: str, task_id: str, index: int, ext: str) -> str:
    """``<prefix>/<task id>/<index>.<ext>``: the key of one generated image."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"image index must be a non-negative integer, got {index!r}")
    if not _EXTENSION.fullmatch(ext):
        raise ValueError(f"file extension must be 1-10 lowercase letters or digits, got {ext!r}")
    return _check_key_length(join_key(output_prefix, f"{check_task_id(task_id)}/{index}.{ext}"))


def result_key(output_prefix: str, task_id: str) -> str:
    """``<prefix>/<task id>/result.json``: the key of a task's result document, written last."""
    return _check_key_length(join_key(output_prefix, f"{check_task_id(task_id)}/result.json"))


def uri(bucket: str, key: str) -> str:
    """``s3://bucket/key``."""
    if not bucket or "/" in bucket:
        raise ValueError(f"bucket must be a plain bucket name, got {bucket!r}")
    if not key or key.startswith("/"):
        raise ValueError(f"key must be a non-empty relative key, got {key!r}")
    return f"s3://{bucket}/{key}"


def _check_key_length(key: str) -> str:
    """S3's key limit. For a LoRA key it is the last guard (requests were checked with the same rule,
    field loras.N.path); for an output key it is the only one."""
    size = key_bytes(key)
    if size > MAX_KEY_BYTES:
        raise ValueError(f"object key is {size} bytes; S3 allows at most {MAX_KEY_BYTES}")
    return key
