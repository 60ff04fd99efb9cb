"""`osd serve` as a user runs it: a child process with its own redis-server, answering on loopback,
stopped by Ctrl-C (SIGINT) with nothing left running."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx

from deploy.demo.build import build_demo_models
from store.redis_server import free_port
from tiny_models import TINY_DEMO


def test_osd_serve_answers_and_stops_cleanly(tiny_demo, tmp_path):
    models = build_demo_models(TINY_DEMO, tiny_demo)
    port = free_port()
    command = [
        sys.executable, "-m", "deploy.cli", "serve",
        "--target", str(models.target), "--draft", str(models.draft), "--model-name", "demo",
        "--port", str(port), "--redis-dir", str(tmp_path / "redis"), "--no-trainer",
    ]  # fmt: skip
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert child.poll() is None, child.stdout.read()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "osd serve did not come up"
            time.sleep(0.2)
        body = {"model": "demo", "prompt": "def f():", "max_tokens": 8, "temperature": 0}
        out = httpx.post(f"{base}/v1/completions", json=body, timeout=30).json()
        assert out["usage"]["completion_tokens"] >= 1 and out["metrics"]["draft_version"] == "draft:base"
    finally:
        child.send_signal(signal.SIGINT)
        output, _ = child.communicate(timeout=60)
    assert child.returncode == 0, output
    assert f"http://127.0.0.1:{port}/v1" in output
    assert (tmp_path / "redis" / "redis.log").exists()  # the embedded server kept its data there
