"""The one reader of environment variables: every ``CHROMA_*`` setting, typed, with safe defaults.

Read once at the edge (``Settings()``), then passed down as values. Every value is parsed here
into the type the code uses (enums, tuples), and each set of allowed values is an enum defined
here once. Tests construct ``Settings`` with explicit arguments instead of patching the
environment. S3 credentials are not settings: boto3's standard chain reads them
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles), so they never
appear in a request, a result or a log line.

Groups of settings that a part of the system takes as one value (``Limits``, the engine's
configuration, the S3 client's options) are dataclasses whose field names are settings names;
``pick(cls, settings)`` fills one from the settings without copying field by field.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tasks.keys import has_bad_segment
from tasks.schemas import MAX_SIDE, MAX_STEPS, Limits


class Quantization(str, enum.Enum):
    """How the transformer (and T5) weights are stored on the device."""

    FLOAT8 = "float8"  # torchao float8 weight-only: the reference's numerics (default)
    FLOAT8_FAST = "float8-fast"  # float8 activations too on the image stream: faster, LOSSY, opt-in
    NONE = "none"  # unquantized (debugging)

    @property
    def is_float8(self) -> bool:
        return self is not Quantization.NONE


class DType(str, enum.Enum):
    AUTO = "auto"  # bfloat16 on CUDA, float32 on the CPU (the reference's choice)
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


# float8-fast's row-wise float8 layers quantize bfloat16 weights and activations only.
FAST_DTYPE = (
    "{} cannot run quantization 'float8-fast', whose float8 matmuls take bfloat16; "
    "use 'bfloat16' or 'auto', or quantization 'float8'"
)


class Switch(str, enum.Enum):
    """An optimisation that is on, off, or on where the machine supports it."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class TextPadding(str, enum.Enum):
    AUTO = "auto"  # mask on the CPU, drop on CUDA
    MASK = "mask"  # all 512 tokens with the boolean mask (bit-identical to the reference)
    DROP = "drop"  # the attended tokens only, unmasked (same arithmetic, faster kernels)


class Attention(str, enum.Enum):
    """The fused attention kernel on CUDA; AUTO is PyTorch's choice."""

    AUTO = "auto"
    CUDNN = "cudnn"
    FLASH = "flash"
    EFFICIENT = "efficient"
    MATH = "math"


class NegativePrompt(str, enum.Enum):
    """What the unconditional guidance branch encodes."""

    HONOR = "honor"  # the prompt's ``neg``, as ai-toolkit's sampler does (default)
    IGNORE = "ignore"  # always the empty prompt, as the reference inference service does


AddressingStyle = Literal["path", "virtual", "auto"]  # how S3 requests name the bucket


# The visibility timeout spans at least this many renewal intervals (``Settings`` checks it).
VISIBILITY_REFRESHES = 3


def parse_device(value: str) -> str:
    """A device name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (``CHROMA_DEVICE``, ``run --device``)."""
    name = value.strip().lower()
    kind, _, index = name.partition(":")
    if name == "auto" or (kind in ("cpu", "cuda") and (not index or index.isdigit())):
        return name
    raise ValueError(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N")


def _csv(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHROMA_", extra="ignore", frozen=True)

    # Queue. Passwords and TLS go in the URLs (redis://:pw@host:6379/0, rediss://...).
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/1"
    queue: str = Field("chroma", min_length=1)
    task_time_limit: int = Field(3600, ge=10, description="hard limit per task, seconds (cold load included)")
    visibility_timeout: int = Field(
        40, ge=10, description="a task whose worker stops renewing it for this long goes to another worker"
    )
    visibility_refresh_interval: int = Field(
        10, ge=1, description="seconds between a worker's renewals of the tasks it holds"
    )
    stop_grace: int = Field(100, ge=0, description="seconds a stopping worker lets its task finish")
    max_deliveries: int = Field(3, ge=1, description="a task delivered more often than this fails")
    result_expires: int = Field(7 * 24 * 3600, ge=60)
    retry_max: int = Field(4, ge=0, description="retries of a transient infrastructure failure")
    retry_backoff_max: int = Field(60, ge=1)

    # Object storage.
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_addressing_style: AddressingStyle = "path"
    s3_max_attempts: int = Field(4, ge=1)
    s3_connect_timeout: float = Field(5.0, gt=0)
    s3_read_timeout: float = Field(60.0, gt=0)
    lora_bucket: str = "loras"
    lora_prefix: str = ""
    lora_allowed_buckets: Annotated[tuple[str, ...], NoDecode] = ()
    output_bucket: str = "outputs"
    output_prefix: str = "generations"
    lora_cache_dir: str = "~/.cache/chroma-worker/loras"
    # The pool process touches this file once loaded and warmed up, then every 15 s (container health).
    health_file: str | None = None
    health_max_age: int = Field(120, ge=30, description="seconds without a touch before unhealthy")
    lora_cache_bytes: int = Field(20 * 2**30, ge=0)
    max_lora_bytes: int = Field(2 * 2**30, ge=1)

    # Request limits.
    max_prompts: int = Field(Limits.max_prompts, ge=1)
    max_loras: int = Field(Limits.max_loras, ge=0)
    max_steps: int = Field(Limits.max_steps, ge=1, le=MAX_STEPS)
    max_side: int = Field(Limits.max_side, ge=64, le=MAX_SIDE)
    max_pixels: int = Field(Limits.max_pixels, ge=64 * 64)
    max_prompt_chars: int = Field(Limits.max_prompt_chars, ge=1)
    max_request_bytes: int = Field(Limits.max_request_bytes, ge=1024)

    # Engine: sources are a hub id, a hub "repo/file" or a local path.
    transformer: str = "lodestones/Chroma1-Base/Chroma1-Base.safetensors"
    text_encoder: str = "ostris/Flex.1-alpha/text_encoder_2"
    tokenizer: str = "ostris/Flex.1-alpha/tokenizer_2"
    vae: str = "ostris/Flex.1-alpha/vae"
    quantization: Quantization = Quantization.FLOAT8
    dtype: DType = DType.AUTO
    device: str = "auto"
    compile: bool = Field(True, description="torch.compile the transformer on CUDA")
    compile_cache_dir: str = "~/.cache/chroma-worker/compile"
    compile_cache_uri: str | None = Field(
        None, pattern=r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$", description="s3://bucket/prefix"
    )
    warmup_sizes: Annotated[tuple[tuple[int, int], ...], NoDecode] = ((1024, 1024),)
    variant_cache_bytes: int = Field(0, ge=0, description="device bytes for fused variants; 0 = auto")
    rope_axes: Annotated[tuple[int, ...] | None, NoDecode] = None
    text_padding: TextPadding = TextPadding.AUTO
    batch_cfg: bool = Field(True, description="run both guidance branches in one transformer pass")
    working_copy: Switch = Switch.AUTO
    kernels: Switch = Switch.AUTO
    attention: Attention = Attention.CUDNN
    negative_prompt: NegativePrompt = NegativePrompt.HONOR
    preview: bool = Field(False, description="requests render as ai-toolkit's training preview by default")

    # Third-party warnings, log lines and progress bars shown as the libraries print them (tasks.quiet).
    verbose: bool = Field(False, description="show third-party warnings and progress bars")

    @field_validator("lora_prefix", "output_prefix")
    @classmethod
    def _prefix_segments(cls, value: str) -> str:
        clean = value.strip("/")
        if clean and has_bad_segment(clean):
            raise ValueError(f"{value!r} has an empty, '.' or '..' segment; write e.g. team/loras")
        return value

    @field_validator("lora_allowed_buckets", mode="before")
    @classmethod
    def _buckets(cls, value: Any) -> Any:
        return _csv(value)

    @field_validator("warmup_sizes", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        sizes = []
        for item in _csv(value):
            width, sep, height = item.lower().partition("x")
            if not sep or not width.strip().isdigit() or not height.strip().isdigit():
                raise ValueError(f"{item!r} is not a size; write WIDTHxHEIGHT, e.g. 1024x1024,768x1344")
            sizes.append((int(width), int(height)))
        return tuple(sizes)

    @field_validator("warmup_sizes")
    @classmethod
    def _sizes_in_range(cls, value: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
        for width, height in value:
            if not (64 <= width <= MAX_SIDE and 64 <= height <= MAX_SIDE):
                raise ValueError(f"{width}x{height}: each side must be 64..{MAX_SIDE}")
        return value

    @field_validator("rope_axes", mode="before")
    @classmethod
    def _axes(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        parts = _csv(value)
        if not parts:
            return None
        if not all(part.isdigit() for part in parts):
            raise ValueError(f"{value!r} is not a list of integers; write e.g. 16,56,56 (or leave it empty)")
        return tuple(int(part) for part in parts)

    @field_validator("rope_axes")
    @classmethod
    def _axes_even(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and (len(value) != 3 or any(a <= 0 or a % 2 for a in value)):
            raise ValueError(f"{value}: give three positive even integers summing to the head size")
        return value

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        return parse_device(value)

    @model_validator(mode="after")
    def _refreshes_fit_the_timeout(self) -> Settings:
        # A running task's worker renews it every refresh interval (worker.fleet); a timeout of fewer
        # than VISIBILITY_REFRESHES renewals hands tasks that are still running to another worker.
        least = VISIBILITY_REFRESHES * self.visibility_refresh_interval
        if self.visibility_timeout < least:
            raise ValueError(
                f"CHROMA_VISIBILITY_TIMEOUT ({self.visibility_timeout}s) must be at least "
                f"{VISIBILITY_REFRESHES} x CHROMA_VISIBILITY_REFRESH_INTERVAL "
                f"({self.visibility_refresh_interval}s) = {least}s, or a pause of the worker's renewals "
                "hands its running task to another worker; raise the timeout or lower the interval"
            )
        return self

    @property
    def allowed_buckets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.lora_bucket, *self.lora_allowed_buckets)))

    @property
    def limits(self) -> Limits:
        return pick(Limits, self, allowed_buckets=self.allowed_buckets)


T = TypeVar("T")


def pick(cls: type[T], settings: Settings, **given: Any) -> T:
    """A dataclass whose fields are named like settings, filled from ``settings``.

    ``given`` fills the fields that are not settings (``EngineConfig.sources``); any other keeps
    its default."""
    values = {
        f.name: getattr(settings, f.name)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.name in Settings.model_fields
    }
    return cls(**{**values, **given})


class SettingsError(ValueError):
    """A setting this worker cannot serve (a missing file, a device or feature the machine lacks).

    ``setting`` is the field name; the message names the environment variable and what to change.
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"CHROMA_{setting.upper()}: {message}")
        self.setting = setting
