"""The whole system on one machine, on an embedded default: no GPU, no downloads, no Docker.

Writes a tiny random Chroma and an ai-toolkit-format LoRA, starts a private Redis and an S3
endpoint (moto's server over HTTP), uploads the LoRA, starts a real ``celery -A worker worker``
process, submits the reference example request through the producer API, follows its progress
and prints where the image and result.json went (then copies them to ./demo-output).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import boto3

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.app import make_celery  # noqa: E402
from tasks.producer import submit, wait  # noqa: E402
from tasks.settings import Settings  # noqa: E402
from tests.s3server import start_s3_server  # noqa: E402
from tests.services import ACCESS_KEY, SECRET_KEY, RedisServer, WorkerProcess, worker_env  # noqa: E402

EXAMPLE = REPO / "examples" / "request.json"
LORA_KEY = "my_lora_job/my_lora.safetensors"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "request", nargs="?", type=Path, default=EXAMPLE, help="request JSON (default: example)"
    )
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="where to copy the outputs")
    args = parser.parse_args()

    from worker.tiny import write_lora, write_tiny_chroma

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the S3 server's access log
    work = Path(tempfile.mkdtemp(prefix="chroma-demo-"))
    print(f"[1/5] tiny random Chroma + LoRA in {work}")
    sources = write_tiny_chroma(work / "model")
    lora = write_lora(work / "lora.safetensors")

    print("[2/5] Redis and S3 (moto over HTTP) on free local ports")
    redis_server = RedisServer(work / "redis")
    endpoint, stop_s3 = start_s3_server()
    s3 = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
    )  # fmt: skip
    for bucket in ("loras", "outputs"):
        s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket="loras", Key=LORA_KEY, Body=lora.read_bytes())

    values = {
        "broker_url": f"{redis_server.url}/0",
        "result_backend": f"{redis_server.url}/1",
        "s3_endpoint_url": endpoint,
        "lora_cache_dir": str(work / "lora-cache"),
        "transformer": sources.transformer,
        "text_encoder": sources.text_encoder,
        "tokenizer": sources.tokenizer,
        "vae": sources.vae,
    }
    settings = Settings(**values)
    env = worker_env({f"CHROMA_{k.upper()}": v for k, v in values.items()})
    env.pop("OMP_NUM_THREADS", None)  # one worker: let it use every core
    command = f"celery -A worker worker --pool prefork -Q {settings.queue}"
    print(f"[3/5] worker: {command} (log: {work}/worker.log)")
    worker = WorkerProcess(env, settings.queue, work / "worker.log", "demo")
    try:
        worker.wait_ready()
        app = make_celery(settings)
        request = json.loads(args.request.read_text())
        task_id = submit(request, app=app, settings=settings)
        print(f"[4/5] submitted {args.request.name} as task {task_id}")
        start = time.time()

        def show(meta: dict) -> None:
            print(
                f"\r      {meta['stage']:<8} prompt {meta['prompt']}/{meta['prompts']}  "
                f"step {meta['step']}/{meta['steps']}   ",
                end="",
                flush=True,
            )

        result = wait(task_id, app=app, on_progress=show, timeout=1800, poll_interval=0.2)
        print(f"\n[5/5] done in {time.time() - start:.1f}s")
        args.out.mkdir(parents=True, exist_ok=True)
        for image in result["images"]:
            local = args.out / Path(image["key"]).name
            local.write_bytes(s3.get_object(Bucket="outputs", Key=image["key"])["Body"].read())
            print(f"      image {image['index']}: {image['uri']}  (copy: {local})")
        (args.out / "result.json").write_text(json.dumps(result, indent=2))
        print(f"      result: s3://outputs/{result['result_key']}  (copy: {args.out / 'result.json'})")
        timings = ", ".join(f"{k} {v:.2f}s" for k, v in result["timings"].items())
        print(f"      timings: {timings}")
        return 0
    finally:
        worker.stop()
        stop_s3()
        redis_server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
