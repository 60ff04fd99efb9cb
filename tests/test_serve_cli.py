"""`osd serve` as a user runs it: a child process with its own redis-server, local Ray and two
Ray Serve replicas answering the official `openai` client on loopback, stopped by Ctrl-C (SIGINT)
with nothing left running."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import httpx
import openai
import psutil
import pytest
from polling import wait_for
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from benchmarks.serve_child import wait_until_up
from deploy.demo.build import build_demo_models
from serving.engine import SpecEngine
from store.redis_server import free_port
from tiny_models import TINY_DEMO

PROMPT = "def main():\n    "


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
        check_with_the_openai_client(base, models)

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


def check_with_the_openai_client(base: str, models) -> None:
    """Completion (the target's greedy text), chat, streaming with usage, and errors as the
    client's exception types, through Ray Serve's proxy."""
    api = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in api.models.list()] == ["demo"]
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    greedy = SpecEngine.from_pretrained(models.target).generate(ids, 16).token_ids
    completion = api.completions.create(model="demo", prompt=PROMPT, max_tokens=16, temperature=0)
    assert completion.choices[0].text == tokenizer.decode(greedy, skip_special_tokens=True)
    assert completion.model_extra["metrics"]["draft_version"] == "draft:base"
    messages = [{"role": "user", "content": "hi"}]
    chat = api.chat.completions.create(model="demo", messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    chunks = list(
        api.chat.completions.create(
            model="demo", messages=messages, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        api.completions.create(model="demo", prompt=PROMPT, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="not served here"):
        api.completions.create(model="gpt-4", prompt=PROMPT)
