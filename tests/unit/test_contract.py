"""The contract without services: the import boundary, the app's configuration, settings, the CLI's
validation and usage. What needs a Redis is in tests/integration/test_producer.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tasks.app import (
    PRODUCER_RETRIES,
    PRODUCER_SOCKET_TIMEOUT,
    get_app,
    make_celery,
    make_producer,
    soft_time_limit,
)
from tasks.cli import format_progress, main, worker_argv
from tasks.names import GENERATE
from tasks.results import Progress
from tasks.settings import Settings
from tests.cli import BAD_WIDTH, REFERENCE, REPO, REQUESTS, cli_env, run_cli

GPU_MODULES = ("torch", "diffusers", "boto3", "botocore", "transformers", "safetensors", "worker", "storage")
LOADED_GPU_MODULES = f"[m for m in {GPU_MODULES!r} if m in sys.modules]"  # an expression for probes
NO_SERVER = "redis://127.0.0.1:9"  # nothing is contacted: these tests only build and read the config


@pytest.fixture
def settings() -> Settings:
    return Settings(
        broker_url=f"{NO_SERVER}/0",
        result_backend=f"{NO_SERVER}/1",
        queue=f"test-contract-{uuid.uuid4().hex[:8]}",
        task_time_limit=600,
        visibility_timeout=900,
    )


def test_contract_imports_leave_gpu_stack_out() -> None:
    code = (
        "import sys, json\n"
        "import tasks, tasks.app, tasks.producer, tasks.cli\n"
        "app = tasks.app.get_app()\n"
        "assert app is tasks.app.get_app()\n"
        f"print(json.dumps({{'loaded': {LOADED_GPU_MODULES}, 'broker': app.conf.broker_url}}))\n"
    )
    env = cli_env()
    env["CHROMA_BROKER_URL"] = "redis://127.0.0.1:1/0"  # unreachable: building the app must not connect
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=60
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report == {"loaded": [], "broker": "redis://127.0.0.1:1/0"}
    assert time.monotonic() - started < 20


def test_cli_validate_and_run_stay_torch_free(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(BAD_WIDTH))
    code = (
        "import sys, json\n"
        "from tasks.cli import main\n"
        f"codes = [main(['validate', {str(REQUESTS / 'good' / 'reference.json')!r}]),\n"
        f"         main(['run', {str(bad)!r}, '--lora-dir', '.', '--out', '.'])]\n"
        f"print(json.dumps({{'codes': codes, 'loaded': {LOADED_GPU_MODULES}}}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {"codes": [0, 2], "loaded": []}


def test_app_is_json_only_and_at_least_once(settings: Settings) -> None:
    conf = make_celery(settings).conf
    assert conf.task_serializer == "json"
    assert conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert list(conf.result_accept_content) == ["json"]
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.task_acks_on_failure_or_timeout is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_concurrency == 1
    assert conf.worker_max_tasks_per_child is None
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is False  # finish, ack after reconnect
    assert conf.broker_connection_retry_on_startup is True
    assert conf.task_track_started is True
    assert conf.result_extended is False
    assert conf.task_default_rate_limit is None
    assert conf.result_expires == settings.result_expires


def test_app_limits_and_routing_follow_settings(settings: Settings) -> None:
    conf = make_celery(settings).conf
    visibility = conf.broker_transport_options["visibility_timeout"]
    assert visibility == settings.visibility_timeout
    assert conf.result_backend_transport_options["visibility_timeout"] == settings.visibility_timeout
    assert conf.broker_transport_options["socket_keepalive"] is True
    assert conf.broker_transport_options["health_check_interval"] > 0
    assert conf.task_time_limit == settings.task_time_limit
    assert conf.task_soft_time_limit < conf.task_time_limit
    assert conf.task_default_queue == settings.queue
    assert conf.task_routes == {GENERATE: {"queue": settings.queue}}


@pytest.mark.parametrize(("hard", "soft"), [(3600, 3540), (600, 540), (100, 90), (10, 9)])
def test_soft_time_limit_is_a_little_lower(hard: int, soft: int) -> None:
    assert soft_time_limit(hard) == soft


def test_get_app_is_built_once() -> None:
    assert get_app() is get_app()


def test_cli_validate_accepts_and_summarises() -> None:
    out = run_cli("validate", str(REQUESTS / "good" / "width_1000_snaps_to_992.json"))
    assert out.returncode == 0, out.stderr
    assert "992x992 (from 1000x1000)" in out.stdout
    assert "seed 42 (42 + index)" in out.stdout
    assert out.stderr == ""


def test_cli_validate_reads_stdin() -> None:
    out = run_cli("validate", "-", stdin=json.dumps(REFERENCE))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "ok: model chroma, 1 prompt, 1 LoRA, png output"
    assert "loras.0: my_lora_job/my_lora.safetensors x1" in out.stdout
    assert "'sks a photo of a person'" in out.stdout


@pytest.mark.parametrize(
    ("request_text", "expected"),
    [
        (
            json.dumps(BAD_WIDTH),
            "error: prompts.0.width: Input should be less than or equal to 4096 (got 4097)\n",
        ),
        (
            "{not json",
            "error: request: not valid JSON: Expecting property name enclosed in double quotes "
            "at line 1 column 2\n",
        ),
        (
            '{\n  "model": "chroma"\n  "prompts": []}',
            "error: request: not valid JSON: Expecting ',' delimiter at line 3 column 3\n",
        ),
        ("[]", "error: request: must be a JSON object, got a list\n"),
    ],
)
def test_cli_validate_rejects_with_one_line(request_text: str, expected: str) -> None:
    out = run_cli("validate", "-", stdin=request_text)
    assert out.returncode == 2
    assert out.stderr.startswith(expected)
    assert out.stderr.count("\n") == 1
    assert out.stdout == ""


def test_cli_validate_missing_file(tmp_path: Path) -> None:
    out = run_cli("validate", str(tmp_path / "absent.json"))
    assert out.returncode == 2
    assert out.stderr.startswith("error: request: cannot read ")
    assert "Traceback" not in out.stderr


def test_cli_bad_settings_name_the_variable() -> None:
    env = cli_env()
    env["CHROMA_VISIBILITY_REFRESH_INTERVAL"] = "30"  # too few renewals in the default visibility timeout
    out = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "validate", str(REQUESTS / "good" / "minimal.json")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 1
    assert out.stderr.startswith("error: settings: CHROMA_VISIBILITY_TIMEOUT (40s) must be at least 3 x")
    assert out.stderr.count("\n") == 1


def test_cli_usage_errors_return_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate"]) == 2
    assert main(["validate", "a.json", "--bogus"]) == 2
    assert main(["--help"]) == 0
    assert "validate" in capsys.readouterr().out


def test_progress_line_format() -> None:
    assert format_progress(Progress(2, 3, 5, 10, "denoise").as_meta()) == (
        "prompt 2/3  step 5/10 [##########..........] denoise"
    )
    assert format_progress(Progress(1, 1, 0, 0, "download").as_meta()) == (
        "prompt 1/1  step 0/0 [....................] download"
    )


def test_worker_command_is_one_pool_process_per_gpu() -> None:
    argv = worker_argv("gpu-queue", ["--loglevel", "INFO"])
    assert argv[0] == sys.executable
    assert argv[1:] == [
        "-m", "celery", "-A", "worker", "worker", "--pool", "prefork", "-Q", "gpu-queue",
        "--concurrency", "1", "--without-gossip", "--without-mingle", "--loglevel", "INFO",
    ]  # fmt: skip


def test_the_producer_app_bounds_every_connection(settings: Settings) -> None:
    producer = make_producer(settings)
    backend = producer.backend.connparams  # built after the options (the backend reads them once)
    assert backend["socket_timeout"] == backend["socket_connect_timeout"] == PRODUCER_SOCKET_TIMEOUT
    assert backend["retry_on_timeout"] is False
    assert producer.backend.retry_policy["max_retries"] == PRODUCER_RETRIES
    broker = producer.conf.broker_transport_options
    assert broker["socket_timeout"] == broker["socket_connect_timeout"] == PRODUCER_SOCKET_TIMEOUT
    assert broker["max_retries"] == producer.conf.task_publish_retry_policy["max_retries"] == PRODUCER_RETRIES
    assert broker["visibility_timeout"] == settings.visibility_timeout
    # The worker keeps its patience: a running task waits out a Redis restart.
    worker = make_celery(settings)
    assert "socket_timeout" not in worker.conf.broker_transport_options
    assert "retry_policy" not in worker.conf.result_backend_transport_options
    assert get_app().conf.redis_socket_timeout == PRODUCER_SOCKET_TIMEOUT


@pytest.mark.parametrize("prefix", ["a//b", "..", "x/../y", "./x"])
@pytest.mark.parametrize("name", ["lora_prefix", "output_prefix"])
def test_settings_refuse_prefixes_that_would_escape_their_place(name: str, prefix: str) -> None:
    with pytest.raises(ValueError, match="segment"):
        Settings(**{name: prefix})
    assert getattr(Settings(**{name: "/team/loras/"}), name) == "/team/loras/"
