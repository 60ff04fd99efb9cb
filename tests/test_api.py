"""The OpenAI-compatible API over a replica of the tiny demo pair: FastAPI's test client for the
routes and errors (the official `openai` client against a real `osd serve` is in test_serve_cli)."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections import Counter

import pytest
from fastapi.testclient import TestClient
from polling import wait_for
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from deploy.demo.build import build_demo_models
from serving.engine.hf import SpecEngine
from serving.http.api import create_app
from serving.replica import Replica, ReplicaConfig
from store.metrics import MetricsConfig
from store.traces import StreamConfig
from tiny_models import TINY_DEMO

MODEL = "demo"
PROMPT = "def main():\n    "


@pytest.fixture(scope="module")
def served(tiny_demo, redis_server):
    models = build_demo_models(TINY_DEMO, tiny_demo)
    config = ReplicaConfig(
        target=str(models.target), draft=str(models.draft), num_speculative_tokens=2,
        stream=StreamConfig(stream="t:api"), metrics=MetricsConfig(prefix="t:api:metrics"), adaptive_k=False,
        engine_process=False,  # a test holds the engine's steps
    )  # fmt: skip
    client = redis_server.client()
    client.flushdb()  # no draft versions left by earlier tests: the replica serves its base draft
    replica = Replica(config, client)
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    yield replica, tokenizer, create_app(replica, tokenizer, MODEL), models
    replica.close()


@pytest.fixture(scope="module")
def client(served):
    with TestClient(served[2]) as test_client:
        yield test_client


def greedy_text(served, prompt: str, max_tokens: int) -> str:
    _, tokenizer, _, models = served
    engine = SpecEngine.from_pretrained(models.target)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    return tokenizer.decode(engine.generate(ids, max_tokens).token_ids, skip_special_tokens=True)


def sse_events(response) -> list:
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def test_completion_is_the_target_greedy_text_with_usage_and_metrics(served, client):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["object"] == "text_completion"
    assert out["choices"][0]["text"] == greedy_text(served, PROMPT, 24)
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    assert out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"] == out["usage"]["total_tokens"]
    assert out["metrics"]["draft_version"] == "draft:base" and out["metrics"]["spec_steps"] >= 1


def test_streaming_gives_the_same_text_then_usage_and_done(served, client):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()
    response = client.post(
        "/v1/completions", json=body | {"stream": True, "stream_options": {"include_usage": True}}
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    chunks = events[:-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == whole["choices"][0]["finish_reason"]


def test_metrics_count_the_requests_served_in_prometheus_format(client):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "metadata": {"domain": "py"}}
    assert client.post("/v1/completions", json=body).status_code == 200
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    (drafts,) = [s for s in families["osd:spec_decode_num_drafts"].samples if s.labels["domain"] == "py"]
    assert drafts.labels["draft_version"] == "draft:base" and drafts.value >= 1
    assert {"osd:time_to_first_token_seconds", "osd:traces_dropped", "osd:draft_swaps"} <= set(families)


def test_a_drop_in_a_domain_s_acceptance_is_an_alert_in_json_and_in_metrics(served, client):
    recorder, now = served[0].recorder, time.time()
    for i in range(100):  # ~17 minutes of history, then acceptance falls from 0.6 to 0.2
        accepted = 180 if i < 90 else 60
        recorder.record("draft:v1", "shift", Counter(accepted=accepted, drafted=300), at=now - (100 - i) * 10)
    assert recorder.flush()  # in Redis now, whatever the background flush was doing
    alerts = client.get("/alerts").json()["alerts"]
    (drop,) = [a for a in alerts if a["domain"] == "shift"]
    assert "new_domain" not in {a["kind"] for a in alerts}  # no adapters: the shared draft serves all
    assert drop["kind"] == "drop" and 0 <= drop["delay_seconds"] <= 50
    assert drop["baseline"] == pytest.approx(0.6, abs=0.02) and drop["current"] < 0.45
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    assert {"domain": "shift", "kind": "drop"} in [s.labels for s in families["osd:drift_alert"].samples]


def test_chat_completion_and_its_stream(client):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 12,
        "temperature": 0,
    }
    out = client.post("/v1/chat/completions", json=body).json()
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    events = sse_events(client.post("/v1/chat/completions", json=body | {"stream": True}))
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == out["choices"][0]["message"]["content"]


def test_a_stop_string_ends_the_text_before_it(served, client):
    full = greedy_text(served, PROMPT, 40)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stop": [stop]}
    out = client.post("/v1/completions", json=body).json()
    assert out["choices"][0]["text"] == full[: full.find(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "other", "prompt": "x"}, "model"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 10**6}, "max_tokens"),
        ({"model": MODEL, "prompt": [1] * 10_000, "max_tokens": 1}, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "temperature": -1}, None),
        ({"model": MODEL, "prompt": "x", "n": 2}, "n"),
        ({"model": MODEL, "prompt": "x", "stop": ["a", ""]}, "stop"),
        ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": MODEL, "prompt": 5}, "prompt"),
        ({"model": MODEL, "prompt": "x", "metadata": {"domain": "a|b"}}, "metadata.domain"),
        ({"prompt": "x"}, "model"),
    ],
)
def test_bad_requests_get_a_400_with_an_openai_error_body(client, body, param):
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param or error["param"].startswith(param)


def test_malformed_json_and_bytes_get_a_400(client):
    for raw in (b"{not json", b'{"model": "demo", "prompt": "\xff\xfe"}'):
        response = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"]


def test_a_client_that_hangs_up_mid_send_leaves_the_replica_at_once(served, monkeypatch):
    """The hang-up arrives while the server is sending a chunk (the events generator suspended at
    its yield, not awaiting the replica): the request still leaves the replica then, not whenever
    the garbage collector gets to the abandoned generator (off here, to show it). The decoder holds
    after the first step until the request has left, so that it cannot finish first."""
    replica, _, app, _ = served
    step, taken = replica.engine.spec.step, []

    def held(*args, **kwargs):
        if taken:
            wait_for(lambda: not replica._jobs, timeout=30)
        taken.append(True)
        return step(*args, **kwargs)

    monkeypatch.setattr(replica.engine.spec, "step", held)
    request = {"model": MODEL, "prompt": PROMPT, "max_tokens": None, "temperature": 0, "stream": True}
    body = json.dumps(request).encode()
    hung_up = asyncio.Event()
    received = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if received:
            return received.pop()
        await hung_up.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            hung_up.set()  # the client goes away while this chunk is being sent
            await asyncio.sleep(0.1)

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
        "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip

    async def request() -> bool:
        await app(scope, receive, send)
        return not replica._jobs  # it left when the response ended (the loop still runs)

    appended = replica.writer.stats().appended
    gc.disable()
    try:
        assert asyncio.run(request())
    finally:
        gc.enable()
    wait_for(lambda: replica.status()["in_flight"] == 0)
    assert replica.writer.stats().appended == appended  # abandoned: it left no trace
