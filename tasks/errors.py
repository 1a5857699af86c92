"""The error tree shared by producers, the worker and the engine.

::

    WorkerError                      code                 retried  http
    ├── InvalidRequest               invalid_request      no       422
    │   ├── InvalidLora              invalid_lora         no       422
    │   ├── LoraNotFound             lora_not_found       no       404
    │   └── NonFiniteOutput          non_finite_output    no       422
    ├── TransientError               transient            yes      503
    │   └── StorageUnavailable       storage_unavailable  yes      503
    ├── DeviceError                  device_failure       no       500
    │   ├── OutOfMemory              out_of_memory        no       507
    │   └── DeviceLost               device_lost          no*      500
    ├── TimeLimitExceeded            time_limit           no       504
    └── DeliveryLimitExceeded        delivery_limit       no       500

    * the process exits and the broker delivers the task again elsewhere.

Every error carries a stable ``code`` the web backend maps to a status, an optional ``field``
(dotted path into the request, e.g. ``prompts.0.width``) and a message that says what to change.
Third-party exceptions are translated once, where they enter (``raise X(...) from exc``).
Errors travel through Celery as JSON (the class name and ``args``), never pickled; ``to_dict``
gives the shape a web backend returns.
"""

from __future__ import annotations

from typing import Any, ClassVar


class WorkerError(Exception):
    code: ClassVar[str] = "worker_error"
    http_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, field: str | None = None) -> None:
        # Both in args: Celery rebuilds a failed task's exception as cls(*args) from JSON.
        super().__init__(message, field)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "field": self.field, "message": self.message}


class InvalidRequest(WorkerError):
    """The request can never succeed as written; the message says what to change."""

    code = "invalid_request"
    http_status = 422


class InvalidLora(InvalidRequest):
    """A LoRA file is unreadable, of an unsupported kind, or does not fit the model."""

    code = "invalid_lora"


class LoraNotFound(InvalidRequest):
    code = "lora_not_found"
    http_status = 404


class NonFiniteOutput(InvalidRequest):
    """The render held NaN or infinity (latents or pixels): never reported as an image."""

    code = "non_finite_output"


class TransientError(WorkerError):
    """Infrastructure that may work on a later try (storage, broker, network)."""

    code = "transient"
    http_status = 503
    retryable = True


class StorageUnavailable(TransientError):
    code = "storage_unavailable"


class DeviceError(WorkerError):
    code = "device_failure"


class OutOfMemory(DeviceError):
    """The request did not fit in device memory; the worker freed memory and goes on."""

    code = "out_of_memory"
    http_status = 507


class DeviceLost(DeviceError):
    """The device context is unusable; the process exits so it can be replaced."""

    code = "device_lost"


class TimeLimitExceeded(WorkerError):
    """The task ran past its time limit and was stopped."""

    code = "time_limit"
    http_status = 504


class DeliveryLimitExceeded(WorkerError):
    """The task was delivered too many times (each delivery lost its worker)."""

    code = "delivery_limit"


def error_classes(cls: type[WorkerError] = WorkerError) -> list[type[WorkerError]]:
    """``cls`` and every class below it in the tree."""
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(error_classes(sub))
    return out
