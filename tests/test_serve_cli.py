"""The official `openai` client against a real `osd serve --target --ingress haproxy` of a tiny
saved pair whose tokenizer carries a ChatML template, with a padded-vocabulary draft and two
replicas: HAProxy and the replicas on loopback only, SIGTERM stopping it all as Ctrl-C does, the
served names, chat templating, content parts, logprobs in OpenAI's shapes (whole and streamed),
max_completion_tokens, a 400 for every unsupported parameter, and seeded repeats across replicas
under concurrent load. Settings that cannot work together, and GPU shares the machine cannot
hold, are refused in one line. And in process, a Llama-3-style tokenizer's BOS: once in
completions and once in chat."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import psutil
import pytest
from fastapi.testclient import TestClient
from polling import wait_for
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from serving.http.api import ChatMessage, chat_prompt, create_app
from serving.replica import Replica, ReplicaConfig
from store.metrics import MetricsConfig
from store.redis_server import free_port
from store.traces import StreamConfig
from tiny_models import save_chat_pair

ALIAS = "tiny-chat"
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is a byte?"},
    {"role": "assistant", "content": "Eight bits."},
    {"role": "user", "content": "And a nibble?"},
]


@dataclass(frozen=True)
class Served:
    """The running `osd serve`: an OpenAI client on it, its target, tokenizer, URL and process."""

    client: openai.OpenAI
    target: str
    tokenizer: PreTrainedTokenizerBase
    base: str
    child: subprocess.Popen


@pytest.fixture(scope="module")
def served(tmp_path_factory, redis_server):
    root = tmp_path_factory.mktemp("serve-cli")
    target, draft = save_chat_pair(root, "chatml", draft_rows=264)
    port = free_port()
    command = [
        sys.executable, "-m", "deploy.cli", "serve", "--target", str(target), "--draft", str(draft),
        "--served-model-name", ALIAS, "--replicas", "2", "--max-batch", "4", "--k", "2", "--no-trainer",
        "--port", str(port), "--redis-url", f"{redis_server.url}/5", "--ingress", "haproxy",
    ]  # fmt: skip
    log = (root / "serve.log").open("w")
    child = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"}
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:  # its banner comes once every replica is serving
        return "Ctrl-C stops" in " ".join((root / "serve.log").read_text().split())

    try:
        wait_for(lambda: child.poll() is not None or up(), timeout=600, every=0.5)
        assert child.poll() is None, (root / "serve.log").read_text()
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="-", max_retries=0, timeout=300)
        yield Served(client, str(target), AutoTokenizer.from_pretrained(target), base, child)
    finally:
        child.terminate()
        code = child.wait(120)
        log.close()
    # SIGTERM stops it as Ctrl-C does (Ray's core, which takes SIGTERM, would end it unstopped)
    assert code == 0 and (root / "serve.log").read_text().rstrip().endswith("stopping")


def test_haproxy_and_the_replicas_serve_http_on_loopback_only(served):
    port = int(served.base.rsplit(":", 1)[1])
    stack = psutil.Process(served.child.pid)

    def listening() -> set[tuple[str, int]]:  # a reloading HAProxy briefly runs twice: a set
        found = set()
        for process in [stack, *stack.children(recursive=True)]:
            try:
                connections = process.net_connections(kind="inet")
            except psutil.NoSuchProcess:  # a Ray worker that has just exited
                continue
            found |= {(c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN}
        return found

    def replicas() -> set[tuple[str, int]]:  # Serve's direct-ingress port range
        return {(ip, p) for ip, p in listening() if 30000 <= p <= 31000}

    wait_for(lambda: len(replicas()) == 2)
    assert {ip for ip, p in listening() if p == port} == {"127.0.0.1"}, listening()  # HAProxy's front
    assert {ip for ip, _ in replicas()} == {"127.0.0.1"}, listening()


def test_models_are_the_target_string_and_its_alias(served):
    client, target = served.client, served.target
    assert [m.id for m in client.models.list().data] == [target, ALIAS]
    for name in (target, ALIAS):
        out = client.completions.create(model=name, prompt="hi", max_tokens=2, temperature=0)
        assert out.model == name


def test_chat_applies_the_template_and_accepts_content_parts(served):
    client, tokenizer = served.client, served.tokenizer
    rendered = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    expected = len(tokenizer.encode(rendered, add_special_tokens=False))
    out = client.chat.completions.create(model=ALIAS, messages=CONVERSATION, max_tokens=4, temperature=0)
    assert out.usage.prompt_tokens == expected
    parts = [m | {"content": [{"type": "text", "text": m["content"]}]} for m in CONVERSATION]
    again = client.chat.completions.create(model=ALIAS, messages=parts, max_tokens=4, temperature=0)
    assert again.usage.prompt_tokens == expected
    assert again.choices[0].message.content == out.choices[0].message.content


def test_streamed_chat_logprobs_come_in_openai_shapes(served):
    client = served.client
    args = dict(
        model=ALIAS, messages=CONVERSATION, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    whole = client.chat.completions.create(**args)
    entries = whole.choices[0].logprobs.content
    assert len(entries) == whole.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in entries)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-4) for e in entries)  # greedy
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )


def test_completion_logprobs_and_max_completion_tokens(served):
    client = served.client
    out = client.completions.create(model=ALIAS, prompt="The byte", max_tokens=8, temperature=0, logprobs=2)
    logprobs, n = out.choices[0].logprobs, out.usage.completion_tokens
    assert out.usage.prompt_tokens == len(b"The byte")  # ChatML tokenizers add no BOS
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == n
    assert logprobs.text_offset[0] == 0 and all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)
    short = client.chat.completions.create(
        model=ALIAS, messages=CONVERSATION, max_tokens=50, max_completion_tokens=5, temperature=0
    )
    assert short.usage.completion_tokens <= 5
    assert short.choices[0].finish_reason == "stop" or short.usage.completion_tokens == 5


@pytest.mark.parametrize(
    "endpoint,extra,param",
    [
        ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ("chat", {"tool_choice": "required"}, "tool_choice"),
        ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
        ("chat", {"logit_bias": {"5": 10}}, "logit_bias"),
        ("chat", {"n": 2}, "n"),
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("completions", {"suffix": "end"}, "suffix"),
        ("completions", {"echo": True}, "echo"),
        ("completions", {"logprobs": 1_000_000}, "logprobs"),
    ],
)
def test_each_unsupported_parameter_gets_a_400_naming_it(served, endpoint, extra, param):
    client = served.client
    with pytest.raises(openai.BadRequestError) as raised:
        if endpoint == "chat":
            client.chat.completions.create(model=ALIAS, messages=CONVERSATION, max_tokens=2, **extra)
        else:
            client.completions.create(model=ALIAS, prompt="hi", max_tokens=2, **extra)
    assert raised.value.body["param"] == param and param in raised.value.body["message"]


def test_harmless_parameters_are_accepted(served):
    client = served.client
    out = client.chat.completions.create(
        model=ALIAS, messages=CONVERSATION, max_tokens=2, user="u-1", store=False,
        metadata={"domain": "chat"}, response_format={"type": "text"},
    )  # fmt: skip
    assert out.usage.completion_tokens >= 1


def test_seeded_repeats_are_identical_across_replicas_and_under_load(served):
    client, base = served.client, served.base

    def seeded(_) -> str:
        out = client.chat.completions.create(
            model=ALIAS,
            messages=CONVERSATION,
            max_tokens=24,
            temperature=0.9,
            seed=7,
            metadata={"domain": "seeded"},
        )
        return out.choices[0].message.content

    def unseeded(_) -> str:
        return (
            client.completions.create(model=ALIAS, prompt="load", max_tokens=24, temperature=1.0)
            .choices[0]
            .text
        )

    alone = seeded(0)
    with ThreadPoolExecutor(12) as pool:
        crowded = [pool.submit(seeded, i) for i in range(12)] + [pool.submit(unseeded, i) for i in range(12)]
        texts = [f.result() for f in crowded[:12]]
    assert texts == [alone] * 12

    def seeded_served_by() -> dict[str, float]:
        """Seeded requests finished per replica (their domain tag)."""
        families = text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=30).text)
        return {
            sample.labels["replica"]: sample.value
            for family in families
            for sample in family.samples
            if sample.name.endswith("e2e_request_latency_seconds_count")
            and sample.labels.get("domain") == "seeded"
        }

    def both_replicas_served_it() -> bool:  # more of the same request, until each replica has served
        assert seeded(0) == alone
        counts = seeded_served_by()
        return len(counts) == 2 and all(counts.values())

    wait_for(both_replicas_served_it)


@pytest.mark.parametrize(
    "flags,reason",
    [
        (["--demo", "full", "--heads-tree", "3,2"], "heads tree"),
        (["--target", "t", "--draft", "d", "--proposer", "ngram"], "drop --draft"),
        (["--target", "t", "--proposer", "draft"], "needs a draft model"),
        (["--target", "t", "--draft", "d", "--adapters", "--proposer", "hydra"], "proposer 'draft' only"),
        (["--target", "t", "--device", "cuda"], "--device cuda needs --replica-gpus > 0"),
        (["--target", "t", "--replica-gpus", "1024"], "do not fit on this machine's"),
    ],
)
def test_settings_that_cannot_work_together_are_refused_in_one_line(flags, reason):
    done = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "serve", *flags], capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and reason in done.stderr and "Traceback" not in done.stderr


def test_a_llama3_style_tokenizer_gets_one_bos_in_completions_and_chat(tmp_path, redis_server):
    """In process: a completion's text gets the BOS its tokenizer adds; a chat prompt gets the one
    its template writes, not two."""
    target, _ = save_chat_pair(tmp_path, "llama3")
    config = ReplicaConfig(
        target=str(target), stream=StreamConfig(stream="t:bos"), metrics=MetricsConfig(prefix="t:bos:m"),
        adaptive_k=False,
    )  # fmt: skip
    replica = Replica(config, redis_server.client())
    tokenizer = AutoTokenizer.from_pretrained(target)
    bos = tokenizer.bos_token_id
    try:
        with TestClient(create_app(replica, tokenizer, str(target))) as client:
            body = {"model": str(target), "max_tokens": 2, "temperature": 0}
            completion = client.post("/v1/completions", json=body | {"prompt": "hi"}).json()
            assert completion["usage"]["prompt_tokens"] == 3  # BOS, "h", "i"
            chat = client.post("/v1/chat/completions", json=body | {"messages": CONVERSATION}).json()
        ids = chat_prompt(tokenizer, [ChatMessage(**m) for m in CONVERSATION])
        assert ids.count(bos) == 1 and ids[0] == bos
        assert chat["usage"]["prompt_tokens"] == len(ids)
    finally:
        replica.close()
