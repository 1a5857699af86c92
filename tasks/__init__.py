"""The contract between producers and GPU workers.

Imports celery and pydantic only (never torch): a web backend installs just this package.
"""

from tasks.errors import (
    DeliveryLimitExceeded,
    DeviceError,
    DeviceLost,
    InvalidLora,
    InvalidRequest,
    LoraNotFound,
    NonFiniteOutput,
    OutOfMemory,
    StorageUnavailable,
    TimeLimitExceeded,
    TransientError,
    WorkerError,
)
from tasks.names import GENERATE
from tasks.results import GenerationResult, Progress
from tasks.schemas import GenerationRequest, Limits, resolve_prompts, validate_request
from tasks.settings import Settings

__all__ = [
    "GENERATE",
    "DeliveryLimitExceeded",
    "DeviceError",
    "DeviceLost",
    "GenerationRequest",
    "GenerationResult",
    "InvalidLora",
    "InvalidRequest",
    "Limits",
    "LoraNotFound",
    "NonFiniteOutput",
    "OutOfMemory",
    "Progress",
    "Settings",
    "StorageUnavailable",
    "TimeLimitExceeded",
    "TransientError",
    "WorkerError",
    "resolve_prompts",
    "validate_request",
]
