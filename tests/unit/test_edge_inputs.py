"""Edge inputs found in review: each once crashed, misreported, or slipped through."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from celery.exceptions import TimeLimitExceeded as CeleryTimeLimit
from safetensors.torch import save_file

from tasks.errors import InvalidLora, InvalidRequest
from tasks.producer import task_error
from tasks.schemas import Limits, resolve_prompts, validate_request
from worker.lora import parse_lora
from worker.tiny import TINY

REPO = Path(__file__).resolve().parents[2]


def test_deeply_nested_json_is_an_invalid_request_not_a_crash():
    with pytest.raises(InvalidRequest) as err:
        validate_request("[" * 50000 + "]" * 50000)
    assert err.value.field == "request"


def test_request_size_limit_counts_bytes():
    prompt = "\U0001f600" * 70000  # 280 kB of UTF-8 in 70k characters
    text = json.dumps({"model": "chroma", "prompts": [{"prompt": prompt}]}, ensure_ascii=False)
    with pytest.raises(InvalidRequest, match="bytes") as err:
        validate_request(text, Limits(max_prompt_chars=10**6))
    assert err.value.field == "request"


@pytest.mark.parametrize(
    "request_,expected",
    [
        (
            {"trigger_word": "sks", "prompts": [{"prompt": "[trigger] a photo", "trigger_word": ""}]},
            "sks a photo",
        ),
        ({"trigger_word": "", "prompts": [{"prompt": "[trigger] a photo"}]}, "[trigger] a photo"),
        ({"prompts": [{"prompt": "[trigger] x", "trigger_word": "ohwx"}]}, "ohwx x"),
    ],
)
def test_trigger_rule_is_the_references_and_the_cli_shows_it(request_, expected, tmp_path):
    request = validate_request({"model": "chroma", **request_})
    assert resolve_prompts(request)[0].prompt == expected
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"model": "chroma", **request_}))
    shown = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "validate", str(path)], capture_output=True, text=True, cwd=REPO
    )
    assert shown.returncode == 0 and repr(expected) in shown.stdout


def test_prompt_blank_or_too_long_after_substitution_is_refused():
    with pytest.raises(InvalidRequest, match="blank") as err:
        validate_request({"model": "chroma", "prompts": [{"prompt": "[trigger]", "trigger_word": " "}]})
    assert err.value.field == "prompts.0.prompt"
    long = {"model": "chroma", "prompts": [{"prompt": "[trigger]" * 400, "trigger_word": "x" * 600}]}
    with pytest.raises(InvalidRequest, match="after trigger-word substitution") as err:
        validate_request(long)
    assert err.value.field == "prompts.0.prompt"


def test_cli_reads_a_request_saved_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"model": "chroma", "prompts": [{"prompt": "a"}]}).encode())
    done = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "validate", str(path)], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stderr


def test_celery_hard_time_limit_maps_to_time_limit_code():
    error = task_error("t1", CeleryTimeLimit(3600.0))
    assert error.code == "time_limit" and error.http_status == 504


def test_peft_keys_with_an_adapter_name_are_read(tmp_path):
    path = tmp_path / "peft.safetensors"
    rows, cols = 3 * TINY.hidden_size, TINY.hidden_size
    save_file(
        {
            "base_model.model.transformer_blocks.0.attn.to_q.lora_A.default.weight": torch.randn(4, cols),
            "base_model.model.transformer_blocks.0.attn.to_q.lora_B.default.weight": torch.randn(
                TINY.hidden_size, 4
            ),
            "base_model.model.double_blocks.1.img_attn.qkv.lora_A.default.weight": torch.randn(4, cols),
            "base_model.model.double_blocks.1.img_attn.qkv.lora_B.default.weight": torch.randn(rows, 4),
        },
        str(path),
    )
    parsed = parse_lora(path, TINY, field="loras.0.path")
    assert parsed.num_layers == 2


def test_deeply_nested_safetensors_header_is_invalid_lora(tmp_path):
    from storage.lora_cache import validate_safetensors_header

    header = ("[" * 5000 + "]" * 5000).encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(InvalidLora) as err:
        validate_safetensors_header(path, field="loras.0.path")
    assert err.value.field == "loras.0.path"


@pytest.mark.parametrize("chars, kept", [(1, "ascii"), (4000, "utf-8"), (20_000, None)])
def test_a_jpeg_carries_its_parameters_where_its_comment_can_hold_them(chars, kept):
    # A JPEG comment holds 65533 bytes; 4000 emoji escaped for ASCII JSON take 48,000 of them.
    import io

    from PIL import Image

    from tasks.schemas import ResolvedPrompt
    from worker.results import effective_parameters, encode_image

    prompt = ResolvedPrompt(
        0, "\N{GRINNING FACE}" * chars, "\N{GRINNING FACE}" * min(chars, 4000), 8, 8, 1, 4.0, 7
    )
    data, content_type, ext = encode_image(Image.new("RGB", (8, 8)), "jpeg", prompt, {"model": "chroma"})
    image = Image.open(io.BytesIO(data))
    assert (content_type, ext, image.format, image.size) == ("image/jpeg", "jpg", "JPEG", (8, 8))
    comment = image.info.get("comment")
    if kept is None:
        assert comment is None  # result.json still has them
        return
    assert comment.isascii() == (kept == "ascii")
    assert json.loads(comment.decode()) == {**effective_parameters(prompt), "model": "chroma"}
