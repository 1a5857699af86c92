"""What a new user meets first, run as they run it (a subprocess of the command): ``tiny-model``
writes a model to try, ``run`` on it prints the loading lines and the step bar and nothing else
(third-party lines only with CHROMA_VERBOSE=1), and ``run`` with the default settings and no network
fails in one line that says what to set.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.cli import ProgressBar, format_progress
from tasks.schemas import validate_request
from tasks.settings import Settings
from tests.cli import REFERENCE, REPO, cli_env

# Every line ``run`` may write on stderr: what is loading, then the step bar.
ALLOWED_STDERR = (
    re.compile(r"loading (transformer|text encoder|vae): .+"),
    re.compile(r"prompt \d+/\d+  step \d+/\d+ \[[#.]{20}\]( [a-z_]+)?"),
)
SOURCES = ("CHROMA_TRANSFORMER", "CHROMA_TEXT_ENCODER", "CHROMA_TOKENIZER", "CHROMA_VAE")


def command(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


def offline_env(tmp_path: Path) -> dict[str, str]:
    """No CHROMA_* settings, an empty Hugging Face cache, the hub forbidden; one thread (the machine
    is shared: threads that wait spinning for a busy core made a 6 s run take a minute)."""
    env = cli_env()
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN"):
        env.pop(name, None)
    (tmp_path / "hf-home").mkdir(exist_ok=True)
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def small_request(folder: Path, tmp_path: Path) -> Path:
    """The request ``tiny-model`` wrote, at a size rendered in a fraction of a second."""
    request = json.loads((folder / "request.json").read_text())
    request["prompts"][0].update(width=128, height=128, sample_steps=4)
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    folder = tmp_path_factory.mktemp("newcomer") / "tiny"
    return folder, command("tiny-model", str(folder), env=offline_env(folder.parent))


def exported(stdout: str) -> dict[str, str]:
    """The ``export NAME=VALUE`` lines of ``tiny-model``, as the shell reads them."""
    values = {}
    for line in stdout.splitlines():
        if line.startswith("export "):
            name, _, value = shlex.split(line)[1].partition("=")
            values[name] = value
    return values


def test_tiny_model_writes_a_model_lora_and_request_and_prints_the_settings(tiny_model) -> None:
    folder, out = tiny_model
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    settings = exported(out.stdout)
    assert sorted(settings) == sorted(SOURCES)
    assert all(Path(path).exists() and Path(path).is_relative_to(folder) for path in settings.values())
    # Every line is shell: comments and exports, so `eval "$(chroma-worker tiny-model DIR)"` works.
    assert all(line.startswith(("# ", "export ")) for line in out.stdout.splitlines())
    assert f"run {folder / 'request.json'} --lora-dir {folder / 'loras'} --out {folder / 'out'}" in out.stdout
    request = validate_request((folder / "request.json").read_text(), Settings().limits)
    assert (folder / "loras" / request.loras[0].path).is_file()


def test_run_on_the_tiny_model_prints_only_loading_lines_and_the_step_bar(tiny_model, tmp_path) -> None:
    folder, _ = tiny_model
    env = offline_env(tmp_path) | exported(tiny_model[1].stdout)
    request = small_request(folder, tmp_path)
    out = command(
        "run", str(request), "--lora-dir", str(folder / "loras"), "--out", str(tmp_path / "out"), env=env
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    unexpected = [line for line in lines if not any(p.fullmatch(line) for p in ALLOWED_STDERR)]
    assert unexpected == []
    assert [line.split(":")[0] for line in lines if line.startswith("loading")][0] == "loading transformer"
    assert "step 4/4 [####################] denoise" in out.stderr
    assert f"image 0: {tmp_path / 'out' / '0.png'}  seed 42  128x128" in out.stdout
    assert json.loads((tmp_path / "out" / "result.json").read_text())["images"][0]["width"] == 128


def test_run_verbose_shows_the_third_party_lines(tiny_model, tmp_path) -> None:
    folder, _ = tiny_model
    env = offline_env(tmp_path) | exported(tiny_model[1].stdout) | {"CHROMA_VERBOSE": "1"}
    request = small_request(folder, tmp_path)
    out = command(
        "run", str(request), "--lora-dir", str(folder / "loras"), "--out", str(tmp_path / "out"), env=env
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Loading weights" in out.stderr  # transformers' progress bar, loading T5
    assert any(not any(p.fullmatch(line) for p in ALLOWED_STDERR) for line in out.stderr.splitlines())


def test_run_with_default_settings_offline_fails_in_one_line(tmp_path: Path) -> None:
    request = tmp_path / "request.json"
    request.write_text(json.dumps(REFERENCE))
    started = time.monotonic()
    out = command(
        "run", str(request), "--lora-dir", str(tmp_path), "--out", str(tmp_path / "out"),
        env=offline_env(tmp_path), timeout=60,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert len(out.stderr.splitlines()) == 1, out.stderr
    line = out.stderr.strip()
    assert line.startswith(
        "error: settings: CHROMA_TRANSFORMER: 'lodestones/Chroma1-Base/Chroma1-Base.safetensors'"
    )
    assert "point it at a local copy" in line and "chroma-worker tiny-model DIR" in line
    assert out.stdout == ""
    assert elapsed < 30  # no retries against an unreachable hub


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True

    def screen(self) -> str:
        """The one line a terminal shows: each carriage return writes over the start of the line."""
        shown = ""
        for part in self.getvalue().split("\r"):
            shown = part + shown[len(part) :]
        return shown


def test_progress_bar_redrawn_shorter_leaves_nothing_of_the_longer_line() -> None:
    terminal = Terminal()
    bar = ProgressBar(terminal)
    meta = {"prompt": 1, "prompts": 1, "step": 25, "steps": 25}
    bar(meta | {"stage": "denoise"})
    bar(meta | {"stage": "upload"})
    assert terminal.screen().rstrip() == format_progress(meta | {"stage": "upload"})
