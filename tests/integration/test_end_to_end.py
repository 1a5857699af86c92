"""The product path: producer -> Redis -> a real worker process -> S3, and the result it leaves."""

from __future__ import annotations

import hashlib
import io
import json
import uuid

import pytest
from PIL import Image

from tasks.errors import InvalidRequest, LoraNotFound
from tasks.names import GENERATE
from tasks.producer import submit, wait
from tests.integration.conftest import EXAMPLE, LORA_KEY, small_request
from tests.services import SECRET_KEY

pytestmark = pytest.mark.integration

RESULT_FIELDS = {
    "task_id", "status", "request", "images", "loras", "components", "quantization", "dtype",
    "negative_prompt", "variant",
    "versions", "timings", "worker", "delivery", "result_key", "created_at",
}  # fmt: skip
IMAGE_FIELDS = {
    "index", "prompt", "neg", "width", "height", "sample_steps", "guidance_scale", "seed", "key", "uri",
    "sha256", "bytes", "content_type",
}  # fmt: skip


def test_reference_example_request_end_to_end(make_stack, s3):
    stack = make_stack()
    stack.start_worker()
    progress = []
    task_id = submit(EXAMPLE, app=stack.app, settings=stack.settings)
    result = wait(task_id, app=stack.app, on_progress=progress.append, timeout=240, poll_interval=0.2)

    assert stack.output_keys(s3, task_id) == ["0.png", "result.json"]
    stored = json.loads(s3.get_object(Bucket="outputs", Key=result["result_key"])["Body"].read())
    assert stored == result
    assert set(result) >= RESULT_FIELDS
    image = result["images"][0]
    assert set(image) >= IMAGE_FIELDS
    assert image["prompt"] == "sks a photo of a person"
    assert (image["width"], image["height"], image["seed"], image["sample_steps"]) == (1024, 1024, 42, 25)
    body = s3.get_object(Bucket="outputs", Key=image["key"])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == image["sha256"] and len(body) == image["bytes"]
    png = Image.open(io.BytesIO(body))
    assert png.size == (1024, 1024) and png.format == "PNG"
    assert json.loads(png.text["parameters"])["seed"] == 42

    (lora,) = result["loras"]
    assert lora["uri"] == f"s3://loras/{LORA_KEY}" and lora["etag"]
    assert lora["layers_merged"] == 20 and len(lora["sha256"]) == 64
    assert result["quantization"] == "float8" and result["variant"]["cache_hit"] is False
    assert result["versions"]["torch"] and result["worker"]["host"]
    for stage in ("download", "variant_build", "encode", "denoise", "decode", "upload"):
        assert result["timings"][stage] >= 0, stage
    steps = [p["step"] for p in progress if p["stage"] == "denoise"]
    assert steps and max(steps) <= 25 and all(p["prompts"] == 1 for p in progress)
    logs = "".join(worker.text() for worker in stack.workers)
    assert SECRET_KEY not in json.dumps(result) and SECRET_KEY not in logs


def test_redelivered_task_overwrites_its_own_keys_and_hits_the_cache(make_stack, s3):
    stack = make_stack()
    stack.start_worker()
    task_id = str(uuid.uuid4())
    request = small_request()
    request["prompts"].append({"prompt": "a dog", "width": 96, "height": 64, "sample_steps": 2})
    first = wait(
        submit(request, app=stack.app, settings=stack.settings, task_id=task_id), app=stack.app, timeout=60
    )
    stack.app.AsyncResult(task_id).forget()  # so that wait() sees the second run, not the first
    again = wait(
        submit(request, app=stack.app, settings=stack.settings, task_id=task_id), app=stack.app, timeout=60
    )
    assert stack.output_keys(s3, task_id) == ["0.png", "1.png", "result.json"]
    assert [i["sha256"] for i in first["images"]] == [i["sha256"] for i in again["images"]]
    assert again["variant"]["cache_hit"] is True and "variant_hit" in again["timings"]
    assert first["images"][1]["seed"] == 43  # omitted seed: 42 + index


def test_bad_requests_refused_before_enqueue_and_again_by_the_worker(make_stack, s3, redis_server):
    import redis

    stack = make_stack()
    bad = small_request(width=5000)
    with pytest.raises(InvalidRequest) as refused:
        submit(bad, app=stack.app, settings=stack.settings)
    assert refused.value.field == "prompts.0.width"
    broker = redis.Redis.from_url(stack.settings.broker_url)
    assert broker.llen(stack.settings.queue) == 0

    stack.start_worker()
    # A producer that skips validation: the worker refuses before any GPU work.
    direct = stack.app.send_task(GENERATE, args=[bad], queue=stack.settings.queue)
    with pytest.raises(InvalidRequest) as failed:
        wait(direct.id, app=stack.app, timeout=60)
    assert failed.value.field == "prompts.0.width"
    assert stack.output_keys(s3, direct.id) == []
    # The worker is still up and serves the next good task.
    good = wait(submit(small_request(), app=stack.app, settings=stack.settings), app=stack.app, timeout=60)
    assert good["status"] == "succeeded"


def test_missing_lora_fails_at_once_naming_the_key(make_stack, s3):
    stack = make_stack()
    stack.start_worker()
    request = small_request()
    request["loras"] = [{"path": "nobody/missing.safetensors"}]
    task_id = submit(request, app=stack.app, settings=stack.settings)
    with pytest.raises(LoraNotFound) as failed:
        wait(task_id, app=stack.app, timeout=60)
    assert failed.value.field == "loras.0.path"
    assert "nobody/missing.safetensors" in str(failed.value)
    assert stack.output_keys(s3, task_id) == []
    assert "Retry in" not in stack.workers[0].text()
