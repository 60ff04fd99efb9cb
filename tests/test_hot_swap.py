"""Hot-swap under load over HTTP: clients stream without pause while three versions are published
and one rolled back, for a draft model and for Hydra heads (verified as a tree, these greedy
requests); and a client that disconnects mid-stream frees its slot."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import torch
from http_server import serving
from polling import wait_for
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.api import create_app
from store.registry import Registry
from tiny_models import random_heads

TOKEN = "swap-test-token"
BODY = {"model": "demo", "prompt": "def main():\n    ", "max_tokens": 24, "temperature": 0, "stream": True}


@pytest.fixture(params=["draft", "heads"])
def stack(request, tiny_replica):
    """(replica, registry, publish(seed): a new version of what it serves, base URL)."""
    make, models = tiny_replica
    if request.param == "draft":
        replica = make("swap")
        draft = AutoModelForCausalLM.from_pretrained(models.draft).state_dict()

        def publish(seed: int) -> None:
            generator = torch.Generator().manual_seed(seed)
            noise = {n: t + 0.02 * torch.randn(t.shape, generator=generator) for n, t in draft.items()}
            Registry(replica.client).publish("draft", noise)
    else:
        replica = make("swap-heads", draft=None, proposer="hydra", heads_tree=(2, 1))
        target = AutoModelForCausalLM.from_pretrained(models.target)

        def publish(seed: int) -> None:
            heads = random_heads(target, "hydra", seed, num_heads=2).state_dict()
            extra = {"heads": {"kind": "hydra", "num_heads": 2}}
            Registry(replica.client).publish("draft", heads, kind="heads", extra=extra)

    app = create_app(replica, AutoTokenizer.from_pretrained(models.target), "demo", admin_token=TOKEN)
    with serving(app) as base:
        yield replica, publish, base


def stream_once(http: httpx.Client) -> tuple[str, str]:
    """One streamed completion: its text and the draft version its final chunk names."""
    with http.stream("POST", "/v1/completions", json=BODY) as response:
        assert response.status_code == 200, response.read()
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    text = "".join(event["choices"][0]["text"] for event in events if event["choices"])
    return text, events[-1]["metrics"]["draft_version"]


def test_clients_stream_through_three_publishes_and_a_rollback_with_no_failure(stack):
    replica, publish, base = stack
    done, failures, stopping = [], [], threading.Event()

    def client() -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            while not stopping.is_set():
                try:
                    done.append(stream_once(http))
                except (AssertionError, httpx.HTTPError, KeyError, ValueError) as err:
                    failures.append(repr(err))

    def served_some(n: int = 3) -> None:  # a few more responses on whatever is live now
        count = len(done)
        wait_for(lambda: len(done) >= count + n, timeout=60)

    clients = [threading.Thread(target=client) for _ in range(3)]
    for thread in clients:
        thread.start()
    try:
        served_some()
        for version, seed in ((1, 11), (2, 12), (3, 13)):
            publish(seed)
            wait_for(lambda v=version: replica.draft_version == f"draft:v{v}", timeout=30)
            served_some()
        rollback = httpx.post(
            f"{base}/admin/rollback", json={}, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
        )
        assert rollback.status_code == 200, rollback.text
        wait_for(lambda: replica.draft_version == "draft:v2", timeout=30)
        served_some()
    finally:
        stopping.set()
        for thread in clients:
            thread.join(60)
    assert failures == []
    texts = {text for text, _ in done}
    assert len(texts) == 1  # greedy output is the target's, whichever draft served it
    versions = [version for _, version in done]
    assert {"draft:base", "draft:v1", "draft:v2", "draft:v3"} <= set(versions)
    assert replica.swaps == 4 and replica.refused == 0  # v1, v2, v3, and v2 again


def test_a_client_that_disconnects_mid_stream_frees_its_slot(stack):
    replica, _, base = stack
    appended = replica.writer.stats().appended
    with httpx.Client(base_url=base, timeout=60) as http:
        long = BODY | {"max_tokens": None}  # the rest of the context: 120 tokens
        with http.stream("POST", "/v1/completions", json=long) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # the first chunk, then hang up
        wait_for(lambda: replica.status()["in_flight"] == 0, timeout=5)
        text, _ = stream_once(http)  # the decoder is free for the next request
    assert text
    wait_for(lambda: replica.writer.stats().appended > appended, timeout=5)  # logged just after the reply
    assert replica.writer.stats().appended == appended + 1  # the abandoned request left no trace
