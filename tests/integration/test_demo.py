"""``scripts/demo.py`` as a user runs it: the paths it prints exist after it ends, its temporary
folder is gone and every process it started has stopped, whether it finished or was interrupted;
the worker's log carries none of the third-party noise ``tasks.quiet`` hides.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli import REPO, cli_env

pytestmark = pytest.mark.integration

DEMO = REPO / "scripts" / "demo.py"
NOISE = ("Failed to load", "register_constant", "Unable to import", "Loading weights", "superuser", "Warning")


def demo_env(tmp: Path) -> dict[str, str]:
    """No CHROMA_* settings; the demo's temporary folder made under ``tmp``."""
    tmp.mkdir()
    return cli_env() | {"TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}


def request_file(folder: Path, side: int, steps: int) -> Path:
    request = json.loads((REPO / "examples" / "request.json").read_text())
    request["prompts"][0].update(width=side, height=side, sample_steps=steps)
    path = folder / "request.json"
    path.write_text(json.dumps(request))
    return path


def processes_mentioning(marker: str) -> list[str]:
    """Processes whose command line, environment or working folder names ``marker``: the demo and its
    worker inherit TMPDIR; Redis rewrites both for its process title but works in its folder there."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            text = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
            text += os.readlink(proc / "cwd").encode()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if marker.encode() in text:
            found.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()[:80]!r}")
    return found


def test_demo_prints_paths_that_exist_and_leaves_nothing_behind(tmp_path: Path) -> None:
    env = demo_env(tmp_path / "tmp")
    request = request_file(tmp_path, side=64, steps=2)
    out = subprocess.run(
        [sys.executable, str(DEMO), str(request), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stderr == ""
    assert "s3://" not in out.stdout
    printed = [
        line.split(": ", 1)[1].split("  ")[0]
        for line in out.stdout.splitlines()
        if line.strip().startswith(("image 0: ", "result: ", "worker log: "))
    ]
    assert printed == [str(tmp_path / "out" / name) for name in ("0.png", "result.json", "worker.log")]
    assert all(Path(path).is_file() for path in printed)
    assert list((tmp_path / "tmp").glob("chroma-demo-*")) == []
    assert processes_mentioning(str(tmp_path)) == []
    log = (tmp_path / "out" / "worker.log").read_text()
    assert "succeeded" in log
    assert [word for word in NOISE if word in log] == []


def test_demo_interrupted_stops_its_servers_and_removes_its_files(tmp_path: Path) -> None:
    env = demo_env(tmp_path / "tmp")
    request = request_file(tmp_path, side=1024, steps=25)  # still rendering when interrupted
    demo = subprocess.Popen(
        [sys.executable, str(DEMO), str(request), "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    try:
        assert demo.stdout is not None
        for line in demo.stdout:  # the progress lines, one per update off a terminal
            if "denoise" in line:
                break
        assert list((tmp_path / "tmp").glob("chroma-demo-*")) != []
        assert len(processes_mentioning(str(tmp_path))) >= 4  # the demo, Redis, the worker and its pool
        started = time.monotonic()
        demo.send_signal(signal.SIGINT)  # Ctrl-C
        _, stderr = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:  # a failed assertion above: still let the demo stop what it started
            demo.send_signal(signal.SIGINT)
            demo.wait(timeout=60)
    assert demo.returncode == 130, stderr
    assert "interrupted: servers stopped, temporary files removed" in stderr
    assert "Traceback" not in stderr
    assert time.monotonic() - started < 30  # the running task was stopped, not waited for
    assert list((tmp_path / "tmp").glob("chroma-demo-*")) == []
    assert processes_mentioning(str(tmp_path)) == []
