"""The one reader of environment variables: every ``CHROMA_*`` setting, typed, with safe defaults.

Read once at the edge (``Settings()``), then passed down as values. Tests construct ``Settings``
with explicit arguments instead of patching the environment. S3 credentials are not settings:
boto3's standard chain reads them (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles,
instance roles), so they never appear in a request, a result or a log line.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.schemas import Limits


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHROMA_", extra="ignore", frozen=True)

    # Queue. Passwords and TLS go in the URLs (redis://:pw@host:6379/0, rediss://...).
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/1"
    queue: str = "chroma"
    task_time_limit: int = Field(3600, ge=10, description="hard limit per task, seconds (cold load included)")
    visibility_timeout: int = Field(7200, ge=20, description="Redis redelivery timeout; above the time limit")
    max_deliveries: int = Field(3, ge=1, description="a task delivered more often than this fails")
    result_expires: int = Field(7 * 24 * 3600, ge=60)
    retry_max: int = Field(4, ge=0, description="retries of a transient infrastructure failure")
    retry_backoff_max: int = Field(60, ge=1)

    # Object storage.
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_addressing_style: Literal["path", "virtual", "auto"] = "path"
    s3_max_attempts: int = Field(4, ge=1)
    s3_connect_timeout: float = 5.0
    s3_read_timeout: float = 60.0
    lora_bucket: str = "loras"
    lora_prefix: str = ""
    lora_allowed_buckets: str = ""
    output_bucket: str = "outputs"
    output_prefix: str = "generations"
    lora_cache_dir: str = "~/.cache/chroma-worker/loras"
    lora_cache_bytes: int = Field(20 * 2**30, ge=0)
    max_lora_bytes: int = Field(2 * 2**30, ge=1)

    # Request limits.
    max_prompts: int = Field(Limits.max_prompts, ge=1)
    max_loras: int = Field(Limits.max_loras, ge=0)
    max_steps: int = Field(Limits.max_steps, ge=1, le=150)
    max_side: int = Field(Limits.max_side, ge=64, le=4096)
    max_pixels: int = Field(Limits.max_pixels, ge=64 * 64)
    max_prompt_chars: int = Field(Limits.max_prompt_chars, ge=1)
    max_request_bytes: int = Field(Limits.max_request_bytes, ge=1024)

    # Engine: sources are a hub id, a hub "repo/file" or a local path.
    transformer: str = "lodestones/Chroma1-Base/Chroma1-Base.safetensors"
    text_encoder: str = "ostris/Flex.1-alpha/text_encoder_2"
    tokenizer: str = "ostris/Flex.1-alpha/tokenizer_2"
    vae: str = "ostris/Flex.1-alpha/vae"
    quantization: Literal["float8", "float8-fast", "none"] = Field(
        "float8",
        description=(
            "float8: torchao float8 weight-only, the reference's numerics (default); "
            "float8-fast: also float8 activations on the image stream, faster but LOSSY (opt-in); "
            "none: unquantized (debugging)"
        ),
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    compile: bool = Field(True, description="torch.compile the transformer on CUDA")
    warmup_sizes: str = "1024x1024"
    variant_cache_bytes: int = Field(0, ge=0, description="device bytes for fused variants; 0 = auto")
    rope_axes: str = Field("", description="RoPE axis split, e.g. '16,56,56'; empty = inferred")
    text_padding: Literal["auto", "mask", "drop"] = "auto"
    batch_cfg: bool = Field(True, description="run both guidance branches in one transformer pass")
    working_copy: Literal["auto", "on", "off"] = Field(
        "auto",
        description="keep the variant being rendered dequantized (same arithmetic, no per-step float8 "
        "dequantization, ~17.8 GB more at full size); auto = on with CUDA when the card has room",
    )
    kernels: Literal["auto", "on", "off"] = Field(
        "auto",
        description="each block's q/k/v preparation (bias, QK norm, RoPE, head layout) as one Triton "
        "kernel: the same arithmetic for float8 (bf16 rounding for float8-fast's biases); "
        "auto = on with CUDA when Triton imports",
    )
    attention: Literal["auto", "cudnn", "flash", "efficient", "math"] = Field(
        "cudnn",
        description="attention kernel on CUDA (cudnn: 612 TFLOP/s vs flash 355 on an H100 at 1024x1024); "
        "auto = PyTorch's choice",
    )

    @model_validator(mode="after")
    def _timeouts_nest(self) -> Settings:
        if self.visibility_timeout <= self.task_time_limit:
            raise ValueError(
                f"CHROMA_VISIBILITY_TIMEOUT ({self.visibility_timeout}s) must exceed CHROMA_TASK_TIME_LIMIT "
                f"({self.task_time_limit}s), or Redis redelivers tasks that are still running"
            )
        return self

    @property
    def allowed_buckets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.lora_bucket, *_csv(self.lora_allowed_buckets))))

    @property
    def limits(self) -> Limits:
        return Limits(
            max_prompts=self.max_prompts,
            max_loras=self.max_loras,
            max_steps=self.max_steps,
            max_side=self.max_side,
            max_pixels=self.max_pixels,
            max_prompt_chars=self.max_prompt_chars,
            max_request_bytes=self.max_request_bytes,
            allowed_buckets=self.allowed_buckets,
        )

    @property
    def warmup_size_list(self) -> list[tuple[int, int]]:
        sizes = []
        for item in _csv(self.warmup_sizes):
            width, _, height = item.lower().partition("x")
            sizes.append((int(width), int(height)))
        return sizes
