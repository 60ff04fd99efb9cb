"""The demo's clients against a real replica of the tiny demo pair over HTTP (the openai client,
uvicorn): every fourth request goes through the chat API as ChatML, the rest as completions, and
both are accounted alike (tokens, drafted and accepted, draft version) and leave tagged traces."""

from __future__ import annotations

from http_server import serving
from polling import wait_for
from transformers import AutoTokenizer

from deploy.demo.client import Clients, Served
from deploy.demo.report import endpoint_stats
from deploy.demo.tokenizer import IM_START
from deploy.demo.workloads import Phase, WorkloadSpec, request_stream
from serving.http.api import create_app
from store.traces import decode

MODEL = "demo"


def test_every_fourth_request_goes_through_chat_and_is_accounted_like_a_completion(
    tiny_replica, redis_client
):
    make, models = tiny_replica
    replica = make("demo-client")
    tokenizer = AutoTokenizer.from_pretrained(models.target)
    spec = WorkloadSpec(
        phases=(Phase("python", 5), Phase("prose", 3)), prompt_tokens=(8, 24), max_new_tokens=6, chat_every=4
    )
    requests = list(request_stream(spec, models.held_out_corpus(), tokenizer))
    served: list[Served] = []
    with serving(create_app(replica, tokenizer, MODEL)) as base:
        clients = Clients(base, MODEL, requests, concurrency=2, think_seconds=0.0, on_served=served.append)
        clients.start()
        wait_for(lambda: not clients.running)

    assert sorted(s.index for s in served) == list(range(8))
    assert sorted(s.index for s in served if s.chat) == [3, 7]
    for s in served:
        assert s.ok, s.error
        assert s.domain == requests[s.index].prompt.domain and s.prompt == requests[s.index].prompt.token_ids
        assert 1 <= s.tokens <= 6 and s.finish_reason in ("stop", "length")
        assert s.drafted > 0 and 0 <= s.accepted <= s.drafted and s.draft_version == "draft:base"
    stats = endpoint_stats(served)
    assert (stats["chat"]["requests"], stats["completions"]["requests"]) == (2, 6)
    assert stats["chat"]["failed"] == 0 and stats["chat"]["acceptance"] is not None

    # every request left a trace tagged with its domain; a chat request's prompt is ChatML
    def stream() -> list:
        return [decode(fields) for _, fields in redis_client.xrange("t:demo-client")]

    wait_for(lambda: len(stream()) == 8)  # the replica writes its traces in the background
    traces = stream()
    by_kind = {kind: [t for t in traces if t.request_id.startswith(kind)] for kind in ("chatcmpl-", "cmpl-")}
    assert len(by_kind["chatcmpl-"]) == 2 and len(by_kind["cmpl-"]) == 6
    im_start = tokenizer.convert_tokens_to_ids(IM_START)
    for trace in by_kind["chatcmpl-"]:
        assert trace.prompt_ids[0] == im_start and trace.domain in ("python", "prose")
    completions = {tuple(r.prompt.token_ids): r.prompt.domain for r in requests if not r.chat}
    assert {tuple(t.prompt_ids.tolist()): t.domain for t in by_kind["cmpl-"]} == completions
