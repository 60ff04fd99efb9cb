"""`osd demo --quick` from an empty model cache, as a new user's first run: the quick pair is built,
the stack (as `osd serve` runs it: embedded redis-server, local Ray, two Ray Serve replicas, the
trainer) serves the phased workload over HTTP, the trainer learns from its traces, and the summary
holds the numbers the issue asks for. The trainer gets its steps explicitly (`--train-steps`:
lockstep, a fixed number of steps after every window of requests), so what it learns does not
depend on how much idle CPU it happened to get; learning is judged on the draft's expected
acceptance on the run's held-out traces, which depends only on weights and traces. With
--keep-running the stack stays up: the official `openai` client checks the API through Ray
Serve's proxy (completions, and chat through the demo pair's ChatML template); then Ctrl-C leaves
no process behind, and the output no traceback. The slowest test of the suite (about 4 minutes on
2 cores); it also makes the checks of the quick pair's build. A quarter of the workload goes
through the chat API."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from polling import PATIENCE, wait_for
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from deploy.demo.build import PRESETS, cached
from deploy.demo.run import PLANS, main
from serving.engine.hf import SpecEngine
from store.redis_server import free_port

PROMPT = "def main():\n    "
TRAIN_STEPS = 8  # after every window of 16 requests


@pytest.mark.slow
def test_quick_demo_learns_online_over_http_and_stops_cleanly(tmp_path):
    port, summary = free_port(), tmp_path / "demo.json"
    command = [
        sys.executable, "-m", "deploy.cli", "demo", "--quick", "--train-steps", str(TRAIN_STEPS),
        "--json", str(summary), "--keep-running",
        "--port", str(port), "--cache-dir", str(tmp_path / "models"), "--state-dir", str(tmp_path / "state"),
    ]  # fmt: skip
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True)
    reader.start()
    try:
        # the summary, its plot (matplotlib's first import can be slow), then the stack stays up; the
        # guard is against a hang only (a fresh clone beside other suites took over 900 s once)
        up = lambda: "Ctrl-C stops it" in " ".join("".join(lines).split())  # noqa: E731
        assert wait_for(lambda: up() or child.poll() is not None, timeout=1800), "".join(lines)
        assert summary.exists() and up(), "".join(lines)
        processes = psutil.Process(child.pid).children(recursive=True)
        assert any("redis-server" in p.name() for p in processes)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/dashboard", timeout=PATIENCE).status_code == 200  # still up, as promised
        check_with_the_openai_client(base, "osd-demo-quick", tmp_path / "models" / "quick" / "target")
        families = text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=PATIENCE).text)
        assert {f.name: f for f in families}["osd:replicas"].samples[0].value == 2  # either shows both
    finally:
        child.send_signal(signal.SIGINT)
        child.wait(timeout=PATIENCE)
        reader.join(timeout=10)
    output = "".join(lines)
    assert child.returncode == 0, output
    assert "Traceback" not in output and "failed" not in output.split("Ctrl-C stops it")[-1], output
    _, alive = psutil.wait_procs(processes, timeout=PATIENCE)
    assert not alive, [p.cmdline() for p in alive]  # no redis-server, Ray, replica or trainer left

    report = json.loads(summary.read_text())
    assert summary.with_suffix(".png").stat().st_size > 10_000
    plan = PLANS["quick"]
    assert report["requests"] == sum(p.requests for p in plan.phases) and report["train_steps"] == TRAIN_STEPS
    assert report["failed"] == 0, report["errors"]
    chat = report["endpoints"]["chat"]  # every fourth request went through /v1/chat/completions
    assert chat["requests"] == report["requests"] // plan.chat_every and chat["acceptance"] is not None
    assert report["published"], report["events"]
    # What the draft learnt, on the held-out traces of the run's main code phase: the live version
    # against the starting draft, by expected acceptance (weights and traces only, no timing).
    code = max(report["phases"], key=lambda p: p["requests"])
    learnt = report["held_out"][code["domain"]]
    assert learnt["traces"] >= 5 and learnt["live"] >= learnt["starting"] + 0.15, report["held_out"]
    # and served: each window ran on what the trainer had published after the windows before it
    assert code["last_window"]["acceptance"] > code["first_window"]["acceptance"], report["phases"]
    assert report["speedup"]["live_vs_ar"] > 0
    assert f"http://127.0.0.1:{port}/dashboard" in output

    # The build from an empty cache: the target learnt every domain; the prose-only draft starts
    # poorer on code than on prose.
    held_out = cached(PRESETS["quick"], tmp_path / "models").manifest["held_out"]
    assert all(loss < 6.0 for loss in held_out["target_loss"].values())
    acceptance = held_out["expected_acceptance"]
    assert acceptance["prose"] > max(acceptance["python"], acceptance["c"]) + 0.05


def check_with_the_openai_client(base: str, model: str, target: Path) -> None:
    """Completion and chat (the target's greedy text, the chat's on its ChatML prompt), streaming
    with usage, and errors as the client's exception types, through Ray Serve's proxy."""
    api = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in api.models.list()] == [str(target), model]  # the target as given, the alias
    tokenizer = AutoTokenizer.from_pretrained(target)
    engine = SpecEngine.from_pretrained(str(target))
    greedy = engine.generate(tokenizer.encode(PROMPT, add_special_tokens=False), 16).token_ids
    completion = api.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
    assert completion.choices[0].text == tokenizer.decode(greedy, skip_special_tokens=True)
    assert completion.model_extra["metrics"]["draft_version"].startswith("draft:v")  # from the registry
    messages = [{"role": "user", "content": "hi"}]
    chat = api.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    chatml = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chatml == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    greedy = engine.generate(tokenizer.encode(chatml, add_special_tokens=False), 8).token_ids
    assert chat.choices[0].message.content == tokenizer.decode(greedy, skip_special_tokens=True)
    chunks = list(
        api.chat.completions.create(
            model=model, messages=messages, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        api.completions.create(model=model, prompt=PROMPT, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="not served here"):
        api.completions.create(model="gpt-4", prompt=PROMPT)


@pytest.mark.parametrize(
    "flags",
    [
        ["--engine", "vllm", "--adapters"],
        ["--engine", "vllm", "--proposer", "hydra"],
        ["--proposer", "medusa", "--adapters"],
    ],
)
def test_the_demo_refuses_settings_that_cannot_serve_together_before_it_builds_anything(
    flags, capsys, tmp_path
):
    with pytest.raises(SystemExit) as exited:
        main([*flags, "--cache-dir", str(tmp_path / "cache")])
    assert exited.value.code == 2 and "drop --proposer" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
