"""The decode loop never dies silently: a failed step fails only its requests, a request past its
deadline fails and frees its slot, and a broken loop fails every request at once and says so on
/health (tiny models, a real redis-server; faults are injected by wrapping the replica's parts)."""

from __future__ import annotations

import asyncio
import time

import pytest
from fastapi.testclient import TestClient
from polling import wait_for
from test_server_replica import PROMPT, replica
from transformers import AutoTokenizer

from deploy.demo.build import build_demo_models
from serving.errors import RequestTimeoutError, ServerBusyError, StepFailedError
from serving.http.api import create_app
from serving.replica import Finished, Replica, ReplicaConfig, Request
from store.metrics import MetricsConfig
from store.traces import StreamConfig
from tiny_models import TINY_DEMO


async def outcome(server, request: Request) -> Finished | Exception:
    try:
        return await server.complete(request)
    except Exception as err:  # noqa: BLE001 - the outcome under test
        return err


def served(server, requests: list[Request]) -> list[Finished | Exception]:
    async def run():
        return await asyncio.gather(*(outcome(server, r) for r in requests))

    return asyncio.run(run())


def http_served(redis_client, tiny_demo) -> tuple[Replica, TestClient]:
    """A replica of the tiny demo pair (it has a tokenizer) behind the HTTP app."""
    models = build_demo_models(TINY_DEMO, tiny_demo)
    config = ReplicaConfig(
        target=str(models.target), draft=str(models.draft), num_speculative_tokens=2,
        stream=StreamConfig(stream="t:faults"), metrics=MetricsConfig(prefix="t:faults:metrics"),
        engine_process=False,  # the tests break the engine's steps
    )  # fmt: skip
    server = Replica(config, redis_client)
    return server, TestClient(create_app(server, AutoTokenizer.from_pretrained(models.target), "tiny"))


def test_a_failed_step_fails_only_its_requests_and_the_next_ones_succeed(redis_client, model_dirs):
    server = replica(redis_client, model_dirs, max_batch=2)
    step, faults = server.engine.spec.step, []

    def faulty_step(k=None):
        if not faults and len(server.engine.spec.active) == 2:  # once, with both requests in the batch
            faults.append(len(server.engine.spec.active))
            raise RuntimeError("injected fault")
        return step(k)

    server.engine.spec.step = faulty_step
    try:
        requests = [Request(PROMPT, 8, stop_token_ids=[]) for _ in range(2)]
        failed = served(server, requests)
        assert faults == [2] and all(isinstance(e, StepFailedError) for e in failed), failed
        assert "injected fault" in str(failed[0])
        wait_for(lambda: not server.engine.spec.active and server.status()["in_flight"] == 0)
        later = served(server, requests)  # the loop went on, with its slots free
        assert all(isinstance(f, Finished) and len(f.generation.token_ids) == 8 for f in later), later
        server.check_health()
    finally:
        server.close()


def test_a_request_past_its_deadline_fails_and_frees_its_slot(redis_client, model_dirs):
    server = replica(redis_client, model_dirs, request_timeout=0.2, max_batch=1)
    step = server.engine.spec.step

    def slow_step(k=None):  # a step that returns only once its requests are out of time
        wait_for(lambda: all(time.perf_counter() > job.deadline for job in server._jobs.values()))
        return step(k)

    server.engine.spec.step = slow_step
    try:
        (late,) = served(server, [Request(PROMPT, 50, stop_token_ids=[])])
        assert isinstance(late, RequestTimeoutError) and "0.2 s" in str(late)
        wait_for(lambda: not server.engine.spec.active and server.status()["in_flight"] == 0)
        assert server.engine.spec.cache.rows == 0  # its slot was given back
    finally:
        server.close()


def test_a_broken_decode_loop_fails_every_request_and_health_says_503(redis_client, tiny_demo):
    server, client = http_served(redis_client, tiny_demo)
    assert client.get("/health").status_code == 200

    def broken(*_):
        raise RuntimeError("a bug outside the step")

    server.engine._admit = broken  # the loop's own code, not a step, fails
    try:
        (first,) = served(server, [Request(PROMPT, 4, stop_token_ids=[])])
        assert isinstance(first, ServerBusyError) and "a bug outside the step" in str(first)
        with pytest.raises(RuntimeError, match="decode loop has stopped"):
            server.check_health()
        health = client.get("/health")
        assert health.status_code == 503 and "a bug outside the step" in health.json()["message"]
        body = {"model": "tiny", "prompt": "def main():", "max_tokens": 4}
        refused = client.post("/v1/completions", json=body)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_busy"
    finally:
        server.close()


def test_a_failed_step_over_http_is_a_500_with_the_reason(redis_client, tiny_demo):
    server, client = http_served(redis_client, tiny_demo)
    step = server.engine.spec.step

    def failing(k=None):
        server.engine.spec.step = step  # once
        raise RuntimeError("injected fault")

    server.engine.spec.step = failing
    try:
        body = {"model": "tiny", "prompt": "def main():", "max_tokens": 4}
        failed = client.post("/v1/completions", json=body)
        assert failed.status_code == 500 and "injected fault" in failed.json()["error"]["message"]
        assert failed.json()["error"]["type"] == "server_error"
        assert client.post("/v1/completions", json=body).status_code == 200
    finally:
        server.close()
