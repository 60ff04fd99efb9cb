"""The HTTP load benchmark's client side against a tiny replica on loopback: closed-loop streaming
clients, the summary, and the swap-pause run with its publishes; a request failed mid-stream is a
failure."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json

import httpx
import pytest
from http_server import serving
from polling import wait_for
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.http_load import closed_loop, count_to, stream_one, summarize, swap_run
from serving.http.api import create_app
from store.registry import Registry


@pytest.fixture
def tiny_server(tiny_replica):
    make, models = tiny_replica
    replica = make("load")
    with serving(create_app(replica, AutoTokenizer.from_pretrained(models.target), "demo")) as base:
        yield replica, models, base


PROMPTS = [[5, 17, 42, 9], [3, 77, 12, 8, 19]]


def test_closed_loop_clients_stream_the_requests_asked_for(tiny_server):
    _, _, base = tiny_server
    failures: list[str] = []
    run = asyncio.run(closed_loop(base, itertools.cycle(PROMPTS), 3, 8, count_to(7), failures))
    assert failures == [] and len(run[0]) == 7
    assert all(d.start <= d.first <= d.end and d.tokens == 8 for d in run[0])
    summary = summarize([run, run])
    assert summary["requests"] == 14 and summary["tokens_per_s"] > 0
    assert summary["latency_p50_s"] <= summary["latency_p99_s"]


def test_the_swap_run_publishes_and_splits_requests_by_whether_a_swap_landed(tiny_server):
    replica, models, base = tiny_server
    weights = {
        n: t.clone() for n, t in AutoModelForCausalLM.from_pretrained(models.draft).state_dict().items()
    }
    args = argparse.Namespace(swap_seconds=3.0, swap_every=1.0, max_tokens=8)
    failures: list[str] = []
    swap = asyncio.run(
        swap_run(base, itertools.cycle(PROMPTS), Registry(replica.client), weights, args, failures)
    )
    assert failures == [] and swap["publishes"] == 2  # at 0.5 s and 1.5 s
    assert swap["in_flight_at_a_swap"]["requests"] + swap["others"]["requests"] > 0
    wait_for(lambda: replica.draft_version == "draft:v2")  # the last publish is what it serves


def test_a_request_the_server_fails_mid_stream_is_counted_as_failed():
    def fail_after_one_chunk(request: httpx.Request) -> httpx.Response:
        chunk = {"choices": [{"text": "a"}]}
        error = {"error": {"message": "the engine failed", "code": 503}}
        body = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(error)}\n\ndata: [DONE]\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    async def run() -> None:
        async with httpx.AsyncClient(
            transport=httpx.MockTransport(fail_after_one_chunk), base_url="http://t"
        ) as http:
            await stream_one(http, [1, 2], 4)

    with pytest.raises(RuntimeError, match="stream failed: .*the engine failed"):
        asyncio.run(run())
