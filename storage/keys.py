"""Object keys: where LoRAs are read from and where a task's outputs go. Pure functions.

::

    LoRA     s3://<lora bucket>/<lora prefix>/<path>        (path relative to the prefix)
             s3://<bucket>/<key>                             (path given as an s3:// URI)
    image    s3://<output bucket>/<output prefix>/<task id>/<index>.<ext>
    result   s3://<output bucket>/<output prefix>/<task id>/result.json

Output keys depend only on the task id, so a redelivered task overwrites its own outputs. Every
function raises ``ValueError`` for input that would escape its place (``..``, absolute paths,
unsafe task ids); requests reach here already validated by ``tasks.schemas``, so such an error
means a caller skipped validation.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from tasks.schemas import check_lora_path_shape
from tasks.schemas import lora_bucket as bucket_of_uri

MAX_TASK_ID_CHARS = 128
MAX_KEY_BYTES = 1024  # S3's limit on a key, in UTF-8 bytes
_TASK_ID = re.compile(r"[A-Za-z0-9_.\-]+")
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
    if uri_bucket is not None:
        if allowed_buckets is not None and uri_bucket not in (lora_bucket, *allowed_buckets):
            raise ValueError(f"bucket {uri_bucket!r} is not allowed for LoRAs")
        return uri_bucket, _check_key_length(path[len(f"s3://{uri_bucket}/") :])
    return lora_bucket, _check_key_length(_join(lora_prefix, path))


def output_key(output_prefix: str, task_id: str, index: int, ext: str) -> str:
    """``<prefix>/<task id>/<index>.<ext>``: the key of one generated image."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"image index must be a non-negative integer, got {index!r}")
    if not _EXTENSION.fullmatch(ext):
        raise ValueError(f"file extension must be 1-10 lowercase letters or digits, got {ext!r}")
    return _check_key_length(_join(output_prefix, f"{check_task_id(task_id)}/{index}.{ext}"))


def result_key(output_prefix: str, task_id: str) -> str:
    """``<prefix>/<task id>/result.json``: the key of a task's result document, written last."""
    return _check_key_length(_join(output_prefix, f"{check_task_id(task_id)}/result.json"))


def uri(bucket: str, key: str) -> str:
    """``s3://bucket/key``."""
    if not bucket or "/" in bucket:
        raise ValueError(f"bucket must be a plain bucket name, got {bucket!r}")
    if not key or key.startswith("/"):
        raise ValueError(f"key must be a non-empty relative key, got {key!r}")
    return f"s3://{bucket}/{key}"


def check_task_id(task_id: str) -> str:
    """``task_id`` if it is safe as one key segment (letters, digits, ``_.-``; no ``..``; <= 128)."""
    if (
        not isinstance(task_id, str)
        or not 0 < len(task_id) <= MAX_TASK_ID_CHARS
        or not _TASK_ID.fullmatch(task_id)
        or ".." in task_id
        or task_id == "."
    ):
        raise ValueError(
            f"task id must be 1-{MAX_TASK_ID_CHARS} characters of letters, digits, '_', '.' or '-' "
            f"without '..' (a UUID works), got {task_id!r}"
        )
    return task_id


def _join(prefix: str, rest: str) -> str:
    """``prefix/rest`` with the prefix's outer slashes dropped; an empty prefix adds nothing."""
    clean = prefix.strip("/")
    if clean and any(part in ("", ".", "..") for part in clean.split("/")):
        raise ValueError(f"prefix {prefix!r} has an empty, '.' or '..' segment")
    return f"{clean}/{rest}" if clean else rest


def _check_key_length(key: str) -> str:
    size = len(key.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        raise ValueError(f"object key is {size} bytes; S3 allows at most {MAX_KEY_BYTES}")
    return key
