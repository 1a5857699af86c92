"""The ``chroma-worker`` command: validate, submit, follow, run locally, start a worker.

Only ``run`` and ``worker`` reach the GPU side, and only when called: ``validate``, ``submit`` and
``status`` import celery and pydantic alone, so the command works on a web backend's machine.

Exit codes: 0 ok; 2 invalid request (or bad usage); 1 anything else that failed (the task, the
broker, the settings); 130 interrupted. Expected errors print one line on stderr, ``error: ...``,
naming the field or the argument, with what the user typed escaped; never a traceback.

A request is read as bytes, at most ``CHROMA_MAX_REQUEST_BYTES`` + 1 of them (an endless stdin is
refused, never read to its end), and parsed by ``validate_request`` like any other; arguments are
checked as they are parsed (``tasks.cli_input``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from tasks.app import default_settings
from tasks.cli_input import (
    OneLineParser,
    device_name,
    lora_folder,
    output_folder,
    read_request,
    seconds,
    task_id_arg,
)
from tasks.errors import InvalidRequest, WorkerError
from tasks.producer import app_for, status, submit, wait
from tasks.request_text import one_line, shown
from tasks.results import Progress
from tasks.schemas import (
    DEFAULT_SEED_BASE,
    GenerationRequest,
    PromptSpec,
    effective_prompt,
    renders_preview,
    seed_for,
    snap_size,
    uses_guidance,
    validate_request,
)
from tasks.settings import SettingsError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130

DESCRIPTION = """\
Chroma image generation with LoRAs, served by Celery GPU workers.

A request is a JSON object, for example:

  {"model": "chroma", "trigger_word": "sks",
   "prompts": [{"prompt": "[trigger] a photo of a person", "width": 1024, "height": 1024,
                "seed": 42, "sample_steps": 25, "guidance_scale": 4.0}],
   "loras": [{"path": "my_lora_job/my_lora.safetensors", "network_multiplier": 1.0}]}

Settings come from CHROMA_* environment variables (CHROMA_BROKER_URL, CHROMA_RESULT_BACKEND,
CHROMA_QUEUE, CHROMA_MAX_PROMPTS, ...; see the README).
"""

EPILOG = """\
exit codes: 0 ok, 2 invalid request or usage, 1 task or infrastructure failure, 130 interrupted.

examples:
  chroma-worker validate request.json
  chroma-worker submit request.json --wait --timeout 900
  chroma-worker status 3f0c...
  chroma-worker run request.json --lora-dir ./loras --out ./out
  chroma-worker worker --loglevel INFO --hostname gpu0@%h
"""

WORKER_HELP = """\
Replace this process (os.execvp) with

  python -m celery -A worker worker --pool prefork -Q $CHROMA_QUEUE --concurrency 1 \
      --without-gossip --without-mingle [ARGS...]

Every further argument goes to `celery worker` unchanged (e.g. --loglevel INFO, --hostname
gpu0@%h); start one such process per GPU. Needs the worker extras installed.
"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command != "worker" and extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, or a usage error already printed on one line
        return exc.code if isinstance(exc.code, int) else EXIT_INVALID
    args.celery_args = extra[1:] if extra[:1] == ["--"] else extra
    quiet_third_party()
    try:
        return int(args.handler(args))
    except InvalidRequest as exc:
        print_error(f"{exc.field or 'request'}: {exc.message}")
        return EXIT_INVALID
    except WorkerError as exc:
        print_error(f"{exc.code}: {exc}")
        return EXIT_FAILED
    except TimeoutError as exc:
        print_error(f"timeout: {exc}")
        return EXIT_FAILED
    except ValidationError as exc:  # only the settings raise it here: requests raise InvalidRequest
        print_error(f"settings: {describe_settings_error(exc)}")
        return EXIT_FAILED
    except SettingsError as exc:  # a setting this machine cannot serve (a source, the device)
        print_error(f"settings: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        print_error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of stdout went away (| head): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="chroma-worker",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser(
        "validate",
        help="check a request without sending it",
        description="Check a request against the schema and the CHROMA_* limits, then print what would "
        "run: each prompt's effective size, steps, guidance and seed rule, and the LoRAs. "
        "Exit 0 when valid, 2 with 'error: <field>: <message>' when not.",
    )
    validate.add_argument("request", metavar="REQUEST.json", help="request file, or - for stdin")
    validate.set_defaults(handler=command_validate)

    send = commands.add_parser(
        "submit",
        help="validate a request and enqueue it",
        description="Validate a request, enqueue it and print the task id. With --wait, show progress on "
        "stderr and print the output URIs and the result.json key when it is done.",
    )
    send.add_argument("request", metavar="REQUEST.json", help="request file, or - for stdin")
    send.add_argument("--wait", action="store_true", help="wait for the result, showing progress")
    send.add_argument("--timeout", type=seconds, default=None, metavar="S", help="give up waiting after S s")
    send.add_argument(
        "--task-id",
        type=task_id_arg,
        default=None,
        metavar="ID",
        help="task id to use (default: a new uuid4)",
    )
    send.set_defaults(handler=command_submit)

    show = commands.add_parser(
        "status", help="print a task's state as JSON", description="Print {state, meta} for a task."
    )
    show.add_argument("task_id", type=task_id_arg, metavar="TASK_ID")
    show.set_defaults(handler=command_status)

    local = commands.add_parser(
        "run",
        help="generate locally, without broker or S3 (needs the worker extras)",
        description="Run one request on this machine: LoRA paths are read under --lora-dir, images and "
        "result.json are written to --out. No broker, no object storage.",
    )
    local.add_argument("request", metavar="REQUEST.json", help="request file, or - for stdin")
    local.add_argument(
        "--lora-dir",
        required=True,
        type=lora_folder,
        metavar="DIR",
        help="folder the LoRA paths are relative to",
    )
    local.add_argument(
        "--out", required=True, type=output_folder, metavar="DIR", help="folder for images and result.json"
    )
    local.add_argument(
        "--device", type=device_name, default=None, help="cpu, cuda, cuda:1, ... (default: CHROMA_DEVICE)"
    )
    local.set_defaults(handler=command_run)

    tiny = commands.add_parser(
        "tiny-model",
        help="write a tiny random Chroma, a LoRA and a request to try `run` with (no download)",
        description="Write a tiny random Chroma (about 2 MB; random weights, so its images are noise) with "
        "an ai-toolkit LoRA under DIR/loras and DIR/request.json, then print the CHROMA_* settings that "
        'point at it as shell lines to paste, or to run with eval "$(chroma-worker tiny-model DIR)". '
        "Needs the worker extras.",
    )
    tiny.add_argument("folder", metavar="DIR", type=Path, help="folder to write (created if missing)")
    tiny.set_defaults(handler=command_tiny_model)

    worker = commands.add_parser(
        "worker",
        help="start a GPU worker (celery worker: one pool process per GPU, one task at a time)",
        description=WORKER_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="chroma-worker worker [CELERY WORKER ARGS ...]",
    )
    worker.set_defaults(handler=command_worker)
    return parser


def command_validate(args: argparse.Namespace) -> int:
    settings = default_settings()
    request = validate_request(read_request(args.request, settings.max_request_bytes), settings.limits)
    print("\n".join(describe_request(request, settings.preview)))
    return EXIT_OK


def command_submit(args: argparse.Namespace) -> int:
    settings = default_settings()
    request = read_request(args.request, settings.max_request_bytes)
    task_id = submit(request, settings=settings, task_id=args.task_id)
    print(task_id, flush=True)
    if not args.wait:
        return EXIT_OK
    bar = ProgressBar(sys.stderr)
    try:
        result = wait(task_id, app=app_for(settings), on_progress=bar, timeout=args.timeout)
    except KeyboardInterrupt:
        bar.close()  # before the message: the bar's line ends first
        print_error(f"interrupted; task {task_id} keeps running (chroma-worker status {task_id})")
        return EXIT_INTERRUPTED
    except WorkerError as exc:  # the task failed: name the kind (code) as well as the field
        bar.close()
        print_error(f"{exc.code}: {exc}")
        return EXIT_INVALID if isinstance(exc, InvalidRequest) else EXIT_FAILED
    finally:
        bar.close()
    print("\n".join(describe_result(result)))
    return EXIT_OK


def command_status(args: argparse.Namespace) -> int:
    print(json.dumps(status(args.task_id, app=app_for(default_settings())), indent=2, default=str))
    return EXIT_OK


def command_run(args: argparse.Namespace) -> int:
    settings = default_settings()
    # Validate before importing the GPU side: a bad request fails fast, torch-free. LoRAs come from a
    # folder here (``s3://bucket/key`` is ``<folder>/bucket/key``): a key and an s3:// path never
    # name the same file, so the LoRA bucket is not theirs to share.
    limits = dataclasses.replace(settings.limits, lora_bucket="")
    request = validate_request(read_request(args.request, settings.max_request_bytes), limits)
    try:
        from worker.local import run_local
    except ModuleNotFoundError as exc:
        print_error(
            f"run needs the worker extras (missing module {exc.name}): pip install 'chroma-worker[worker]'"
        )
        return EXIT_FAILED
    bar = ProgressBar(sys.stderr)

    def loading(message: str) -> None:
        print(f"loading {message}", file=sys.stderr, flush=True)

    try:
        result = run_local(
            request, settings, args.lora_dir, args.out, device=args.device, on_load=loading, progress=bar
        )
    finally:
        bar.close()
    for image in result.images:
        print(f"image {image.index}: {image.uri}  seed {image.seed}  {image.width}x{image.height}")
    print(f"result: {(args.out / 'result.json').resolve()}")
    return EXIT_OK


def command_tiny_model(args: argparse.Namespace) -> int:
    import shlex

    folder = args.folder.expanduser().resolve()
    try:
        from worker.tiny import write_example
    except ModuleNotFoundError as exc:
        print_error(
            f"tiny-model needs the worker extras (missing module {exc.name}): "
            "pip install 'chroma-worker[worker]'"
        )
        return EXIT_FAILED
    try:
        example = write_example(folder)
    except OSError as exc:
        print_error(f"cannot write {folder}: {exc.strerror or exc}")
        return EXIT_FAILED
    # The command as the user typed it (.venv/bin/chroma-worker), else its installed name.
    command = sys.argv[0] if Path(sys.argv[0]).name == "chroma-worker" else "chroma-worker"
    lines = [f"# a tiny random Chroma in {folder} (random weights: its images are noise)"]
    for name, value in vars(example.sources).items():
        lines.append(f"export CHROMA_{name.upper()}={shlex.quote(value)}")
    run = [command, "run", example.request, "--lora-dir", example.lora_dir, "--out", folder / "out"]
    lines.append(f"# then: {shlex.join(map(str, run))}")
    print("\n".join(lines))
    return EXIT_OK


def command_worker(args: argparse.Namespace) -> int:
    argv = worker_argv(default_settings().queue, args.celery_args)
    print(f"exec: {' '.join(argv)}", file=sys.stderr, flush=True)
    os.execvp(argv[0], argv)
    return EXIT_FAILED  # not reached: execvp replaces the process or raises


def worker_argv(queue: str, celery_args: list[str], app: str = "worker") -> list[str]:
    """``celery worker`` for one GPU: one pool process (the only one that touches CUDA, replaced when
    it dies), one task at a time. Without gossip and mingle: workers share no revocations or
    clocks, and the start skips a second of waiting for neighbours."""
    return [
        sys.executable, "-m", "celery", "-A", app, "worker",
        "--pool", "prefork", "-Q", queue, "--concurrency", "1", "--without-gossip", "--without-mingle",
        *celery_args,
    ]  # fmt: skip


def describe_request(request: GenerationRequest, preview_default: bool = False) -> list[str]:
    loras = f"{len(request.loras)} LoRA" + ("" if len(request.loras) == 1 else "s")
    prompts = f"{len(request.prompts)} prompt" + ("" if len(request.prompts) == 1 else "s")
    preview = renders_preview(request, preview_default)
    mode = ", preview" if preview else ""
    lines = [f"ok: model {request.model}, {prompts}, {loras}, {request.output_format} output{mode}"]
    for index, spec in enumerate(request.prompts):
        lines.append(f"prompts.{index}: {describe_prompt(request, index, spec, preview)}")
    for index, lora in enumerate(request.loras):
        lines.append(f"loras.{index}: {one_line(lora.path)} x{lora.network_multiplier:g}")
    return lines


def describe_prompt(request: GenerationRequest, index: int, spec: PromptSpec, preview: bool) -> str:
    width, height = snap_size(spec.width, preview), snap_size(spec.height, preview)
    size = f"{width}x{height}"
    if (width, height) != (spec.width, spec.height):
        size += f" (from {spec.width}x{spec.height})"
    resolved = seed_for(spec.seed, index)
    if resolved is None:
        seed = "seed random (reported in the result)"
    elif spec.seed is None:
        seed = f"seed {resolved} ({DEFAULT_SEED_BASE} + index)"
    else:
        seed = f"seed {resolved}"
    guidance = f"{spec.guidance_scale:g}"
    if float(guidance) != spec.guidance_scale:  # 1.000005 is not 1: show what the sampler compares
        guidance = repr(spec.guidance_scale)
    cfg = "" if uses_guidance(spec.guidance_scale) else " (no CFG)"
    text = effective_prompt(request, spec)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{size}, {spec.sample_steps} steps, guidance {guidance}{cfg}, {seed}: {text!r}"


def describe_result(result: dict[str, Any]) -> list[str]:
    lines = []
    for image in result.get("images", []):
        where = image.get("uri") or image.get("key")
        size = f"{image.get('width')}x{image.get('height')}"
        lines.append(f"image {image.get('index')}: {where} ({size}, seed {image.get('seed')})")
    lines.append(f"result.json: {result.get('result_key')}")
    return lines


class ProgressBar:
    """``prompt i/n  step s/t [#####.....] stage`` on one redrawn line (a line per update off a tty)."""

    WIDTH = 20

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.redraw = stream.isatty()
        self.open = False
        self.drawn = 0  # length of the line on screen

    def __call__(self, progress: Progress | dict[str, Any]) -> None:
        meta = progress.as_meta() if isinstance(progress, Progress) else progress
        line = format_progress(meta)
        if self.redraw:  # blank what a longer line left ("denoise" redrawn as "upload")
            line, self.drawn = "\r" + line.ljust(self.drawn), len(line)
        else:
            line += "\n"
        self.stream.write(line)
        self.stream.flush()
        self.open = self.redraw

    def close(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


def format_progress(meta: dict[str, Any]) -> str:
    """One progress line for a ``PROGRESS`` meta (``tasks.results.Progress.as_meta``)."""
    step, steps = int(meta.get("step", 0)), int(meta.get("steps", 0))
    filled = round(ProgressBar.WIDTH * step / steps) if steps > 0 else 0
    bar = "#" * filled + "." * (ProgressBar.WIDTH - filled)
    line = f"prompt {meta.get('prompt', '?')}/{meta.get('prompts', '?')}  step {step}/{steps} [{bar}]"
    stage = meta.get("stage")
    return f"{line} {stage}" if stage else line


def describe_settings_error(exc: ValidationError) -> str:
    """The first settings problem, named by its environment variable, with the value it had (not
    for URLs, which may hold a password)."""
    error = exc.errors(include_url=False)[0]
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:
        return message
    name = str(error["loc"][0])
    if error["type"] != "value_error" and not name.endswith(("_url", "backend")):
        message += f" (got {shown(error.get('input'))})"
    return f"CHROMA_{name.upper()}: {message}"


def quiet_third_party() -> None:
    """Third-party warnings, log lines and progress bars hidden (``tasks.quiet``) unless CHROMA_VERBOSE=1."""
    from tasks.quiet import quiet

    try:
        verbose = default_settings().verbose
    except ValidationError:  # the command reads the settings again and reports the error itself
        verbose = False
    quiet(verbose)


def print_error(message: str) -> None:
    """One line on stderr, whatever the message holds (user text is escaped)."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
