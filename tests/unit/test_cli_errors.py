"""``chroma-worker`` as a user runs it (a subprocess) with hostile input, arguments and settings:
every case ends as one escaped ``error:`` line on stderr (exit 2 for the input, 1 for settings or
infrastructure), never a traceback, never a hang. No services."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli import REFERENCE, REPO, REQUESTS, cli_env

MINIMAL = REQUESTS / "good" / "minimal.json"
TIMEOUT = 60
# Nothing listens on the discard port: a command that should have stopped earlier contacts no one.
NO_QUEUE = {"CHROMA_BROKER_URL": "redis://127.0.0.1:9/0", "CHROMA_RESULT_BACKEND": "redis://127.0.0.1:9/1"}


def cli(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", *args],
        input=stdin,
        capture_output=True,
        env={**cli_env(), **NO_QUEUE, **(env or {})},
        cwd=REPO,
        timeout=TIMEOUT,
    )


def shell(command: str) -> subprocess.CompletedProcess[bytes]:
    """``command`` in sh, where ``CLI`` is the command line of ``chroma-worker``."""
    cli_line = f"{shlex.quote(sys.executable)} -m tasks.cli"
    return subprocess.run(
        ["sh", "-c", command.replace("CLI", cli_line)],
        capture_output=True,
        env=cli_env(),
        cwd=REPO,
        timeout=TIMEOUT,
    )


def one_error_line(out: subprocess.CompletedProcess[bytes], code: int, start: str) -> str:
    """The single stderr line, checked: the exit code, the start, printable, no traceback."""
    err = out.stderr.decode("utf-8")
    assert out.returncode == code, (out.returncode, err)
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    line = err[:-1]
    assert line.isprintable(), line
    assert line.startswith(start), line
    return line


# -- reading the request ------------------------------------------------------------------------


def test_endless_stdin_is_refused_within_the_size_limit() -> None:
    started = time.monotonic()
    out = shell("yes | CLI validate -")
    one_error_line(out, 2, "error: request: larger than the limit of 262144 bytes (CHROMA_MAX_REQUEST_BYTES)")
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("where", ["stdin", "file"])
def test_invalid_utf8_is_one_line(tmp_path: Path, where: str) -> None:
    data = b'{"model": "chroma", "prompts": [{"prompt": "caf\xe9"}]}'
    path = tmp_path / "latin1.json"
    path.write_bytes(data)
    out = cli("validate", "-", stdin=data) if where == "stdin" else cli("validate", str(path))
    line = one_error_line(out, 2, "error: request: not UTF-8 text: ")
    assert "byte 0xe9 at offset 47" in line


@pytest.mark.parametrize("where", ["stdin", "file"])
def test_a_byte_order_mark_reads_the_same_from_stdin_and_a_file(tmp_path: Path, where: str) -> None:
    data = b"\xef\xbb\xbf" + json.dumps(REFERENCE).encode()
    path = tmp_path / "bom.json"
    path.write_bytes(data)
    out = cli("validate", "-", stdin=data) if where == "stdin" else cli("validate", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().startswith("ok: model chroma, 1 prompt, 1 LoRA")


def test_utf16_is_named(tmp_path: Path) -> None:
    path = tmp_path / "utf16.json"
    path.write_text(json.dumps(REFERENCE), encoding="utf-16")
    one_error_line(cli("validate", str(path)), 2, "error: request: is UTF-16 text")


def test_syntax_error_keeps_its_location() -> None:
    text = b'{"model": "chroma",\n"prompts": [{"prompt": "a"}\n    "loras": []}'
    line = one_error_line(cli("validate", "-", stdin=text), 2, "error: request: ")
    assert line == "error: request: not valid JSON: Expecting ',' delimiter at line 3 column 5"


def test_a_duplicate_key_is_named() -> None:
    text = b'{"model": "chroma", "prompts": [{"prompt": "a", "width": 64, "width": 4096}]}'
    line = one_error_line(cli("validate", "-", stdin=text), 2, "error: prompts.0.width: ")
    assert "'width' appears twice" in line


@pytest.mark.parametrize("bomb", [b"[" * 200_000, b'{"a":' * 50_000], ids=["arrays", "objects"])
def test_a_nesting_bomb_is_one_line(bomb: bytes) -> None:
    one_error_line(cli("validate", "-", stdin=bomb), 2, "error: request: ")


def test_control_characters_in_a_request_do_not_reach_the_terminal() -> None:
    text = json.dumps({"model": "chroma\x1b[2J\n", "prompts": [{"prompt": "a"}], "x\x1b]0;t\x07\u2028": 1})
    line = one_error_line(cli("validate", "-", stdin=text.encode()), 2, "error: ")
    assert "\\x1b" in line


def test_closed_stdin_is_one_line() -> None:
    one_error_line(shell("CLI validate - <&-"), 2, "error: request: standard input is closed")


def test_a_fifo_nobody_writes_to_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    one_error_line(cli("validate", str(fifo)), 2, "error: request: is empty")


def symlink_loop(folder: Path) -> Path:
    (folder / "a").symlink_to(folder / "b")
    (folder / "b").symlink_to(folder / "a")
    return folder / "a"


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda tmp: tmp, "it is a folder, not a file"),
        (symlink_loop, "Too many levels of symbolic links"),
        (lambda tmp: tmp / "absent.json", "No such file or directory"),
        (lambda tmp: Path("/proc/self/mem"), "Input/output error"),  # unreadable, even for root
        (lambda tmp: tmp / "a\nb\x1b[2J.json", "No such file or directory"),
    ],
    ids=["folder", "symlink loop", "missing", "unreadable", "odd name"],
)
def test_a_request_path_that_cannot_be_read_is_one_line(tmp_path: Path, make, words: str) -> None:
    line = one_error_line(cli("validate", str(make(tmp_path))), 2, "error: request: cannot read ")
    assert line.endswith(words)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_request_without_read_permission_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "secret.json"
    path.write_text("{}")
    path.chmod(0)
    one_error_line(cli("validate", str(path)), 2, "error: request: cannot read ")


def test_validate_describes_guidance_as_the_sampler_decides() -> None:
    request = {
        "model": "chroma",
        "prompts": [{"prompt": "a", "guidance_scale": g} for g in (1.000005, 1.00002, 1)],
    }
    out = cli("validate", "-", stdin=json.dumps(request).encode())
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert "guidance 1.000005 (no CFG)" in lines[1]
    assert "guidance 1.00002," in lines[2]
    assert "guidance 1 (no CFG)" in lines[3]


# -- arguments ----------------------------------------------------------------------------------


def test_run_arguments_are_checked_before_anything_loads(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    run = ("run", str(MINIMAL))
    cases = [
        (
            (*run, "--lora-dir", str(tmp_path), "--out", str(afile)),
            "error: argument --out: ",
            "exists and is not a folder",
        ),
        (
            (*run, "--lora-dir", str(tmp_path), "--out", str(afile / "x")),
            "error: argument --out: ",
            "not a folder",
        ),
        (
            (*run, "--lora-dir", str(tmp_path / "nope"), "--out", str(tmp_path)),
            "error: argument --lora-dir: ",
            "does not exist",
        ),
        (
            (*run, "--lora-dir", str(afile), "--out", str(tmp_path)),
            "error: argument --lora-dir: ",
            "is not a folder",
        ),
        (
            (*run, "--lora-dir", str(tmp_path), "--out", str(tmp_path), "--device", "bogus"),
            "error: argument --device: 'bogus' is not a device",
            "",
        ),
        (
            (*run, "--lora-dir", str(tmp_path), "--out", str(symlink_loop(tmp_path))),
            "error: argument --out: ",
            "",
        ),
    ]
    for args, start, words in cases:
        line = one_error_line(cli(*args), 2, start)
        assert words in line, line


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (("submit", str(MINIMAL), "--timeout", "nan"), "error: argument --timeout: 'nan' is not a number"),
        (("submit", str(MINIMAL), "--timeout", "-1"), "error: argument --timeout: "),
        (("submit", str(MINIMAL), "--timeout", "soon"), "error: argument --timeout: "),
        (("submit", str(MINIMAL), "--task-id", "../x"), "error: argument --task-id: task id must be"),
        (("submit", str(MINIMAL), "--task-id", ""), "error: argument --task-id: "),
        (("status", "a\nb"), "error: argument TASK_ID: "),
        (("bogus",), "error: argument COMMAND: invalid choice: 'bogus'"),
        ((), "error: the following arguments are required: COMMAND"),
        (("validate",), "error: the following arguments are required: REQUEST.json"),
        (("validate", str(MINIMAL), "--bogus"), "error: unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_are_one_line(args: tuple[str, ...], start: str) -> None:
    one_error_line(cli(*args), 2, start)


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "start"),
    [
        ("CHROMA_WARMUP_SIZES", "big", "error: settings: CHROMA_WARMUP_SIZES: 'big' is not a size"),
        ("CHROMA_ROPE_AXES", "a,b", "error: settings: CHROMA_ROPE_AXES: 'a,b' is not a list of integers"),
        ("CHROMA_MAX_PROMPTS", "-1", "error: settings: CHROMA_MAX_PROMPTS: Input should be greater than"),
        ("CHROMA_QUANTIZATION", "int4", "error: settings: CHROMA_QUANTIZATION: Input should be 'float8'"),
        ("CHROMA_COMPILE", "maybe", "error: settings: CHROMA_COMPILE: "),
        ("CHROMA_DEVICE", "tpu\n", "error: settings: CHROMA_DEVICE: 'tpu\\n' is not a device"),
        ("CHROMA_MAX_REQUEST_BYTES", "1e3", "error: settings: CHROMA_MAX_REQUEST_BYTES: "),
    ],
)
def test_a_setting_that_does_not_parse_is_one_line(variable: str, value: str, start: str) -> None:
    one_error_line(cli("validate", str(MINIMAL), env={variable: value}), 1, start)


@pytest.mark.parametrize(
    ("command", "env", "start"),
    [
        (
            ("submit", str(MINIMAL)),
            {"CHROMA_BROKER_URL": "bogus://x"},
            "error: settings: CHROMA_BROKER_URL: not a broker",
        ),
        (
            ("status", "t1"),
            {"CHROMA_RESULT_BACKEND": "redis://h:port/1"},
            "error: settings: CHROMA_RESULT_BACKEND: ",
        ),
        (
            ("status", "t1"),
            {"CHROMA_RESULT_BACKEND": "redis://[::1"},
            "error: settings: CHROMA_RESULT_BACKEND: ",
        ),
    ],
)
def test_a_queue_url_celery_cannot_use_is_one_line(
    command: tuple[str, ...], env: dict[str, str], start: str
) -> None:
    line = one_error_line(
        cli(*command, env={**env, "CHROMA_RESULT_BACKEND": "redis://127.0.0.1:9/1", **env}), 1, start
    )
    assert "h:port" not in line  # URLs are not echoed: they may hold a password


def test_run_with_a_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    started = time.monotonic()
    out = cli(
        "run", str(MINIMAL), "--lora-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--device", "cpu",
        env={"CHROMA_TRANSFORMER": str(tmp_path / "absent.safetensors"), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    one_error_line(out, 1, "error: settings: CHROMA_TRANSFORMER: ")
    assert time.monotonic() - started < 30  # refused before any model is loaded


def test_a_key_and_an_s3_path_of_one_name_are_one_lora_in_storage_two_files_locally(tmp_path: Path) -> None:
    # In S3 a key resolves in the LoRA bucket; a local run reads s3://bucket/key as <folder>/bucket/key.
    request = tmp_path / "two.json"
    loras = [{"path": "x.safetensors"}, {"path": "s3://loras/x.safetensors"}]
    request.write_text(json.dumps({"model": "chroma", "prompts": [{"prompt": "a"}], "loras": loras}))
    one_error_line(cli("validate", str(request)), 2, "error: loras.1.path: the same LoRA as loras.0.path")
    out = cli(
        "run", str(request), "--lora-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--device", "cpu",
        env={"CHROMA_TRANSFORMER": str(tmp_path / "absent.safetensors"), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    one_error_line(out, 1, "error: settings: CHROMA_TRANSFORMER: ")  # validated; stopped by the setting
