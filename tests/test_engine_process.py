"""The HF engine in a process of its own (serving.engine.process): what crosses the pipe comes out as
it went in; a replica served from the process decodes what the engine decodes in place, traces it,
swaps and refuses versions, frees abandoned slots and stops the process when it closes; a child
that dies fails its requests at once, and one that cannot load its models says why."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import torch
from polling import PATIENCE, wait_for
from transformers import AutoModelForCausalLM

from serving.engine.hf import SpecEngine
from serving.engine.process import EngineProcess, pack_error, pack_step, unpack_error, unpack_step
from serving.engine.protocol import Generation, Step, TokenLogprobs
from serving.engine.stats import SpecStats
from serving.engine.versions import unshared
from serving.errors import IncompatibleDraftError, ModelLoadError, ServerBusyError
from serving.replica import Finished, Replica, ReplicaConfig, Request
from store.metrics import MetricsConfig
from store.registry import Registry
from store.traces import StreamConfig, TraceReader

PROMPT = [5, 17, 42, 9, 3, 77]


def test_a_step_crosses_the_wire_as_it_went_in():
    stats = SpecStats()
    stats.record(3, 2)
    stats.record(0, 0)
    generation = Generation(
        [4, 5, 6], stats, "length", torch.tensor([[1, 2], [3, 4], [5, 6]]), torch.randn(3, 2),
        torch.randn(3, 8, dtype=torch.bfloat16),
    )  # fmt: skip
    logprobs = TokenLogprobs(torch.randn(3), torch.randint(0, 9, (3, 2)), torch.randn(3, 2))
    for step in (
        Step([4, 5, 6], generation, logprobs, "draft:v2"),
        Step([7], version="draft:base"),
        Step([]),
    ):
        back = unpack_step(pack_step(step))
        assert back.token_ids == step.token_ids and back.version == step.version
        assert (back.generation is None) == (step.generation is None)
        assert (back.logprobs is None) == (step.logprobs is None)
    back = unpack_step(pack_step(Step([4, 5, 6], generation, logprobs)))
    assert back.generation.stats == stats and back.generation.finish_reason == "length"
    for name in ("top_ids", "top_logprobs", "hidden"):
        sent, got = getattr(generation, name), getattr(back.generation, name)
        assert got.dtype == sent.dtype and torch.equal(got, sent)
    for name in ("chosen", "top_ids", "top_values"):
        assert torch.equal(getattr(back.logprobs, name), getattr(logprobs, name))
    empty = Generation([], SpecStats(), "stop", torch.zeros(0, 4, dtype=torch.long))
    assert unpack_step(pack_step(Step([], empty))).generation.top_ids.shape == (0, 4)


def test_an_error_crosses_as_its_own_kind_and_an_unknown_one_as_a_runtime_error():
    back = unpack_error(pack_error(IncompatibleDraftError("other vocabulary")))
    assert isinstance(back, IncompatibleDraftError) and str(back) == "other vocabulary"
    assert isinstance(unpack_error(pack_error(KeyError("w"))), KeyError)
    assert type(unpack_error(pack_error(ZeroDivisionError("x")))) is RuntimeError


def test_tied_weights_are_copied_for_safetensors():
    embeddings = torch.randn(8, 4)
    weights = unshared({"embed.weight": embeddings, "head.weight": embeddings, "norm": torch.ones(4).t()})
    assert weights["embed.weight"] is not weights["head.weight"]
    assert weights["embed.weight"].data_ptr() != weights["head.weight"].data_ptr()
    assert all(
        torch.equal(weights[n], t) for n, t in (("embed.weight", embeddings), ("head.weight", embeddings))
    )


@pytest.fixture
def make(redis_client, model_dirs):
    made: list[Replica] = []

    def make(**overrides) -> Replica:
        settings = dict(
            target=str(model_dirs["llama"]["target"]), draft=str(model_dirs["llama"]["small"]),
            num_speculative_tokens=3, poll_seconds=0.1, adaptive_k=False, replica_id="r-process",
            stream=StreamConfig(stream="t:process"), metrics=MetricsConfig(prefix="t:process:metrics"),
        )  # fmt: skip
        made.append(Replica(ReplicaConfig(**settings | overrides), redis_client))
        return made[-1]

    yield make
    for replica in made:
        replica.close(timeout=PATIENCE)
        assert not replica.engine._process.is_alive()  # closing the replica stops its engine


def test_a_replica_decodes_traces_swaps_and_abandons_from_the_engine_s_process(
    make, redis_client, model_dirs
):
    registry = Registry(redis_client)
    registry.publish("draft", AutoModelForCausalLM.from_pretrained(model_dirs["llama"]["small"]).state_dict())
    server = make()
    assert server.engine._process.pid != os.getpid() and server.draft_version == "draft:v1"
    expected = SpecEngine.from_pretrained(model_dirs["llama"]["target"]).generate(
        PROMPT, 20, stop_token_ids=[]
    )
    finished = asyncio.run(server.complete(Request(PROMPT, 20, stop_token_ids=[], domain="python")))
    assert finished.generation.token_ids == expected.token_ids  # lossless, across the pipe
    assert finished.draft_version == "draft:v1" and finished.generation.stats.drafted > 0
    (delivery,) = wait_for(lambda: TraceReader(redis_client, "c", StreamConfig(stream="t:process")).read(10))
    assert list(delivery.trace.output_ids) == expected.token_ids and delivery.trace.top_ids.shape == (20, 16)

    target = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]["target"])
    registry.publish("draft", target.state_dict())  # other sizes: refused in the child, counted here
    wait_for(lambda: server.refused == 1)
    registry.publish("draft", AutoModelForCausalLM.from_pretrained(model_dirs["llama"]["small"]).state_dict())
    wait_for(lambda: server.draft_version == "draft:v3")
    assert server.status()["swaps"] == 2
    again = asyncio.run(server.complete(Request(PROMPT, 20, stop_token_ids=[])))
    assert again.generation.token_ids == expected.token_ids and again.draft_version == "draft:v3"

    async def leave_early():
        stream = server.stream(Request(PROMPT, 200, stop_token_ids=[]))
        await anext(stream)
        await stream.aclose()

    asyncio.run(leave_early())  # the abandon reaches the child, and the child's state the replica
    wait_for(lambda: server.engine.running() == 0 and server.status()["in_flight"] == 0)


def test_a_request_served_elsewhere_reaches_the_suffix_index_in_the_engine_s_process(make, model_dirs):
    server = make(draft=None, suffix=True)
    expected = SpecEngine.from_pretrained(model_dirs["llama"]["target"]).generate(
        PROMPT, 20, stop_token_ids=[]
    )
    server.engine.remember("python", PROMPT + expected.token_ids)  # crosses the pipe before the requests

    def serve(domain: str) -> Finished:
        return asyncio.run(server.complete(Request(PROMPT, 20, stop_token_ids=[], domain=domain)))

    elsewhere, remembered = serve("c"), serve("python")
    assert elsewhere.generation.token_ids == remembered.generation.token_ids == expected.token_ids
    assert remembered.generation.stats.accepted > elsewhere.generation.stats.accepted


def test_when_the_engine_s_process_dies_its_requests_fail_at_once(make):
    server = make()

    async def killed_mid_request():
        stream = server.stream(Request(PROMPT, 200, stop_token_ids=[]))
        await anext(stream)
        os.kill(server.engine._process.pid, signal.SIGKILL)
        with pytest.raises(ServerBusyError, match="engine process has exited"):
            async for _ in stream:
                pass

    asyncio.run(killed_mid_request())
    with pytest.raises(RuntimeError, match="engine process has exited"):
        server.check_health()
    with pytest.raises(ServerBusyError):
        asyncio.run(server.complete(Request(PROMPT, 5)))


def test_a_target_that_cannot_load_is_reported_from_the_engine_s_process(tmp_path):
    with pytest.raises(ModelLoadError, match="nowhere"):
        EngineProcess({"target": str(tmp_path / "nowhere")})
