"""`osd serve` as a user runs it: a child process with its own redis-server, local Ray and two
Ray Serve replicas answering on loopback, stopped by Ctrl-C (SIGINT) with nothing left running."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import httpx
import psutil
from polling import wait_for
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.serve_child import wait_until_up
from deploy.demo.build import build_demo_models
from store.redis_server import free_port
from tiny_models import TINY_DEMO


def test_osd_serve_answers_from_two_replicas_and_stops_cleanly(tiny_demo, tmp_path):
    models = build_demo_models(TINY_DEMO, tiny_demo)
    port = free_port()
    command = [
        sys.executable, "-m", "deploy.cli", "serve",
        "--target", str(models.target), "--draft", str(models.draft), "--model-name", "demo",
        "--port", str(port), "--redis-dir", str(tmp_path / "redis"), "--no-trainer", "--replicas", "2",
    ]  # fmt: skip
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True)
    reader.start()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(child, base)
        wait_for(lambda: any("Ctrl-C stops" in line for line in lines), timeout=120)
        body = {"model": "demo", "prompt": "def f():", "max_tokens": 8, "temperature": 0}
        for _ in range(4):
            out = httpx.post(f"{base}/v1/completions", json=body, timeout=30).json()
            assert out["usage"]["completion_tokens"] >= 1 and out["metrics"]["draft_version"] == "draft:base"

        def replicas() -> float:
            text = httpx.get(f"{base}/metrics", timeout=10).text
            (family,) = [f for f in text_string_to_metric_families(text) if f.name == "osd:replicas"]
            return family.samples[0].value

        assert wait_for(lambda: replicas() == 2, timeout=30)  # either replica shows both
        processes = psutil.Process(child.pid).children(recursive=True)
        assert any("redis-server" in p.name() for p in processes)
    finally:
        child.send_signal(signal.SIGINT)
        child.wait(timeout=90)
        reader.join(timeout=10)
    output = "".join(lines)
    assert child.returncode == 0, output
    assert f"http://127.0.0.1:{port}/v1" in output
    assert (tmp_path / "redis" / "redis.log").exists()  # the embedded server kept its data there
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, [p.pid for p in alive]  # no redis-server, Ray or replica process left
