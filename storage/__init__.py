"""Object storage for the worker: object keys, LoRA downloads into a local content cache, uploads.

Depends on boto3 and ``tasks`` only (never torch or celery). Every function takes its client,
buckets and prefixes as arguments; ``client_from_settings`` builds the client from ``Settings``.
Botocore errors are translated once, in ``storage.s3``, into ``tasks.errors``.
"""

from storage.keys import lora_location, output_key, result_key, uri
from storage.lora_cache import CachedLora, LoraCache, check_lora_file, validate_safetensors_header
from storage.outputs import download_bytes, upload_bytes, upload_result
from storage.s3 import client_from_settings, make_client, storage_error, storage_errors

__all__ = [
    "CachedLora",
    "LoraCache",
    "check_lora_file",
    "client_from_settings",
    "download_bytes",
    "lora_location",
    "make_client",
    "output_key",
    "result_key",
    "storage_error",
    "storage_errors",
    "upload_bytes",
    "upload_result",
    "uri",
    "validate_safetensors_header",
]
