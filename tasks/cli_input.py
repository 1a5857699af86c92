"""What ``chroma-worker`` reads from its user, checked before anything runs: the request's bytes
(bounded: an endless stdin is refused, never read to its end) and each argument. A wrong argument
is one ``error:`` line and exit 2, never argparse's usage block or a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import stat
import sys
from pathlib import Path
from typing import NoReturn

from tasks.errors import InvalidRequest
from tasks.keys import check_task_id
from tasks.request_text import one_line, shown
from tasks.settings import parse_device

EXIT_USAGE = 2  # argparse's own code for a usage error (tasks.cli: 2, invalid request or usage)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one ``error:`` line (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {one_line(message)} (see {self.prog} --help)\n")


def read_request(path: str, max_bytes: int) -> bytes:
    """The request's bytes from a file or stdin (``-``): at most ``max_bytes``, never more read.

    A FIFO with no writer reads as empty instead of blocking; unreadable -> InvalidRequest."""
    if path == "-" and sys.stdin is None:
        raise InvalidRequest("standard input is closed; give a file, or pipe the request in", "request")
    try:
        data = sys.stdin.buffer.read(max_bytes + 1) if path == "-" else _read_file(path, max_bytes + 1)
    except OSError as exc:
        where = "standard input" if path == "-" else shown(path)
        raise InvalidRequest(f"cannot read {where}: {exc.strerror or exc}", field="request") from None
    if len(data) > max_bytes:
        raise InvalidRequest(
            f"larger than the limit of {max_bytes} bytes (CHROMA_MAX_REQUEST_BYTES)", field="request"
        )
    return data


def _read_file(path: str, limit: int) -> bytes:
    # Opened without blocking so a FIFO nobody writes to reads as empty (EOF) instead of hanging.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise IsADirectoryError(21, "it is a folder, not a file")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(limit)
    finally:
        os.close(fd)


def seconds(value: str) -> float:
    """An argument in seconds: a finite number above 0."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"{shown(value)} is not a number of seconds above 0")
    return number


def task_id_arg(value: str) -> str:
    try:
        return check_task_id(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def device_name(value: str) -> str:
    """``--device``, checked by the same rule as ``CHROMA_DEVICE``."""
    try:
        return parse_device(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(one_line(str(exc))) from None


def lora_folder(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        what = "is not a folder" if os.path.lexists(path) else "does not exist"
        raise argparse.ArgumentTypeError(f"{shown(value)} {what}; give the folder the LoRA paths are under")
    return path


def output_folder(value: str) -> Path:
    """A folder that exists, or can be made: nothing in its place, and its nearest parent a folder."""
    path = Path(value)
    if os.path.lexists(path) and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{shown(value)} exists and is not a folder; give a folder")
    parent = next((p for p in (path, *path.absolute().parents) if os.path.lexists(p)), Path("/"))
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(
            f"{shown(value)} is inside {shown(str(parent))}, which is not a folder"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write in {shown(str(parent))}; give a folder you can write")
    return path
