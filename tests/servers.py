"""Servers under test: a subprocess on a free 127.0.0.1 port, waited for, and stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], ready_url: str, log_path: Path, env: dict[str, str] | None = None,
                 timeout: float = 90, launcher: list[str] | None = None) -> subprocess.Popen[bytes]:
    """`python -m qwen_mlx.cli ARGS` (under `launcher`, e.g. mlx.launch, when given), once `ready_url` answers;
    its output goes to `log_path`. Unless `env` names one, the server keeps its files (the prefix cache's disk
    tier, conversations) in a home of its own beside the log, so no server starts from another's caches."""
    home = {"QWEN_MLX_HOME": str(log_path.with_suffix(".home"))}
    with open(log_path, "wb") as log:  # the server keeps its own handle
        process = subprocess.Popen([*(launcher or []), sys.executable, "-m", "qwen_mlx.cli", *args],
                                   env={**os.environ, **home, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=launcher is not None)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {log_path.read_text()}")
        try:
            with urllib.request.urlopen(ready_url, timeout=2):
                return process
        except OSError:
            time.sleep(0.3)
    stop_server(process)
    raise RuntimeError(f"the server did not answer in {timeout:.0f} s: {log_path.read_text()}")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def stop_launched(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Stop a command started under mlx.launch as Ctrl-C in its terminal does: SIGINT to all of its processes;
    return once every one of them has exited (killed after `timeout` seconds)."""
    try:
        os.killpg(process.pid, signal.SIGINT)
    except ProcessLookupError:  # it has stopped by itself
        process.wait()
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.poll()
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
