"""storage/'s keys: where a LoRA path points, output and result keys, what is refused."""

from __future__ import annotations

import uuid

import pytest

from storage import lora_location, output_key, result_key, uri


@pytest.mark.parametrize(
    ("path", "prefix", "expected"),
    [
        ("job/lora.safetensors", "", ("loras", "job/lora.safetensors")),
        ("job/lora.safetensors", "/team/loras/", ("loras", "team/loras/job/lora.safetensors")),
        ("s3://shared-loras/x/y.safetensors", "team", ("shared-loras", "x/y.safetensors")),
        ("run:v2/lora.safetensors", "team", ("loras", "team/run:v2/lora.safetensors")),  # a colon in a key
        ("job/step:1000.safetensors", "", ("loras", "job/step:1000.safetensors")),
    ],
)
def test_lora_location(path: str, prefix: str, expected: tuple[str, str]) -> None:
    assert lora_location(path, lora_bucket="loras", lora_prefix=prefix) == expected


@pytest.mark.parametrize(
    "path",
    [
        "../secret.safetensors",
        "job/../../etc.safetensors",
        "/abs/lora.safetensors",
        "job//lora.safetensors",
        "https://example.com/lora.safetensors",
        "HTTPS://example.com/lora.safetensors",
        "file:/etc/lora.safetensors",
        "C:/loras/x.safetensors",
        "C:x.safetensors",
        "s3:loras/x.safetensors",
        "gs://loras/x.safetensors",
        "s3://loras/../x.safetensors",
        "job/model.ckpt",
        "job\\lora.safetensors",
    ],
)
def test_lora_location_rejects_traversal_and_other_schemes(path: str) -> None:
    with pytest.raises(ValueError):
        lora_location(path, lora_bucket="loras", lora_prefix="p")


def test_lora_location_rechecks_the_allow_list() -> None:
    path = "s3://other-bucket/x.safetensors"
    with pytest.raises(ValueError, match="not allowed"):
        lora_location(path, lora_bucket="loras", lora_prefix="", allowed_buckets=("shared",))
    located = lora_location(path, lora_bucket="loras", lora_prefix="", allowed_buckets=("other-bucket",))
    assert located == ("other-bucket", "x.safetensors")


def test_output_and_result_keys() -> None:
    task_id = str(uuid.UUID(int=7))
    assert output_key("generations", task_id, 3, "png") == f"generations/{task_id}/3.png"
    assert output_key("/a/b/", task_id, 0, "webp") == f"a/b/{task_id}/0.webp"
    assert output_key("", task_id, 0, "jpeg") == f"{task_id}/0.jpeg"
    assert result_key("generations", task_id) == f"generations/{task_id}/result.json"
    assert uri("outputs", "generations/x/result.json") == "s3://outputs/generations/x/result.json"


@pytest.mark.parametrize("task_id", ["", ".", "..", "a..b", "a/b", "a b", "ä", "x" * 129, "id\n"])
def test_unsafe_task_ids_are_rejected(task_id: str) -> None:
    with pytest.raises(ValueError, match="task id"):
        output_key("generations", task_id, 0, "png")
    with pytest.raises(ValueError, match="task id"):
        result_key("generations", task_id)


@pytest.mark.parametrize(("index", "ext"), [(-1, "png"), (True, "png"), (0, "../x"), (0, "PNG"), (0, "")])
def test_output_key_rejects_bad_index_or_extension(index: int, ext: str) -> None:
    with pytest.raises(ValueError):
        output_key("generations", "task-1", index, ext)


def test_prefix_with_traversal_is_rejected() -> None:
    with pytest.raises(ValueError, match="prefix"):
        result_key("generations/../other", "task-1")
