"""`osd serve` as a child process for the HTTP benchmarks: started with flags, waited for until it
answers, and stopped with Ctrl-C (SIGINT) as a user stops it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import httpx
from rich.console import Console


@contextmanager
def osd_serve(
    flags: list[str], port: int, log: Path, console: Console | None = None
) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run `osd serve <flags> --port <port>` (output to `log`); yields (process, base URL) once up."""
    with open(log, "w") as out:
        command = [sys.executable, "-m", "deploy.cli", "serve", *flags, "--port", str(port)]
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            with console.status(f"starting osd serve on port {port}") if console else nullcontext():
                wait_until_up(server, base)
            yield server, base
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(120)


def wait_until_up(server: subprocess.Popen, base: str, timeout: float = 900.0) -> None:
    """Wait for `server` to answer /health; a vLLM start (compilation included) on a busy machine
    can take many minutes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"osd serve exited with {server.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"osd serve did not answer within {timeout:.0f} s")
