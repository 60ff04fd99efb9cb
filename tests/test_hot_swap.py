"""Hot-swap under load over HTTP: clients stream without pause while three versions are published
and one rolled back, for a draft model and for Hydra heads (verified as a tree, these greedy
requests); and a client that disconnects mid-stream frees its slot."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest
import torch
from http_server import serving
from polling import PATIENCE, wait_for
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.http.api import create_app
from serving.replica import Replica
from store.registry import Registry
from tiny_models import random_heads

TOKEN = "swap-test-token"
BODY = {"model": "demo", "prompt": "def main():\n    ", "max_tokens": 24, "temperature": 0, "stream": True}


@dataclass
class Stack:
    replica: Replica
    publish: Callable[[int], None]  # publish(seed): a new version of what the replica serves
    base: str  # the server's URL
    sent: threading.Event  # set once the server has sent a client a streamed event


def noting_sent_events(app, sent: threading.Event):
    """`app`, setting `sent` once it has handed a client an SSE event (`data: {...}`)."""

    async def asgi(scope, receive, send):
        async def send_and_note(message):
            await send(message)
            if message["type"] == "http.response.body" and message.get("body", b"").startswith(b"data: {"):
                sent.set()

        await app(scope, receive, send_and_note)

    return asgi


@pytest.fixture(params=["draft", "heads"])
def stack(request, tiny_replica) -> Stack:
    """A replica serving a draft model or draft heads over HTTP; "process": the draft model, decoded
    in the engine's own process (serving.engine.process)."""
    make, models = tiny_replica
    if request.param in ("draft", "process"):
        replica = make("swap", engine_process=request.param == "process")
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
    sent = threading.Event()
    with serving(noting_sent_events(app, sent)) as base:
        yield Stack(replica, publish, base, sent)


def stream_once(http: httpx.Client) -> tuple[str, str]:
    """One streamed completion: its text and the draft version its final chunk names."""
    with http.stream("POST", "/v1/completions", json=BODY) as response:
        assert response.status_code == 200, response.read()
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    text = "".join(event["choices"][0]["text"] for event in events if event["choices"])
    return text, events[-1]["metrics"]["draft_version"]


@pytest.mark.parametrize("stack", ["draft", "heads", "process"], indirect=True)
def test_clients_stream_through_three_publishes_and_a_rollback_with_no_failure(stack):
    replica, publish, base = stack.replica, stack.publish, stack.base
    done, failures, stopping = [], [], threading.Event()

    def client() -> None:
        with httpx.Client(base_url=base, timeout=PATIENCE) as http:
            while not stopping.is_set():
                try:
                    done.append(stream_once(http))
                except (AssertionError, httpx.HTTPError, KeyError, ValueError) as err:
                    failures.append(repr(err))

    def served_by(version: str, n: int = 3) -> None:
        """Wait for n more responses served by `version` (those begun on the version before it
        finish on it, so a count of any responses would not do)."""
        start = len(done)
        wait_for(lambda: failures or sum(v == version for _, v in done[start:]) >= n)

    clients = [threading.Thread(target=client) for _ in range(3)]
    for thread in clients:
        thread.start()
    try:
        served_by("draft:base")
        for version, seed in ((1, 11), (2, 12), (3, 13)):
            publish(seed)
            wait_for(lambda v=version: replica.draft_version == f"draft:v{v}")
            served_by(f"draft:v{version}")
        rollback = httpx.post(
            f"{base}/admin/rollback", json={}, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=PATIENCE
        )
        assert rollback.status_code == 200, rollback.text
        wait_for(lambda: replica.draft_version == "draft:v2")
        served_by("draft:v2")
    finally:
        stopping.set()
        for thread in clients:
            thread.join(PATIENCE)
    assert failures == []
    texts = {text for text, _ in done}
    assert len(texts) == 1  # greedy output is the target's, whichever draft served it
    versions = [version for _, version in done]
    assert {"draft:base", "draft:v1", "draft:v2", "draft:v3"} <= set(versions)
    assert replica.status()["swaps"] == 4 and replica.refused == 0  # v1, v2, v3, and v2 again


class Lockstep:
    """Paces the replica's decoder by a streaming client that hangs up after its first event: the
    decoder takes a step only once the API has handled the last one and asked for more, and none
    from the moment an event has been sent until the API has let go of the request (the hang-up
    noticed). So, however the threads are scheduled, the request can neither run ahead of what the
    client was sent nor finish before its client's hang-up is noticed."""

    def __init__(self, replica: Replica, sent: threading.Event, monkeypatch):
        self.asked = self.taken = 0  # events the API asked the replica for; decode steps taken
        self.sent, self.released = sent, threading.Event()
        stream, step = replica.stream, replica.engine.spec.step

        async def counted(request):
            inner = stream(request)
            try:
                while True:
                    self.asked += 1
                    try:
                        event = await anext(inner)
                    except StopAsyncIteration:
                        return
                    yield event
            finally:
                await inner.aclose()
                self.released.set()

        def paced(*args, **kwargs):
            wait_for(lambda: self.released.is_set() or (self.asked > self.taken and not self.sent.is_set()))
            self.taken += 1
            return step(*args, **kwargs)

        monkeypatch.setattr(replica, "stream", counted)
        monkeypatch.setattr(replica.engine.spec, "step", paced)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(stack, monkeypatch):
    replica, base = stack.replica, stack.base
    lockstep = Lockstep(replica, stack.sent, monkeypatch)
    appended = replica.writer.stats().appended
    with httpx.Client(base_url=base, timeout=PATIENCE) as http:
        long = BODY | {"max_tokens": None}  # the rest of the context: 120 tokens
        with http.stream("POST", "/v1/completions", json=long) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # the first chunk, then hang up
        wait_for(lambda: replica.status()["in_flight"] == 0)
        assert lockstep.released.is_set()  # the server noticed the hang-up: that freed the slot
        text, _ = stream_once(http)  # the decoder is free for the next request
    assert text
    assert replica.writer.stats().appended == appended + 1  # the abandoned request left no trace
