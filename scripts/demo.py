"""The whole system on one machine, on an embedded default: no GPU, no downloads, no Docker.

Writes a tiny random Chroma and an ai-toolkit-format LoRA, starts a private Redis and an S3
endpoint (moto's server over HTTP), uploads the LoRA, starts a real ``celery -A worker worker``
process, submits the reference example request through the producer API, follows its progress
and copies the image and result.json from S3 to ./demo-output (the worker's log goes there too).
Everything else lives in a temporary folder that is removed, and every server stopped, however the
demo ends (done, failed or interrupted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.cli import ProgressBar  # noqa: E402
from tasks.quiet import quiet  # noqa: E402
from tasks.settings import Settings  # noqa: E402

EXAMPLE = REPO / "examples" / "request.json"
LORA_KEY = "my_lora_job/my_lora.safetensors"
# Celery warns a worker started as root; the image runs as uid 1000, the demo as whoever runs it.
ROOT_WARNING = "ignore:You're running the worker with superuser privileges"
EXIT_INTERRUPTED = 130


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "request", nargs="?", type=Path, default=EXAMPLE, help="request JSON (default: example)"
    )
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="where to copy the outputs")
    args = parser.parse_args()
    verbose = Settings().verbose
    quiet(verbose)
    try:
        with contextlib.ExitStack() as stack:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chroma-demo-")))
            return demo(args.request, args.out, work, stack, verbose)
    except KeyboardInterrupt:
        print("\ninterrupted: servers stopped, temporary files removed", file=sys.stderr)
        return EXIT_INTERRUPTED


def demo(request_path: Path, out: Path, work: Path, stack: contextlib.ExitStack, verbose: bool) -> int:
    """The demo; what it starts is stopped by ``stack`` (servers first, then ``work`` is removed)."""
    import boto3

    from tasks.app import make_celery
    from tasks.producer import submit, wait
    from tests.s3server import start_s3_server
    from tests.services import ACCESS_KEY, SECRET_KEY, RedisServer, WorkerProcess, worker_env
    from worker.tiny import write_lora, write_tiny_chroma

    request = json.loads(request_path.read_text())
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    print("[1/5] a tiny random Chroma and a LoRA (in a temporary folder)")
    sources = write_tiny_chroma(work / "model")
    lora = write_lora(work / "lora.safetensors")

    print("[2/5] Redis and S3 (moto over HTTP) on free local ports")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the S3 server's access log
    redis_server = RedisServer(work / "redis")
    stack.callback(redis_server.stop)
    endpoint, stop_s3 = start_s3_server()
    stack.callback(stop_s3)
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
        "verbose": str(verbose).lower(),
    }
    settings = Settings(**values)
    env = worker_env({f"CHROMA_{k.upper()}": v for k, v in values.items()})
    env.pop("OMP_NUM_THREADS", None)  # one worker: let it use every core
    env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS"), ROOT_WARNING]))
    log = out / "worker.log"
    print(f"[3/5] worker: celery -A worker worker --pool prefork -Q {settings.queue} (log: {log})")
    worker = WorkerProcess(env, settings.queue, log, "demo")
    finished = False

    def stop_worker() -> None:
        if not finished:  # a task may be running: a cold shutdown ends it instead of waiting for it
            worker.process.send_signal(signal.SIGQUIT)
        worker.stop()

    stack.callback(stop_worker)
    worker.wait_ready()
    app = make_celery(settings)
    task_id = submit(request, app=app, settings=settings)
    print(f"[4/5] submitted {request_path.name} as task {task_id}")
    start = time.time()
    bar = ProgressBar(sys.stdout)
    try:
        result = wait(task_id, app=app, on_progress=bar, timeout=1800, poll_interval=0.2)
    finally:
        bar.close()
    finished = True
    print(f"[5/5] done in {time.time() - start:.1f}s; copied from S3 to {out}:")
    for image in result["images"]:
        local = out / Path(image["key"]).name
        local.write_bytes(s3.get_object(Bucket="outputs", Key=image["key"])["Body"].read())
        size = f"{image['width']}x{image['height']}"
        print(f"      image {image['index']}: {local}  ({size}, seed {image['seed']})")
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"      result: {out / 'result.json'}")
    print(f"      worker log: {log}")
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in result["timings"].items())
    print(f"      timings: {timings}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
