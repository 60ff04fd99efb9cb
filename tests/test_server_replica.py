"""The serving replica on tiny models and a real redis-server: output, traces, metrics, load,
back-pressure, abandoned requests and hot-swap of draft versions."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from polling import PATIENCE, wait_for
from transformers import AutoModelForCausalLM

from distill.lora import LoraSpec, adapter_weights, wrap_lora
from serving.engine.hf import SpecEngine, Step
from serving.errors import InvalidRequestError, ServerBusyError
from serving.replica import Finished, Replica, ReplicaConfig, Request
from store.load import read_load
from store.metrics import MetricsConfig, read_series
from store.registry import ALL_DOMAINS, Registry
from store.traces import StreamConfig, TraceReader

PROMPT = [5, 17, 42, 9, 3, 77]
STREAM = StreamConfig(stream="t:replica")
METRICS = MetricsConfig(prefix="t:replica:metrics", flush_seconds=0.05)


def replica(client, model_dirs, **overrides) -> Replica:
    settings = dict(
        target=str(model_dirs["llama"]["target"]),
        draft=str(model_dirs["llama"]["small"]),
        num_speculative_tokens=3,
        stream=STREAM,
        metrics=METRICS,
        poll_seconds=0.1,
        replica_id="r-test",
        adaptive_k=False,  # every step drafts, so acceptance is always counted
        engine_process=False,  # the tests reach into the engine
    )
    return Replica(ReplicaConfig(**settings | overrides), client)


def draft_weights(model_dirs, scale: float) -> dict[str, torch.Tensor]:
    """The small draft's weights, perturbed: a different but compatible version."""
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]["small"])
    generator = torch.Generator().manual_seed(int(scale * 1000))
    return {n: t + scale * torch.randn(t.shape, generator=generator) for n, t in model.state_dict().items()}


def test_a_request_is_served_traced_metered_and_its_load_published(redis_client, model_dirs):
    server = replica(redis_client, model_dirs)
    assert not any(f["name"].startswith("osd:suffix") for f in server.metrics_snapshot())  # a draft serves
    expected = SpecEngine.from_pretrained(model_dirs["llama"]["target"]).generate(
        PROMPT, 12, stop_token_ids=[]
    )

    async def run():
        return [
            event async for event in server.stream(Request(PROMPT, 12, stop_token_ids=[], domain="python"))
        ]

    events = asyncio.run(run())
    finished = events[-1]
    assert isinstance(finished, Finished) and all(isinstance(e, Step) for e in events[:-1])
    assert (
        [t for e in events[:-1] for t in e.token_ids] == finished.generation.token_ids == expected.token_ids
    )
    assert finished.draft_version == "draft:base" and 0 < finished.ttft_seconds <= finished.seconds
    wait_for(
        lambda: (
            [(load.replica, load.draft_version) for load in read_load(redis_client)]
            == [("r-test", "draft:base")]
        )
    )
    server.close(timeout=PATIENCE)  # its trace and metrics written (the timeout only guards a hang)
    assert read_load(redis_client) == []  # a closed replica's heartbeat goes at once
    (delivery,) = TraceReader(redis_client, "c", STREAM).read(count=10)
    assert delivery.trace.domain == "python" and delivery.trace.draft_versions == ("draft:base",)
    assert list(delivery.trace.output_ids) == expected.token_ids and delivery.trace.top_ids.shape == (12, 16)
    (point,) = read_series(redis_client, METRICS)
    assert (point.version, point.domain) == ("draft:base", "python")
    assert point.counts["requests"] == 1 and point.counts["tokens"] == 12


def test_bad_requests_are_refused_and_the_replica_goes_on(redis_client, model_dirs):
    server = replica(redis_client, model_dirs)

    async def run():
        with pytest.raises(InvalidRequestError):
            await server.complete(Request(PROMPT, 0))
        with pytest.raises(InvalidRequestError):
            await server.complete(Request(PROMPT, 4, temperature=-1.0))
        return await server.complete(Request(PROMPT, 4))

    assert len(asyncio.run(run()).generation.token_ids) <= 4
    for domain in ("", "a|b", "x" * 65, "naïve"):
        with pytest.raises(InvalidRequestError, match="domain"):
            Request(PROMPT, 4, domain=domain)
    server.close()


def test_a_full_queue_refuses_and_an_abandoned_request_frees_the_decoder(
    redis_client, model_dirs, monkeypatch
):
    server = replica(redis_client, model_dirs, max_queue=1, max_batch=1)  # one decodes, one waits
    # The decode thread takes the long request's first step, then holds before its second until
    # the test has filled the queue and hung up: the long request cannot finish first, however fast
    # the decoder runs, and every step taken after the hang-up is counted (engine.steps).
    first_taken, go_on, step = threading.Event(), threading.Event(), server.engine.spec.step

    def held_step(*args, **kwargs):
        if first_taken.is_set():
            go_on.wait()
        first_taken.set()
        return step(*args, **kwargs)

    monkeypatch.setattr(server.engine.spec, "step", held_step)

    async def run():
        long = server.stream(Request(PROMPT, 200, stop_token_ids=[]))
        await anext(long)  # decoding now: the queue is empty again
        waiting = asyncio.ensure_future(server.complete(Request(PROMPT, 3, stop_token_ids=[])))
        await asyncio.to_thread(wait_for, lambda: server.status()["queued"] == 1)  # behind the long one
        with pytest.raises(ServerBusyError):
            await server.complete(Request(PROMPT, 3))
        steps = server.engine.spec.steps
        await long.aclose()  # the client went away
        go_on.set()
        finished = await waiting
        return finished, server.engine.spec.steps - steps

    try:
        finished, steps = asyncio.run(run())
    finally:
        go_on.set()
    assert len(finished.generation.token_ids) == 3 and finished.generation.stats.steps <= 3
    # The long request took the step it was held before, then left: 200 tokens would take at
    # least 50 steps at k = 3.
    assert steps == 1 + finished.generation.stats.steps
    server.close(timeout=PATIENCE)
    traces = TraceReader(redis_client, "c", STREAM).read(count=10)
    assert [len(d.trace.output_ids) for d in traces] == [3]  # the abandoned request left no trace


def test_concurrent_requests_share_steps_and_each_gets_its_own_greedy_output(redis_client, model_dirs):
    """Continuous batching: six requests of different lengths and prompts (more than max_batch, so
    some join as others leave), one sampled with a seed, each served as if alone."""
    server = replica(redis_client, model_dirs, max_batch=4)
    alone = SpecEngine.from_pretrained(model_dirs["llama"]["target"])
    requests = [
        Request(PROMPT[: 2 + i] + [i + 9], 6 + 5 * i, stop_token_ids=[], domain=f"d{i}") for i in range(5)
    ] + [Request(PROMPT, 20, temperature=0.8, seed=7, stop_token_ids=[])]

    async def run():
        return await asyncio.gather(*(server.complete(r) for r in requests))

    results = asyncio.run(run())
    for request, finished in zip(requests[:5], results[:5], strict=True):
        expected = alone.generate(request.prompt_ids, request.max_new_tokens, stop_token_ids=[]).token_ids
        assert finished.generation.token_ids == expected
    again = asyncio.run(server.complete(requests[5]))  # alone now: the seed gives the same sample
    assert again.generation.token_ids == results[5].generation.token_ids
    wait_for(lambda: server.status()["in_flight"] == 0)  # counted out just after its caller heard
    server.close()


def test_the_live_version_is_loaded_at_start_and_copied_in_place_mid_request(redis_client, model_dirs):
    registry = Registry(redis_client)
    registry.publish("draft", draft_weights(model_dirs, 0.01))
    server = replica(redis_client, model_dirs)
    assert server.draft_version == "draft:v1"  # before the first request
    live = server.engine.drafts[ALL_DOMAINS].proposer
    target_greedy = SpecEngine.from_pretrained(model_dirs["llama"]["target"]).generate(
        PROMPT, 40, stop_token_ids=[]
    )

    async def run():
        during = server.stream(Request(PROMPT, 40, stop_token_ids=[]))
        await anext(during)
        registry.publish("draft", draft_weights(model_dirs, 0.02))
        await asyncio.to_thread(wait_for, lambda: server.draft_version == "draft:v2")
        events = [event async for event in during]
        after = await server.complete(Request(PROMPT, 40, stop_token_ids=[]))
        return events[-1], after

    during, after = asyncio.run(run())
    assert during.draft_versions == ("draft:v1", "draft:v2") and after.draft_versions == ("draft:v2",)
    assert during.generation.token_ids == after.generation.token_ids == target_greedy.token_ids  # lossless
    assert (
        server.engine.drafts[ALL_DOMAINS].proposer is live and live.weights == 2
    )  # the same draft, new weights
    weights = draft_weights(model_dirs, 0.02)
    assert all(torch.equal(t, weights[n]) for n, t in live.model.state_dict().items())
    status = server.status()
    assert status["swaps"] == 2 and status["last_swap_seconds"] >= status["last_swap_pause_seconds"] > 0
    server.close()


def test_a_version_that_does_not_fit_is_refused_and_serving_goes_on(redis_client, model_dirs):
    registry = Registry(redis_client)
    registry.publish("draft", draft_weights(model_dirs, 0.01))
    server = replica(redis_client, model_dirs)
    target = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]["target"])  # other sizes
    registry.publish("draft", target.state_dict())
    wait_for(lambda: server.refused == 1)
    assert server.draft_version == "draft:v1"
    assert asyncio.run(server.complete(Request(PROMPT, 5))).draft_version == "draft:v1"
    server.close()


def test_a_lora_version_is_merged_on_the_host_and_copied_into_the_draft(redis_client, model_dirs):
    spec = LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj"))
    adapted = wrap_lora(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]["small"]), spec)
    weights = {n: t + 0.05 for n, t in adapter_weights(adapted).items()}  # a trained-looking adapter
    Registry(redis_client).publish("draft", weights, kind="lora", extra={"lora": vars(spec)})
    server = replica(redis_client, model_dirs)
    assert server.draft_version == "draft:v1" and server.refused == 0
    served = server.engine.drafts[ALL_DOMAINS].proposer.model
    assert not any("lora" in name for name in served.state_dict())  # merged: a plain model
    assert served is server.engine.spec.proposer.model  # in place
    base = server.engine.host_base.state_dict()  # the base, kept on the host for merges
    assert any(not torch.equal(base[n], t) for n, t in served.state_dict().items())
    server.close()


def test_the_heartbeat_beats_when_the_load_changes_not_at_every_step(redis_client, model_dirs):
    server = replica(redis_client, model_dirs, heartbeat_seconds=60.0, load_ttl_seconds=120.0)
    beats, changed = [], server._changed.set
    server._changed.set = lambda: beats.append(1) or changed()
    finished = asyncio.run(server.complete(Request(PROMPT, 60, stop_token_ids=[])))
    server.close(timeout=PATIENCE)
    assert finished.generation.stats.steps >= 10
    assert len(beats) <= 3  # the request came, it left, the replica closed


def test_suffix_replicas_draft_from_each_others_requests_and_index_their_own_once(redis_client, model_dirs):
    """Each replica's suffix index takes the other's requests from the trace stream, its own from
    its engine only."""
    a, b = (
        replica(redis_client, model_dirs, draft=None, suffix=True, replica_id=name)
        for name in ("r-a", "r-b")
    )
    index_a, index_b = a.engine.spec.suffix.shared, b.engine.spec.suffix.shared

    def serve(server: Replica, prompt: list[int]) -> Finished:
        async def run():
            return [e async for e in server.stream(Request(prompt, 24, stop_token_ids=[], domain="python"))]

        return asyncio.run(run())[-1]

    first = serve(a, PROMPT)
    wait_for(lambda: len(index_b) == 1)
    again = serve(b, PROMPT)
    assert again.generation.token_ids == first.generation.token_ids
    assert again.generation.stats.accepted > first.generation.stats.accepted  # drafted from a's answer
    serve(a, PROMPT[::-1])  # its trace lands after b's own: once b has it, b has read past its own
    wait_for(lambda: len(index_b) == 3)
    wait_for(lambda: len(index_a) == 3)
    state = {f["name"]: f["samples"][0][2] for f in b.metrics_snapshot()}
    assert state["osd:suffix_index_documents"] == 3 and state["osd:suffix_index_tokens"] == index_b.tokens > 0
    assert 0 < state["osd:suffix_hits"] <= state["osd:suffix_lookups"]
    a.close(timeout=PATIENCE)
    b.close(timeout=PATIENCE)
    assert len(index_a) == len(index_b) == 3  # a1, b1, a2 in both: none twice
