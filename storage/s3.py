"""The S3 client and the one place where botocore errors become ``tasks.errors``.

Credentials come from boto3's standard chain only (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
profiles, instance roles): they are never arguments, never in a message, never logged. The client
uses path-style addressing by default, botocore's "standard" retry mode, and computes/validates
checksums only when an operation requires them (MinIO and older S3-compatible servers reject the
default CRC trailers of botocore >= 1.36).

How storage failures are classified (``storage_errors`` / ``storage_error``)::

    what botocore reports                          raised                 retried
    connection refused/reset, timeouts,            StorageUnavailable     yes
      truncated body (IncompleteRead)
    HTTP 5xx, 429, SlowDown/Throttling,            StorageUnavailable     yes
      RequestTimeout, clock skew, expired token
    404 / NoSuchKey / NoSuchBucket on a LoRA read  LoraNotFound(field)    no
    403 / AccessDenied, missing credentials,       StorageUnavailable     yes (bounded)
      404 on a write (no such bucket), other 4xx
    ParamValidationError and other bugs            not translated         -

Access denied, missing credentials and a missing output bucket are the operator's problem, never
the request's: blaming the request (422) would tell the user to change something they cannot fix.
They are reported as ``StorageUnavailable`` (503) with a message that names the configuration to
check, and logged at ERROR level. The retries they cost are bounded by the task's retry policy, and
some of them do heal on their own (rotated or expired credentials, a bucket being created). Note
that S3 answers 403, not 404, for a missing key when the credentials may not list the bucket.

Messages name the operation, the ``s3://bucket/key`` and the S3 error code; they never repeat the
server's message text, which may echo request details.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)

from tasks.errors import LoraNotFound, StorageUnavailable, WorkerError
from tasks.settings import AddressingStyle

if TYPE_CHECKING:
    from tasks.settings import Settings

logger = logging.getLogger(__name__)

TRANSLATED_ERRORS: tuple[type[Exception], ...] = (
    ClientError,
    ConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    CredentialRetrievalError,
)
"""The botocore exceptions ``storage_errors`` translates; anything else is a bug and propagates."""

_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "ServiceUnavailable",
        "InternalError",
        "ExpiredToken",
        "TokenRefreshRequired",
    }
)
_MISSING_KEY_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_NOT_FOUND_CODES = _MISSING_KEY_CODES | {"NoSuchBucket"}
_DENIED_CODES = frozenset(
    {"403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
)


def make_client(
    *,
    endpoint_url: str | None,
    region: str,
    addressing_style: AddressingStyle = "path",
    max_attempts: int,
    connect_timeout: float,
    read_timeout: float,
) -> BaseClient:
    """An S3 client for ``endpoint_url`` (None: AWS) with credentials from boto3's standard chain.

    ``max_attempts`` counts every try of a request, the first included (1: no retries).
    """
    if endpoint_url is not None:
        parts = urlsplit(endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"S3 endpoint must be an http(s) URL like http://minio:9000, got {parts.scheme!r}"
            )
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "S3 endpoint URL contains credentials; remove them and set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY in the worker's environment instead"
            )
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    config = Config(
        region_name=region,
        signature_version="s3v4",
        s3={"addressing_style": addressing_style},
        # total_max_attempts counts the first try; botocore's "max_attempts" would add one to it.
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    # A session per client: boto3's default session is shared module state and not thread-safe.
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def client_from_settings(settings: Settings) -> BaseClient:
    """``make_client`` with the ``CHROMA_S3_*`` settings (each parameter is a setting's name
    without its ``s3_`` prefix)."""
    options = {
        name.removeprefix("s3_"): getattr(settings, name)
        for name in type(settings).model_fields
        if name.startswith("s3_")
    }
    return make_client(**options)


@contextmanager
def storage_errors(action: str, bucket: str, key: str, *, lora_field: str | None = None) -> Iterator[None]:
    """Translate botocore errors raised inside the block (see the module docstring).

    ``lora_field`` marks a LoRA read: a missing object is then the request's fault
    (``LoraNotFound`` naming that field) instead of a storage problem.
    """
    try:
        yield
    except TRANSLATED_ERRORS as exc:
        raise storage_error(exc, action=action, bucket=bucket, key=key, lora_field=lora_field) from exc


def storage_error(
    exc: Exception, *, action: str, bucket: str, key: str, lora_field: str | None = None
) -> WorkerError:
    """The ``tasks.errors`` exception for one botocore exception (one of ``TRANSLATED_ERRORS``)."""
    where = f"s3://{bucket}/{key}"
    if not isinstance(exc, ClientError):
        if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
            logger.error("S3 %s of %s: no usable credentials (%s)", action, where, type(exc).__name__)
            return StorageUnavailable(
                f"object storage {action} of {where} failed: the worker has no usable S3 credentials; "
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile/role) for the worker"
            )
        logger.warning("S3 %s of %s failed: %s", action, where, exc)
        return StorageUnavailable(
            f"object storage {action} of {where} failed ({type(exc).__name__}): "
            "storage is unreachable or the transfer broke off; try again later"
        )

    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    detail = f"HTTP {status} {code}".strip()

    if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
        logger.warning("S3 %s of %s: %s (transient)", action, where, detail)
        return StorageUnavailable(f"object storage {action} of {where} failed ({detail}); try again later")
    if status == 404 or code in _NOT_FOUND_CODES:
        if lora_field is not None:
            missing = "bucket" if code == "NoSuchBucket" else "object"
            return LoraNotFound(
                f"no LoRA at {where} (no such {missing}); check the path: keys are relative to the "
                "configured LoRA bucket and prefix",
                field=lora_field,
            )
        logger.error("S3 %s of %s: %s", action, where, detail)
        return StorageUnavailable(
            f"object storage {action} of {where} failed ({detail}): the bucket does not exist; "
            "create it or fix the worker's bucket setting"
        )
    if status == 403 or code in _DENIED_CODES:
        logger.error("S3 %s of %s: %s", action, where, detail)
        return StorageUnavailable(
            f"object storage {action} of {where} was refused ({detail}): check the worker's S3 "
            "credentials and the bucket policy (S3 also answers 403 for a missing key when the "
            "credentials may not list the bucket)",
            field=lora_field,
        )
    logger.error("S3 %s of %s: unexpected %s", action, where, detail)
    return StorageUnavailable(
        f"object storage {action} of {where} failed ({detail}); check the endpoint, region and "
        "addressing-style settings",
        field=lora_field,
    )


def is_missing_key(exc: ClientError) -> bool:
    """A read that found no object at the key (the bucket exists)."""
    return str(exc.response.get("Error", {}).get("Code", "")) in _MISSING_KEY_CODES


def strip_etag(etag: object) -> str | None:
    """An ETag header value without its quotes; None when the server sent none."""
    if not isinstance(etag, str) or not etag:
        return None
    return etag.strip('"')
