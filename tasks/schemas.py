"""Request and result schemas: the reference API's field names, defaults and limits.

Validation happens twice with the same code: in the producer before anything is enqueued and in
the worker before any GPU work. ``validate_request`` is the one entry point; it turns every
problem into ``InvalidRequest`` naming the field (``prompts.0.width``) and what to change.
"""

from __future__ import annotations

import math
import secrets
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from tasks.errors import InvalidRequest
from tasks.keys import MAX_KEY_BYTES, check_lora_path_shape, lora_bucket, lora_key_bytes, lora_object_key
from tasks.request_text import check_shape, field_path, one_line, parse_json, shown

KNOWN_MODELS = ("chroma",)
MAX_MULTIPLIER = 2.0
ITEM_EXAMPLES = {"PromptSpec": '{"prompt": "a photo"}', "LoraSpec": '{"path": "job/lora.safetensors"}'}
# Characters that draw nothing but are not Unicode whitespace or format characters: a prompt of
# these and whitespace is as blank as an empty one.
BLANK_GLYPHS = frozenset("\u2800\u3164\u115f\u1160\uffa0")
# Unassigned and private-use code points are not among them: a newer emoji than this Python knows
# is unassigned here, and still something to draw.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"})
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
TRIGGER = "[trigger]"  # the placeholder a prompt's trigger word replaces
# A LoRA path may be an s3:// URI with the longest bucket name; its key's bytes are checked too.
MAX_LORA_PATH_CHARS = len("s3://") + 63 + 1 + MAX_KEY_BYTES

_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)


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
    lora_prefix: str = ""  # counted in a LoRA key's length (S3 allows MAX_KEY_BYTES)
    lora_bucket: str = ""  # where relative LoRA paths live: the same file named both ways is one LoRA
    preview: bool = False  # what a request without "preview" gets (CHROMA_PREVIEW): sizes snap to 16


def _positive_zero(value: float) -> float:
    """-0.0 -> 0.0: the same number, reported and cached one way."""
    return value + 0.0


Finite = Annotated[float, Field(allow_inf_nan=False), AfterValidator(_positive_zero)]


def is_blank(text: str) -> bool:
    """Nothing to see: whitespace, control and format characters (zero-width, bidirectional
    marks) and the blank glyphs (braille blank, Hangul fillers) only."""
    return all(
        ch.isspace() or ch in BLANK_GLYPHS or unicodedata.category(ch) in INVISIBLE_CATEGORIES for ch in text
    )


def _nulls_mean_default(cls: type[BaseModel], data: Any) -> Any:
    """The reference API's fields are optional: an explicit null asks for the default."""
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
    return data


class LoraSpec(BaseModel):
    model_config = _STRICT

    path: str = Field(min_length=1, max_length=MAX_LORA_PATH_CHARS)
    network_multiplier: Annotated[Finite, Field(ge=-MAX_MULTIPLIER, le=MAX_MULTIPLIER)] = 1.0
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
        if is_blank(value):
            raise ValueError("prompt is blank (nothing visible); write the text to generate")
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
            raise ValueError(
                f"unknown model {shown(value, ascii_only=True)}; known models: {', '.join(KNOWN_MODELS)}"
            )
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


def validate_request(data: Any, limits: Limits | None = None) -> GenerationRequest:
    """Parse and check a request (dict, JSON text or bytes, or model) against the schema and ``limits``.

    Text is read by ``tasks.request_text`` (UTF-8, size, duplicate keys, depth); a dict is measured
    as the JSON it stands for. Every problem is ``InvalidRequest`` naming the field.
    """
    limits = limits or Limits()
    if isinstance(data, GenerationRequest):
        data = data.model_dump(mode="json", exclude_none=True)
    if isinstance(data, str | bytes | bytearray):
        data = parse_json(data, limits.max_request_bytes)
    elif isinstance(data, dict):
        check_shape(data, max_bytes=limits.max_request_bytes)
    if not isinstance(data, dict):
        raise InvalidRequest(f"must be a JSON object, got {_kind(data)}", field="request")
    _check_counts(data, limits)
    try:
        request = GenerationRequest.model_validate(data)
    except ValidationError as exc:
        raise _translate(exc) from None
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
    with neither, it stays as written. ``validate_request`` bounds its length first
    (``effective_prompt_length``), so the text built here is at most ``max_prompt_chars``."""
    trigger = spec.trigger_word or request.trigger_word
    return spec.prompt.replace(TRIGGER, trigger) if trigger else spec.prompt


def effective_prompt_length(request: GenerationRequest, spec: PromptSpec) -> int:
    """``len(effective_prompt(request, spec))``, counted without building the text (a long trigger
    word times many placeholders would make gigabytes)."""
    trigger = spec.trigger_word or request.trigger_word
    if not trigger:
        return len(spec.prompt)
    return len(spec.prompt) + spec.prompt.count(TRIGGER) * (len(trigger) - len(TRIGGER))


def renders_preview(request: GenerationRequest, default: bool) -> bool:
    """Whether ``request`` renders in preview mode: its own ``preview``, else the worker's default."""
    return default if request.preview is None else request.preview


def snap_size(value: int, preview: bool = False) -> int:
    """Floor to a multiple of 32, as the reference service does (1000 -> 992); in preview mode to a
    multiple of 16, as ai-toolkit's training sampler does (1000 -> 992, 1016 -> 1008)."""
    multiple = 16 if preview else SIZE_MULTIPLE
    return max(multiple, value // multiple * multiple)


def _check_counts(data: dict[str, Any], limits: Limits) -> None:
    """Prompt and LoRA counts, checked before the schema: a list of 100,000 bad items would cost
    seconds and a hundred megabytes of error reports."""
    prompts, loras = data.get("prompts"), data.get("loras")
    if isinstance(prompts, list) and len(prompts) > limits.max_prompts:
        raise InvalidRequest(
            f"{len(prompts)} prompts; send at most {limits.max_prompts} per request", "prompts"
        )
    if isinstance(loras, list) and len(loras) > limits.max_loras:
        raise InvalidRequest(f"{len(loras)} LoRAs; stack at most {limits.max_loras} per request", "loras")


def _check_limits(request: GenerationRequest, limits: Limits) -> None:
    _check_text_length(request.trigger_word, "trigger_word", limits)
    preview = renders_preview(request, limits.preview)
    for i, spec in enumerate(request.prompts):
        where = f"prompts.{i}"
        _check_text_length(spec.trigger_word, f"{where}.trigger_word", limits)
        _check_text_length(spec.neg, f"{where}.neg", limits)
        length = effective_prompt_length(request, spec)
        if length > limits.max_prompt_chars:
            raise InvalidRequest(
                f"prompt has {length} characters after trigger-word substitution; "
                f"the limit is {limits.max_prompt_chars}",
                field=f"{where}.prompt",
            )
        text = effective_prompt(request, spec)  # now known to be short
        if is_blank(text):
            raise InvalidRequest(
                "prompt is blank after trigger-word substitution (nothing visible); "
                "give a trigger word with text",
                field=f"{where}.prompt",
            )
        if spec.sample_steps > limits.max_steps:
            raise InvalidRequest(
                f"{spec.sample_steps} steps; the limit is {limits.max_steps}", field=f"{where}.sample_steps"
            )
        for name in ("width", "height"):
            if getattr(spec, name) > limits.max_side:
                raise InvalidRequest(f"must be at most {limits.max_side}", field=f"{where}.{name}")
        width, height = snap_size(spec.width, preview), snap_size(spec.height, preview)
        if width * height > limits.max_pixels:
            raise InvalidRequest(
                f"{width}x{height} is {width * height} pixels; the limit is {limits.max_pixels}",
                field=f"{where}.width",
            )
    seen: dict[tuple[str, str], int] = {}
    for i, lora in enumerate(request.loras):
        bucket = lora_bucket(lora.path)
        if bucket is not None and bucket not in limits.allowed_buckets:
            allowed = ", ".join(limits.allowed_buckets) or "none"
            raise InvalidRequest(
                f"bucket {bucket!r} is not allowed for LoRAs (allowed: {allowed}); "
                "give a key relative to the LoRA prefix instead",
                field=f"loras.{i}.path",
            )
        size = lora_key_bytes(lora.path, limits.lora_prefix)
        if size > MAX_KEY_BYTES:
            prefix = " with the LoRA prefix" if bucket is None and limits.lora_prefix.strip("/") else ""
            raise InvalidRequest(
                f"the object key is {size} bytes of UTF-8{prefix}; S3 allows {MAX_KEY_BYTES}; shorten it",
                field=f"loras.{i}.path",
            )
        # The same file twice would merge at the sum of its multipliers, past their limit.
        where = (bucket or limits.lora_bucket, lora_object_key(lora.path, limits.lora_prefix))
        if where in seen:
            raise InvalidRequest(
                f"the same LoRA as loras.{seen[where]}.path; list each LoRA once, with one "
                f"network_multiplier (-{MAX_MULTIPLIER:g} to {MAX_MULTIPLIER:g})",
                field=f"loras.{i}.path",
            )
        seen[where] = i


def _check_text_length(text: str | None, field: str, limits: Limits) -> None:
    if text is not None and len(text) > limits.max_prompt_chars:
        raise InvalidRequest(
            f"{len(text)} characters; the limit is {limits.max_prompt_chars} (CHROMA_MAX_PROMPT_CHARS)", field
        )


def _translate(exc: ValidationError) -> InvalidRequest:
    """The first pydantic error as one InvalidRequest naming the field; a few more in the message."""
    errors = exc.errors(include_url=False)
    message = _describe(errors[0])
    if len(errors) > 1:
        also = [f"{field_path(err['loc'])}: {_describe(err)}" for err in errors[1:5]]
        more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
        message += " (also: " + "; ".join(also) + more + ")"
    return InvalidRequest(one_line(message), field=field_path(errors[0]["loc"]))


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
    if kind == "finite_number" or (isinstance(value, float) and not math.isfinite(value)):
        return "must be a finite number (NaN and infinity are not allowed)"
    if kind == "model_type":  # a list item that is not an object
        example = ITEM_EXAMPLES.get(err.get("ctx", {}).get("class_name"), "{...}")
        return f"must be a JSON object like {example}, got {_kind(value)}"
    if kind == "value_error":
        return str(err["ctx"]["error"]) if "ctx" in err else err["msg"]
    return f"{err['msg']} (got {shown(value)})"


def _kind(value: Any) -> str:
    names = {list: "a list", str: "a string", type(None): "null", bool: "a boolean"}
    return names.get(
        type(value), "a number" if isinstance(value, int | float) else f"<{type(value).__name__}>"
    )
