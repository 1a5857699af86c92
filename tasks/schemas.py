"""Request and result schemas: the reference API's field names, defaults and limits.

Validation happens twice with the same code: in the producer before anything is enqueued and in
the worker before any GPU work. ``validate_request`` is the one entry point; it turns every
problem into ``InvalidRequest`` naming the field (``prompts.0.width``) and what to change.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from tasks.errors import InvalidRequest

KNOWN_MODELS = ("chroma",)
SIZE_MULTIPLE = 32
MIN_SIDE = 64
MAX_SIDE = 4096  # the hard cap; CHROMA_MAX_SIDE may lower it
MAX_STEPS = 150  # the hard cap; CHROMA_MAX_STEPS may lower it
MAX_GUIDANCE = 20.0
DEFAULT_SIZE = 1024
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 4.0
DEFAULT_SEED_BASE = 42
MAX_SEED = 2**63 - 1
RANDOM_SEED_BOUND = 2**31 - 1  # seed -1 draws from [0, 2**31 - 1), as the reference
# Classifier-free guidance runs only above this scale: ai-toolkit's pipeline threshold.
CFG_THRESHOLD = 1.00001

_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)
_S3_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/(?P<key>.+)$")
# A URL (``scheme://...``) or a well-known scheme written without slashes (``file:/etc/x``). A colon
# anywhere else is an ordinary character of an S3 key (``run:v2/lora.safetensors``).
_SCHEME = re.compile(
    r"^(?:[A-Za-z][A-Za-z0-9+.\-]*://|(?:s3|s3a|s3n|file|https?|ftp|data|gs|hf|az|abfss?|wasbs?):)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Limits:
    """Request limits; the worker's copy comes from ``Settings`` (see tasks.settings)."""

    max_prompts: int = 16
    max_loras: int = 4
    max_steps: int = MAX_STEPS
    max_side: int = MAX_SIDE
    max_pixels: int = MAX_SIDE * MAX_SIDE
    max_prompt_chars: int = 4000
    max_request_bytes: int = 256 * 1024
    allowed_buckets: tuple[str, ...] = ()


Finite = Annotated[float, Field(allow_inf_nan=False)]


def _nulls_mean_default(cls: type[BaseModel], data: Any) -> Any:
    """The reference API's fields are optional: an explicit null asks for the default."""
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
    return data


class LoraSpec(BaseModel):
    model_config = _STRICT

    path: str = Field(min_length=1, max_length=1024)
    network_multiplier: Annotated[Finite, Field(ge=-2.0, le=2.0)] = 1.0
    # Accepted for reference compatibility; only meaningful for mixture-of-experts models.
    transformer: None = None

    _nulls = model_validator(mode="before")(classmethod(_nulls_mean_default))

    @field_validator("path")
    @classmethod
    def _path_shape(cls, value: str) -> str:
        check_lora_path_shape(value)
        return value


class PromptSpec(BaseModel):
    model_config = _STRICT

    prompt: str = Field(min_length=1)
    trigger_word: str | None = None
    width: Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE)] = DEFAULT_SIZE
    height: Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE)] = DEFAULT_SIZE
    sample_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = DEFAULT_STEPS
    guidance_scale: Annotated[Finite, Field(ge=0.0, le=MAX_GUIDANCE)] = DEFAULT_GUIDANCE
    seed: Annotated[int, Field(ge=-1, le=MAX_SEED)] | None = None
    neg: str = ""
    # Reference fields that have one meaning for Chroma: accepted when left at their default.
    sampler: Literal["flowmatch"] | None = None
    # Reference fields of other models (video, control images): accepted only when null.
    num_frames: None = None
    fps: None = None
    resolution: None = None
    ctrl_img: None = None
    ctrl_img_1: None = None
    ctrl_img_2: None = None
    ctrl_img_3: None = None

    _nulls = model_validator(mode="before")(classmethod(_nulls_mean_default))

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is blank; write the text to generate")
        return value


class GenerationRequest(BaseModel):
    model_config = _STRICT

    model: str
    prompts: list[PromptSpec] = Field(min_length=1)
    loras: list[LoraSpec] = Field(default_factory=list)
    trigger_word: str | None = None
    output_format: Literal["png", "jpeg", "webp"] = "png"
    # True: render as ai-toolkit's training preview (quanto float8 base, LoRAs unmerged); null: the
    # worker's default (CHROMA_PREVIEW). See docs/sampling.md.
    preview: bool | None = None
    # Secrets never travel in requests: workers read hub tokens from their environment.
    hf_token: None = None
    kv_cache: None = None
    match_target_res: None = None

    _nulls = model_validator(mode="before")(classmethod(_nulls_mean_default))

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in KNOWN_MODELS:
            raise ValueError(f"unknown model {value!r}; known models: {', '.join(KNOWN_MODELS)}")
        return value


@dataclass(frozen=True)
class ResolvedPrompt:
    """One prompt with every default applied: exactly what the engine renders."""

    index: int
    prompt: str
    neg: str
    width: int
    height: int
    sample_steps: int
    guidance_scale: float
    seed: int


def check_lora_path_shape(path: str) -> None:
    """Reject anything but a relative key or an ``s3://bucket/key`` URI, with no traversal."""
    if "\\" in path or any(ord(char) < 0x20 or ord(char) == 0x7F for char in path):
        raise ValueError(
            "LoRA path contains a backslash or a control character (NUL, newline, ...); "
            "use a plain key like 'job/lora.safetensors'"
        )
    if re.match(r"^[A-Za-z]:", path):
        raise ValueError(
            "LoRA path is a local drive path; upload the file and give its key relative to the LoRA prefix"
        )
    key = path
    if _SCHEME.match(path):
        match = _S3_URI.match(path)
        if not match:
            raise ValueError(
                "LoRA path must be a key relative to the LoRA prefix or s3://bucket/key; "
                "other URL schemes are not fetched"
            )
        key = match.group("key")
    if key.startswith("/"):
        raise ValueError("LoRA path is absolute; give a key relative to the LoRA prefix")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError("LoRA path has an empty, '.' or '..' segment; give a plain key without traversal")
    if not key.endswith(".safetensors"):
        raise ValueError("LoRA path must name a .safetensors file (nothing pickled is loaded)")


def lora_bucket(path: str) -> str | None:
    """The bucket an ``s3://`` LoRA path names, or None for a key under the configured prefix."""
    match = _S3_URI.match(path)
    return match.group("bucket") if match else None


def validate_request(data: Any, limits: Limits | None = None) -> GenerationRequest:
    """Parse and check a request (dict, JSON text or model) against the schema and ``limits``."""
    limits = limits or Limits()
    if isinstance(data, GenerationRequest):
        data = data.model_dump(mode="json", exclude_none=True)
    if isinstance(data, str | bytes):
        size = len(data.encode() if isinstance(data, str) else data)
        if size > limits.max_request_bytes:
            raise InvalidRequest(
                f"request is {size} bytes; the limit is {limits.max_request_bytes}", field="request"
            )
        try:
            data = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise InvalidRequest(f"request is not valid JSON: {_short(str(exc))}", field="request") from None
    elif isinstance(data, dict):
        try:
            size = len(json.dumps(data, default=str).encode())
        except (ValueError, RecursionError) as exc:
            raise InvalidRequest(
                f"request cannot be read as JSON: {_short(str(exc))}", field="request"
            ) from None
        if size > limits.max_request_bytes:
            raise InvalidRequest(
                f"request is {size} bytes; the limit is {limits.max_request_bytes}", field="request"
            )
    if not isinstance(data, dict):
        raise InvalidRequest("request must be a JSON object", field="request")
    try:
        request = GenerationRequest.model_validate(data)
    except ValidationError as exc:
        raise _translate(exc) from None
    except RecursionError:
        raise InvalidRequest("request is nested too deeply", field="request") from None
    _check_limits(request, limits)
    return request


def resolve_prompts(request: GenerationRequest, preview: bool = False) -> list[ResolvedPrompt]:
    """Apply defaults: trigger words, size snapping (``snap_size``; ``preview``: the request renders
    in preview mode), seeds (omitted: 42 + index; -1: random)."""
    out = []
    for index, spec in enumerate(request.prompts):
        text = effective_prompt(request, spec)
        seed = seed_for(spec.seed, index)
        if seed is None:
            seed = secrets.randbelow(RANDOM_SEED_BOUND)
        out.append(
            ResolvedPrompt(
                index=index,
                prompt=text,
                neg=spec.neg,
                width=snap_size(spec.width, preview),
                height=snap_size(spec.height, preview),
                sample_steps=spec.sample_steps,
                guidance_scale=spec.guidance_scale,
                seed=seed,
            )
        )
    return out


def seed_for(seed: int | None, index: int) -> int | None:
    """The seed rule: omitted -> 42 + the prompt's index; -1 -> None (a random seed, drawn when the
    prompt is resolved and reported back); else the seed as given."""
    if seed is None:
        return DEFAULT_SEED_BASE + index
    return None if seed == -1 else seed


def uses_guidance(guidance_scale: float) -> bool:
    """Whether classifier-free guidance runs (two branches per step): above ``CFG_THRESHOLD``."""
    return guidance_scale > CFG_THRESHOLD


def effective_prompt(request: GenerationRequest, spec: PromptSpec) -> str:
    """As the reference: ``[trigger]`` becomes the prompt's own trigger word, else the request's;
    with neither, it stays as written."""
    trigger = spec.trigger_word or request.trigger_word
    return spec.prompt.replace("[trigger]", trigger) if trigger else spec.prompt


def snap_size(value: int, preview: bool = False) -> int:
    """Floor to a multiple of 32, as the reference service does (1000 -> 992); in preview mode to a
    multiple of 16, as ai-toolkit's training sampler does (1000 -> 992, 1016 -> 1008)."""
    multiple = 16 if preview else SIZE_MULTIPLE
    return max(multiple, value // multiple * multiple)


def _check_limits(request: GenerationRequest, limits: Limits) -> None:
    if len(request.prompts) > limits.max_prompts:
        raise InvalidRequest(
            f"{len(request.prompts)} prompts; send at most {limits.max_prompts} per request", field="prompts"
        )
    if len(request.loras) > limits.max_loras:
        raise InvalidRequest(
            f"{len(request.loras)} LoRAs; stack at most {limits.max_loras} per request", field="loras"
        )
    for i, spec in enumerate(request.prompts):
        where = f"prompts.{i}"
        text = effective_prompt(request, spec)
        if len(text) > limits.max_prompt_chars:
            raise InvalidRequest(
                f"prompt has {len(text)} characters after trigger-word substitution; "
                f"the limit is {limits.max_prompt_chars}",
                field=f"{where}.prompt",
            )
        if not text.strip():
            raise InvalidRequest(
                "prompt is blank after trigger-word substitution; give a trigger word with text",
                field=f"{where}.prompt",
            )
        if spec.sample_steps > limits.max_steps:
            raise InvalidRequest(
                f"{spec.sample_steps} steps; the limit is {limits.max_steps}", field=f"{where}.sample_steps"
            )
        for name in ("width", "height"):
            if getattr(spec, name) > limits.max_side:
                raise InvalidRequest(f"must be at most {limits.max_side}", field=f"{where}.{name}")
        pixels = snap_size(spec.width) * snap_size(spec.height)
        if pixels > limits.max_pixels:
            raise InvalidRequest(
                f"{snap_size(spec.width)}x{snap_size(spec.height)} is {pixels} pixels; "
                f"the limit is {limits.max_pixels}",
                field=f"{where}.width",
            )
    for i, lora in enumerate(request.loras):
        bucket = lora_bucket(lora.path)
        if bucket is not None and bucket not in limits.allowed_buckets:
            allowed = ", ".join(limits.allowed_buckets) or "none"
            raise InvalidRequest(
                f"bucket {bucket!r} is not allowed for LoRAs (allowed: {allowed}); "
                "give a key relative to the LoRA prefix instead",
                field=f"loras.{i}.path",
            )


def _translate(exc: ValidationError) -> InvalidRequest:
    """The first pydantic error as one InvalidRequest naming the field; the rest in the message."""
    errors = exc.errors(include_url=False)
    messages = []
    for err in errors:
        field = ".".join(str(p) for p in err["loc"]) or "request"
        messages.append(f"{field}: {_describe(err)}")
    first = errors[0]
    field = ".".join(str(p) for p in first["loc"]) or "request"
    message = _describe(first)
    if len(messages) > 1:
        message += " (also: " + "; ".join(messages[1:5]) + ")"
    return InvalidRequest(message, field=field)


def _describe(err: ErrorDetails) -> str:
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        return "unknown field; remove it (see the request reference in the README)"
    if kind == "missing":
        return "field required"
    if kind == "none_required":
        # The value is not echoed: these fields (hf_token, ...) may carry a secret.
        return "not supported here; remove it or set it to null"
    if kind == "finite_number":
        return "must be a finite number (NaN and infinity are not allowed)"
    if kind == "value_error":
        return str(err["ctx"]["error"]) if "ctx" in err else err["msg"]
    msg = err["msg"]
    if isinstance(value, float) and not math.isfinite(value):
        msg = "must be a finite number"
    return f"{msg} (got {_short(value)})"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
