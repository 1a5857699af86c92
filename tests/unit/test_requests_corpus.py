"""A corpus of real request files: every good one is accepted, every bad one names its field.

``tests/data/requests/good/*.json`` are requests; ``bad/*.json`` hold ``{"request": ...,
"field": "prompts.0.width"}``. NaN and Infinity appear as raw JSON tokens, as a client would send
them. Limits are the defaults, with the default LoRA bucket ``loras`` allowed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tasks.errors import InvalidRequest
from tasks.schemas import Limits, resolve_prompts, validate_request

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "data" / "requests"
GOOD = sorted((CORPUS / "good").glob("*.json"))
BAD = sorted((CORPUS / "bad").glob("*.json"))
LIMITS = Limits(allowed_buckets=("loras",), lora_bucket="loras")
CLI_SAMPLE = [
    "width_string",
    "guidance_nan",
    "prompts_17",
    "path_nested_parent",
    "url_s3_other_bucket",
    "hf_token_given",
    "request_list",
    "unknown_field_with_newline",
    "path_line_separator",
    "model_escape_sequence",
    "trigger_expands_past_limit",
]


def load_bad(path: Path) -> tuple[Any, str]:
    case = json.loads(path.read_text(encoding="utf-8"))
    assert set(case) == {"request", "field"}, f"{path.name}: a bad case holds request and field only"
    return case["request"], case["field"]


def field_matches(actual: str | None, expected: str) -> bool:
    return actual is not None and (actual == expected or actual.startswith(expected + "."))


def test_corpus_is_big_enough() -> None:
    assert len(GOOD) >= 30
    assert len(BAD) >= 115


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.stem)
def test_good_request_is_accepted_and_survives_the_round_trip(path: Path) -> None:
    request = validate_request(path.read_text(encoding="utf-8"), LIMITS)
    # What the producer sends is what the worker validates again.
    sent = request.model_dump(mode="json", exclude_none=True)
    assert validate_request(json.loads(json.dumps(sent)), LIMITS) == request
    for prompt in resolve_prompts(request):
        assert prompt.width % 32 == 0 and prompt.height % 32 == 0
        assert 0 <= prompt.seed <= 2**63 - 1


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_request_is_rejected_naming_the_field(path: Path) -> None:
    request, field = load_bad(path)
    with pytest.raises(InvalidRequest) as caught:
        validate_request(request, LIMITS)
    assert field_matches(caught.value.field, field), f"{caught.value.field!r} != {field!r}: {caught.value}"
    assert caught.value.message


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_request_is_rejected_as_json_text(path: Path) -> None:
    request, field = load_bad(path)
    with pytest.raises(InvalidRequest) as caught:
        validate_request(json.dumps(request), LIMITS)
    assert field_matches(caught.value.field, field)


def test_request_over_the_size_limit_names_the_request() -> None:
    huge = {"model": "chroma", "prompts": [{"prompt": "a" * (LIMITS.max_request_bytes + 1)}]}
    for form in (huge, json.dumps(huge)):
        with pytest.raises(InvalidRequest) as caught:
            validate_request(form, LIMITS)
        assert caught.value.field == "request"


def test_width_1000_snaps_to_992() -> None:
    request = validate_request((CORPUS / "good" / "width_1000_snaps_to_992.json").read_text(), LIMITS)
    (prompt,) = resolve_prompts(request)
    assert (prompt.width, prompt.height) == (992, 992)


def test_trigger_words_apply_per_prompt() -> None:
    request = validate_request((CORPUS / "good" / "per_prompt_trigger_word.json").read_text(), LIMITS)
    assert [p.prompt for p in resolve_prompts(request)] == ["ohwx in a hat", "sks smiling"]


def test_cli_rejects_a_sample_with_the_field(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHROMA_")}
    env["PYTHONPATH"] = str(REPO)
    for name in CLI_SAMPLE:
        request, field = load_bad(CORPUS / "bad" / f"{name}.json")
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(request), encoding="utf-8")
        out = subprocess.run(
            [sys.executable, "-m", "tasks.cli", "validate", str(path)],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=60,
        )
        assert out.returncode == 2, (name, out.stdout, out.stderr)
        assert out.stderr.startswith(f"error: {field}"), (name, out.stderr)
        assert out.stderr.count("\n") == 1, (name, out.stderr)
        assert out.stderr[:-1].isprintable(), (name, out.stderr)  # what the user sent is escaped
