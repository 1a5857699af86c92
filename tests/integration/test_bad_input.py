"""Bad input a producer that skips validation could send: malformed requests and LoRA files, a pickled
message, a token in a request. Each fails clearly, nothing is unpickled or echoed, the worker stays up.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from tasks.errors import InvalidLora, InvalidRequest
from tasks.names import GENERATE
from tasks.producer import submit, wait
from tests.integration.conftest import LORA_KEY, broker_is_empty, deliveries, small_request

pytestmark = pytest.mark.integration


# Limits as settings: tighter than the defaults, so requests the schema accepts can exceed them.
LIMITS = {
    "max_prompts": 4,
    "max_loras": 2,
    "max_steps": 30,
    "max_side": 2048,
    "max_pixels": 1024 * 1024,
    "max_prompt_chars": 1000,
    "max_request_bytes": 64 * 1024,
    "max_lora_bytes": 256 * 1024,
}


def limit_cases() -> list[tuple[str, dict, str, str]]:
    """(name, request, field, message part) for requests the schema accepts but ``LIMITS`` refuses."""
    many_loras = small_request()
    many_loras["loras"] = [{"path": LORA_KEY, "network_multiplier": m} for m in (1.0, 0.5, 0.2)]
    many_prompts = small_request()
    many_prompts["prompts"] = many_prompts["prompts"] * 5
    return [
        ("max_prompts", many_prompts, "prompts", "at most 4"),
        ("max_loras", many_loras, "loras", "at most 2"),
        ("max_steps", small_request(sample_steps=31), "prompts.0.sample_steps", "limit is 30"),
        ("max_side", small_request(width=4096, height=64), "prompts.0.width", "at most 2048"),
        ("max_pixels", small_request(width=2048, height=1024), "prompts.0.width", "2097152 pixels"),
        ("max_prompt_chars", small_request(prompt="a" * 1001), "prompts.0.prompt", "limit is 1000"),
        ("max_request_bytes", small_request(neg="n" * 70_000), "request", "limit of 65536 bytes"),
    ]


# Files broken below the LoRA level are refused by the download's safetensors check (storage), whose
# messages differ from the engine's parser (``tests.loras`` names the parser's).
FILE_LEVEL_MESSAGES = {
    "zero_tensors": ("holds no tensors",),
    "empty_file": ("0 bytes", "too short"),
    "truncated": ("it is truncated",),
    "pickle_renamed": ("pickled", "never loaded"),
    "header_claims_gigabytes": ("header of 8589934592 bytes",),
    "header_longer_than_file": ("4096 byte header", "truncated"),
    "tensor_claims_gigabytes": ("40000000000 bytes", "truncated"),
    "non_json_header": ("not valid JSON",),
    "header_not_object": ("not a JSON object",),
    "too_big": (f"at most {LIMITS['max_lora_bytes']} bytes",),
}


def test_malformed_requests_and_loras_fail_clearly_and_the_worker_serves_a_good_task(make_stack, s3):
    from tests import loras
    from tests.unit.test_requests_corpus import BAD, field_matches, load_bad

    stack = make_stack(**LIMITS)
    worker = stack.start_worker()
    children = worker.pool_children()

    # Requests a producer that skips validation could send: the corpus, then the limits.
    cases = [(path.stem, *load_bad(path), "") for path in BAD] + limit_cases()
    assert len(cases) >= 40
    sent = [
        (name, field, part, stack.app.send_task(GENERATE, args=[request]).id)
        for name, request, field, part in cases
    ]

    # Malformed LoRA files in the LoRA bucket: each named by a request the schema accepts.
    bad_loras = {m.name: m for m in loras.MALFORMED}
    assert len(bad_loras) >= 10
    folder = stack.folder / "bad-loras"
    folder.mkdir()
    for name, malformed in bad_loras.items():
        path = folder / f"{name}.safetensors"
        malformed.build(path)
        s3.put_object(Bucket="loras", Key=f"bad/{name}.safetensors", Body=path.read_bytes())
    s3.put_object(Bucket="loras", Key="bad/too_big.safetensors", Body=b"\0" * (LIMITS["max_lora_bytes"] + 1))
    lora_tasks = {}
    for name in [*bad_loras, "too_big"]:
        request = small_request()
        request["loras"] = [{"path": f"bad/{name}.safetensors"}]
        lora_tasks[name] = submit(request, app=stack.app, settings=stack.settings)

    for name, field, part, task_id in sent:
        with pytest.raises(InvalidRequest) as failed:
            wait(task_id, app=stack.app, timeout=60, poll_interval=0.1)
        error = failed.value
        assert type(error) is InvalidRequest and error.code == "invalid_request", name
        assert field_matches(error.field, field), f"{name}: {error.field!r} != {field!r}"
        assert error.message and part in error.message and len(error.message) < 2000, (name, error.message)
        assert stack.output_keys(s3, task_id) == [], name
    for name, task_id in lora_tasks.items():
        with pytest.raises(InvalidLora) as failed:
            wait(task_id, app=stack.app, timeout=60, poll_interval=0.1)
        error = failed.value
        assert error.code == "invalid_lora" and error.field == "loras.0.path", (name, error)
        expected = FILE_LEVEL_MESSAGES.get(name) or bad_loras[name].expect
        assert all(part in error.message for part in expected), (name, expected, error.message)
        assert stack.output_keys(s3, task_id) == [], name

    # Nothing bad reached the GPU or took the worker down: the same process serves a good task.
    result = wait(submit(small_request(), app=stack.app, settings=stack.settings), app=stack.app, timeout=60)
    assert result["delivery"] == 1 and worker.pool_children() == children
    assert "Retry in" not in worker.text()


class _MakeDirectoryWhenUnpickled:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickled_message_is_refused_and_never_unpickled(make_stack, s3, tmp_path):
    stack = make_stack()
    worker = stack.start_worker()
    marker = tmp_path / "unpickled"
    payload = _MakeDirectoryWhenUnpickled(str(marker))
    bad = stack.app.send_task(GENERATE, args=[payload], serializer="pickle")

    good = wait(submit(small_request(), app=stack.app, settings=stack.settings), app=stack.app, timeout=60)
    assert good["delivery"] == 1
    assert not marker.exists(), "a pickled message was deserialized by the worker"
    assert deliveries(stack, bad.id) == 0  # the task body never ran
    assert stack.output_keys(s3, bad.id) == []
    assert "ContentDisallowed" in worker.text() or "Refusing to deserialize" in worker.text()
    time.sleep(0.5)
    assert broker_is_empty(stack)  # refused for good, not requeued


def test_a_token_sent_in_a_request_is_refused_without_being_echoed(make_stack, s3):
    stack = make_stack()
    worker = stack.start_worker()
    token = f"hf_{uuid.uuid4().hex}"
    request = {**small_request(), "hf_token": token}
    task_id = stack.app.send_task(GENERATE, args=[request]).id  # a producer that skips validation
    with pytest.raises(InvalidRequest) as failed:
        wait(task_id, app=stack.app, timeout=60, poll_interval=0.1)
    assert failed.value.field == "hf_token"
    assert token not in json.dumps(failed.value.to_dict())
    assert token not in worker.text()
