"""Hostile requests through ``validate_request``: each ends as one InvalidRequest naming its field,
in bounded time and memory, or as a correct result. No services."""

from __future__ import annotations

import json
import random
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from storage.keys import lora_location
from tasks.errors import InvalidRequest
from tasks.keys import MAX_KEY_BYTES
from tasks.producer import submit
from tasks.schemas import Limits, effective_prompt, effective_prompt_length, resolve_prompts, validate_request
from tasks.settings import Settings

MIB = 2**20


def request(**prompt: Any) -> dict[str, Any]:
    return {"model": "chroma", "prompts": [{"prompt": "a photo", **prompt}]}


def with_lora(path: str) -> dict[str, Any]:
    return {**request(), "loras": [{"path": path}]}


def refused(data: Any, limits: Limits | None = None) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        validate_request(data, limits)
    return caught.value


def peak_bytes(call: Callable[[], Any]) -> int:
    """The most memory Python held at once while ``call`` ran (its result or error dropped)."""
    tracemalloc.start()
    try:
        call()
    except InvalidRequest:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


# -- the trigger word ---------------------------------------------------------------------------


def test_trigger_expansion_is_counted_before_it_is_built() -> None:
    # 100k characters x 1,000 placeholders would be a 100 MB string; the count needs none of it.
    limits = Limits(max_prompt_chars=200_000, max_request_bytes=2 * MIB)
    data = {"model": "chroma", "trigger_word": "x" * 100_000, "prompts": [{"prompt": "[trigger] " * 1000}]}
    error = refused(data, limits)
    assert error.field == "prompts.0.prompt"
    assert "100001000 characters after trigger-word substitution" in error.message
    assert peak_bytes(lambda: validate_request(data, limits)) < 10 * MIB


def test_the_reported_bomb_is_refused_at_once_with_the_default_limits() -> None:
    text = json.dumps(
        {"model": "chroma", "trigger_word": "x" * 131_000, "prompts": [{"prompt": "[trigger]" * 14_500}]}
    )
    assert 250_000 < len(text) < 262_144
    error = refused(text)
    assert error.field == "trigger_word"
    assert "131000 characters; the limit is 4000" in error.message
    assert peak_bytes(lambda: validate_request(text)) < 10 * MIB


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"model": "chroma", "trigger_word": "x" * 4001, "prompts": [{"prompt": "a"}]}, "trigger_word"),
        (request(trigger_word="x" * 4001), "prompts.0.trigger_word"),
        (request(neg="x" * 4001), "prompts.0.neg"),
    ],
    ids=["request trigger", "prompt trigger", "neg"],
)
def test_texts_beside_the_prompt_are_bounded_too(data: dict[str, Any], field: str) -> None:
    assert refused(data).field == field


@pytest.mark.parametrize("trigger", ["[trigger]", "[trigger][trigger]", "[trig", "ger]", "", "sks", "é" * 9])
def test_counted_length_is_the_built_length(trigger: str) -> None:
    pieces = ["[trigger]", "[trigger", "trigger]", "[", "]", "a", " ", "[[trigger]]", "é"]
    rng = random.Random(trigger)
    for _ in range(50):
        prompt = "x" + "".join(rng.choice(pieces) for _ in range(rng.randrange(20)))
        req = validate_request({"model": "chroma", "trigger_word": trigger, "prompts": [{"prompt": prompt}]})
        spec = req.prompts[0]
        assert effective_prompt_length(req, spec) == len(effective_prompt(req, spec))


def test_a_trigger_word_holding_the_placeholder_is_replaced_once() -> None:
    req = validate_request(
        {"model": "chroma", "trigger_word": "[trigger]!", "prompts": [{"prompt": "[trigger] x"}]}
    )
    assert resolve_prompts(req)[0].prompt == "[trigger]! x"


def test_expansion_exactly_at_the_limit_is_accepted() -> None:
    data = {"model": "chroma", "trigger_word": "x" * 400, "prompts": [{"prompt": "[trigger]" * 10}]}
    assert len(resolve_prompts(validate_request(data))[0].prompt) == 4000
    data["prompts"][0]["prompt"] += "!"
    assert refused(data).field == "prompts.0.prompt"


# -- LoRA paths: S3 key bytes and characters ---------------------------------------------------


def test_key_length_counts_utf8_bytes() -> None:
    path = "\U0001f600" * 254 + ".safetensors"  # 266 characters, 1,028 bytes
    error = refused(with_lora(path))
    assert error.field == "loras.0.path"
    assert "1028 bytes" in error.message
    validate_request(with_lora("\U0001f600" * 253 + ".safetensors"))  # 1,024 bytes: S3's limit


def test_key_length_counts_the_lora_prefix() -> None:
    path = "a" * (MAX_KEY_BYTES - len(".safetensors")) + ".safetensors"
    validate_request(with_lora(path), Limits(lora_prefix=""))
    error = refused(with_lora(path), Settings(lora_prefix="/team/").limits)  # the key is team/<path>
    assert error.field == "loras.0.path" and "1029 bytes of UTF-8 with the LoRA prefix" in error.message
    # An s3:// path names its own key: the prefix does not apply.
    validate_request(with_lora("s3://loras/" + path), Limits(lora_prefix="team", allowed_buckets=("loras",)))


def test_storage_keeps_its_own_key_guard() -> None:
    path = "a" * 1020 + ".safetensors"
    with pytest.raises(ValueError, match="bytes; S3 allows at most 1024"):
        lora_location(path, lora_bucket="loras", lora_prefix="")


@pytest.mark.parametrize(
    "char",
    [
        "\x00",
        "\t",
        "\x7f",
        "\x85",
        "\x9f",
        "\u2028",
        "\u2029",
        "\u202e",
        "\u200b",
        "\ufeff",
        "\ufffe",
        "\ud800",
    ],
    ids=lambda c: f"U+{ord(c):04X}",
)
def test_lora_path_refuses_characters_that_keys_and_logs_mangle(char: str) -> None:
    error = refused(with_lora(f"job{char}/lora.safetensors"))
    assert error.field == "loras.0.path"
    assert char not in str(error)


def test_lora_path_keeps_ordinary_unicode() -> None:
    for path in (
        "café/lora.safetensors",
        "日本/ロラ.safetensors",
        "run:v2/a b.safetensors",
        "\U0001f600.safetensors",
    ):
        validate_request(with_lora(path))


@pytest.mark.parametrize(
    "path, words",
    [
        ("s3://loras", "names a bucket but no key"),
        ("s3://loras/", "names a bucket but no key"),
        ("S3://loras/a.safetensors", "'s3://' (lowercase)"),
        ("s3://LORAS/a.safetensors", "'LORAS' is not a bucket name"),
        ("s3://loras//a.safetensors", "'//' after its bucket"),
        ("https://example.com/a.safetensors", "other URL schemes are not fetched"),
    ],
)
def test_a_lora_url_that_is_not_s3_bucket_key_says_what_is_wrong(path: str, words: str) -> None:
    error = refused(with_lora(path), Limits(allowed_buckets=("loras",)))
    assert error.field == "loras.0.path" and words in error.message


@pytest.mark.parametrize(
    "data, field, words",
    [
        ({"model": "chroma", "prompts": ["a photo"]}, "prompts.0", '{"prompt": "a photo"}, got a string'),
        ({"model": "chroma", "prompts": [None]}, "prompts.0", '{"prompt": "a photo"}, got null'),
        ({**request(), "loras": ["x.safetensors"]}, "loras.0", '{"path": "job/lora.safetensors"}'),
    ],
)
def test_a_list_item_that_is_not_an_object_shows_what_one_looks_like(data, field, words) -> None:
    error = refused(data)
    assert error.field == field and words in error.message and "Spec" not in error.message


def test_a_lone_surrogate_from_a_json_escape_names_its_field() -> None:
    error = refused('{"model": "chroma", "prompts": [{"prompt": "a\\ud800"}]}')
    assert error.field == "prompts.0.prompt" and "lone surrogate" in error.message
    assert refused(
        '{"model": "chroma", "prompts": [{"prompt": "a"}], "loras": [{"path": "\\udfff.safetensors"}]}'
    )


# -- what the user typed, echoed safely --------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {**request(), "evil\n\x1b[2J\u2028name": 1},
        {"model": "chr\x1b]0;owned\x07oma\n", "prompts": [{"prompt": "a"}]},
        {"model": "x" * 100_000, "prompts": [{"prompt": "a"}]},
        request(width="1\n2" * 10_000),
        {**request(), "k" * 100_000: 1},
    ],
    ids=["field name", "model", "long model", "value", "long field name"],
)
def test_echoed_text_is_one_escaped_short_line(data: dict[str, Any]) -> None:
    error = refused(data)
    text = str(error)
    assert text.isprintable(), text
    assert len(text) < 400


def test_a_look_alike_model_name_is_shown_escaped() -> None:
    error = refused({"model": "chr\u043ema", "prompts": [{"prompt": "a"}]})  # Cyrillic o
    assert error.field == "model" and "chr\\u043ema" in error.message


def test_a_field_name_that_is_not_plain_is_quoted_in_the_path() -> None:
    error = refused({**request(), "a.b\nc": 1})
    assert error.field == "'a.b\\nc'"


# -- JSON text ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"model": "chroma", "model": "chroma", "prompts": [{"prompt": "a"}]}', "model"),
        ('{"model": "chroma", "prompts": [{"prompt": "a", "seed": 1, "seed": 2}]}', "prompts.0.seed"),
        (
            '{"model": "chroma", "prompts": [{"prompt": "a"}], "loras": [{"path": "a", "path": "b"}]}',
            "loras.0.path",
        ),
    ],
)
def test_a_key_given_twice_is_refused_naming_it(text: str, field: str) -> None:
    error = refused(text)
    assert error.field == field and "appears twice" in error.message


def test_syntax_errors_keep_their_location() -> None:
    error = refused('{\n  "model": "chroma"\n  "prompts": []\n}')
    assert (error.field, error.message) == (
        "request",
        "not valid JSON: Expecting ',' delimiter at line 3 column 3",
    )


@pytest.mark.parametrize(
    "data",
    [
        "\ufeff" + json.dumps(request()),
        b"\xef\xbb\xbf" + json.dumps(request()).encode(),
        json.dumps(request(prompt="caf\u00e9")).encode(),
        bytearray(json.dumps(request()).encode()),
    ],
    ids=["str with BOM", "bytes with BOM", "UTF-8 bytes", "bytearray"],
)
def test_text_forms_are_read_alike(data: str | bytes) -> None:
    assert validate_request(data).prompts[0].prompt.startswith(("a photo", "café"))


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b'{"model": "chroma\xff"}', "not UTF-8 text: invalid start byte (byte 0xff at offset 17)"),
        ('{"model": "chroma"}'.encode("utf-16"), "is UTF-16 text"),
        ("\ud800" * 10, "not valid JSON"),
        ("", "is empty"),
        (b" \n", "is empty"),
    ],
    ids=["invalid UTF-8", "UTF-16", "lone surrogates", "empty", "blank bytes"],
)
def test_unreadable_text_names_the_request(data: str | bytes, words: str) -> None:
    error = refused(data)
    assert error.field == "request" and words in error.message


def test_size_is_counted_in_utf8_bytes_of_a_str() -> None:
    text = json.dumps(request(prompt="\u00e9" * 1500), ensure_ascii=False)  # 1.5k characters, 3k bytes
    assert refused(text, Limits(max_request_bytes=2000)).field == "request"
    validate_request(text, Limits(max_request_bytes=4000))


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"model": "chroma", "prompts": [{"prompt": "a", "seed": ' + "9" * 5000 + "}]}", "prompts.0.seed"),
        ('{"model": "chroma", "prompts": [{"prompt": "a", "width": -' + "1" * 200 + "}]}", "prompts.0.width"),
        ('{"model": "chroma", "prompts": [{"prompt": "a", "width": 1e400}]}', "prompts.0.width"),
        (
            '{"model": "chroma", "prompts": [{"prompt": "a", "guidance_scale": -1e400}]}',
            "prompts.0.guidance_scale",
        ),
        ('{"model": "chroma", "prompts": [{"prompt": "a", "sample_steps": 25.0}]}', "prompts.0.sample_steps"),
    ],
    ids=["5000-digit seed", "200-digit width", "1e400", "-1e400", "float steps"],
)
def test_extreme_numbers_name_their_field(text: str, field: str) -> None:
    error = refused(text)
    assert error.field == field
    assert len(error.message) < 300


def test_negative_zero_is_zero() -> None:
    req = validate_request(
        '{"model": "chroma", "prompts": [{"prompt": "a", "guidance_scale": -0.0}], '
        '"loras": [{"path": "a.safetensors", "network_multiplier": -0.0}]}'
    )
    assert str(req.prompts[0].guidance_scale) == "0.0" and str(req.loras[0].network_multiplier) == "0.0"


@pytest.mark.parametrize(
    "text",
    [
        "[" * 200_000 + "]" * 10,
        '{"a":' * 100_000,
        '{"model": "chroma", "prompts": [' + "[" * 20 + "]" * 20 + "]}",
    ],
    ids=["array bomb", "object bomb", "nested prompts"],
)
def test_nesting_is_refused_cleanly(text: str) -> None:
    error = refused(text, Limits(max_request_bytes=2 * MIB))
    assert error.field is not None and error.field.split(".")[0] in ("request", "prompts")


# -- Python objects (the producer API) ---------------------------------------------------------


def cyclic() -> dict[str, Any]:
    data = request()
    data["prompts"][0]["self"] = data
    return data


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: {**request(), (1, 2): "x"}, "request"),
        (lambda: {"model": "chroma", "prompts": [{"prompt": "a", 3: 1}]}, "prompts.0"),
        (lambda: request(seed=10**10_000), "prompts.0.seed"),
        (cyclic, "prompts.0.self"),
        (lambda: {**request(), "loras": {"a.safetensors"}}, "loras"),
        (lambda: request(prompt=b"bytes"), "prompts.0.prompt"),
        (lambda: request(width=object()), "prompts.0.width"),
    ],
    ids=["tuple key", "int key", "huge int", "cycle", "set", "bytes", "object"],
)
def test_python_values_json_cannot_hold_name_their_field(make: Callable[[], Any], field: str) -> None:
    error = refused(make())
    assert error.field is not None and error.field.startswith(field)
    assert str(error).isprintable()


def test_a_huge_dict_is_measured_without_being_serialized() -> None:
    data = request(prompt="a" * 50_000_000)
    error = refused(data)
    assert error.field == "request" and "larger than the limit of 262144 bytes" in error.message
    assert peak_bytes(lambda: validate_request(data)) < MIB


def test_a_long_list_is_refused_before_the_schema_reports_each_item() -> None:
    text = '{"model": "chroma", "prompts": [{"prompt": "a"}], "loras": [' + ",".join(["1"] * 120_000) + "]}"
    assert refused(text).field == "loras"
    assert peak_bytes(lambda: validate_request(text)) < 30 * MIB  # the schema's error list was 126 MB


def test_submit_refuses_an_unsafe_task_id_before_any_connection() -> None:
    settings = Settings(broker_url="redis://127.0.0.1:9/0", result_backend="redis://127.0.0.1:9/1")
    for task_id in ("../x", "", "a/b", "a" * 129, "id\n", "."):
        with pytest.raises(InvalidRequest) as caught:
            submit(request(), settings=settings, task_id=task_id)
        assert caught.value.field == "task_id", task_id


@pytest.mark.parametrize("prefix", ["a//b", "..", "x/./y"])
def test_a_lora_prefix_the_worker_would_refuse_does_not_break_validation(prefix: str) -> None:
    # The prefix is a setting: validation counts it and goes on; the worker names it where it builds keys.
    validate_request(with_lora("job/lora.safetensors"), Limits(lora_prefix=prefix))
    with pytest.raises(ValueError, match="prefix"):
        lora_location("job/lora.safetensors", lora_bucket="loras", lora_prefix=prefix)


@pytest.mark.parametrize("preview, default", [(True, False), (None, True)])
def test_the_pixel_limit_counts_the_size_a_preview_renders(preview, default):
    """Preview sizes floor to 16, not 32: 1040x1024 renders 1040x1024 there, over 1024x1024."""
    limits = Limits(max_pixels=1024 * 1024, preview=default)
    request = {
        "model": "chroma",
        "preview": preview,
        "prompts": [{"prompt": "a", "width": 1040, "height": 1024}],
    }
    with pytest.raises(InvalidRequest) as failed:
        validate_request(request, limits)
    assert failed.value.field == "prompts.0.width" and "1040x1024" in failed.value.message
    validate_request({**request, "preview": False}, limits)  # the fused path renders 1024x1024
