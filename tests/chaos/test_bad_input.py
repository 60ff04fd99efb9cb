"""Bad input over real HTTP (uvicorn on loopback) to a replica of the tiny demo pair: schemathesis
fuzzing from the app's own OpenAPI schema, valid and invalid bodies alike, then hand-written abuse
(huge prompts and max_tokens, deep JSON, invalid UTF-8, NaN and negative numbers, 10k stop strings,
streaming clients that disconnect). Never a 5xx, the replica serves on, and the process's memory
stays within a stated bound."""

from __future__ import annotations

import gc

import httpx
import psutil
import pytest
import schemathesis
from http_server import serving
from hypothesis import HealthCheck, given, settings
from polling import PATIENCE
from transformers import AutoTokenizer

from serving.http.api import create_app

TOKEN = "fuzz-admin-token"
MEMORY_BOUND_MB = 200  # the most this process (server, replica and fuzzer) may grow over the fuzzing
GOOD = {"model": "demo", "prompt": "def f(x):", "max_tokens": 4, "temperature": 0}


@pytest.fixture
def base(tiny_replica):
    make, models = tiny_replica
    app = create_app(make("fuzz"), AutoTokenizer.from_pretrained(models.target), "demo", admin_token=TOKEN)
    with serving(app) as url:
        yield url


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def still_serves(base: str) -> None:
    response = httpx.post(f"{base}/v1/completions", json=GOOD, timeout=PATIENCE)
    assert response.status_code == 200 and response.json()["choices"][0]["text"] is not None


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_memory_stays_bounded(base):
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    before, failures = rss_mb(), []
    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

        @given(case=schema.as_strategy(generation_mode=mode))
        @settings(max_examples=100, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def fuzz(case):
            response = case.call(base_url=base, timeout=PATIENCE)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r:.200} -> {response.status_code}")

        fuzz()
    assert failures == []
    assert rss_mb() - before < MEMORY_BOUND_MB
    still_serves(base)


BAD_BODIES = {
    "deep JSON": b'{"model": "demo", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "NaN": b'{"model": "demo", "prompt": "x", "temperature": NaN}',
    "Infinity": b'{"model": "demo", "prompt": "x", "top_p": Infinity}',
    "invalid UTF-8": b'{"model": "demo", "prompt": "\xff\xfe\xfd"}',
    "not an object": b"[1, 2, 3]",
    "empty": b"",
}
BAD_JSON = {
    "negative max_tokens": GOOD | {"max_tokens": -5},
    "huge max_tokens": GOOD | {"max_tokens": 10**12},
    "huge seed": GOOD | {"seed": 2**70},
    "negative seed": GOOD | {"seed": -1},
    "negative top_k": GOOD | {"top_k": -3},
    "top_p above 1": GOOD | {"top_p": 1.5},
    "out-of-vocabulary ids": GOOD | {"prompt": [10**9, -1]},
    "huge prompt": GOOD | {"prompt": "def f(): pass\n" * 70_000},  # about 1 MB
    "10k stop strings": GOOD | {"stop": [f"s{i}" for i in range(10_000)]},
    "wrong types": GOOD | {"max_tokens": "many", "stream": "yes"},
    "huge domain": GOOD | {"metadata": {"domain": "d" * 1_000_000}},
    "no messages": {"model": "demo", "messages": []},
}


@pytest.mark.parametrize("raw", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_malformed_bodies_get_a_4xx_with_a_message(base, raw):
    for path in ("/v1/completions", "/v1/chat/completions"):
        response = httpx.post(
            base + path, content=raw, headers={"content-type": "application/json"}, timeout=PATIENCE
        )
        assert 400 <= response.status_code < 500, response.text[:300]
        assert response.json()["error"]["message"]


def test_abusive_values_get_a_4xx_with_a_message_and_serving_goes_on(base):
    for name, body in BAD_JSON.items():
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        response = httpx.post(base + path, json=body, timeout=PATIENCE)
        assert 400 <= response.status_code < 500, (name, response.text[:300])
        assert response.json()["error"]["message"], name
    huge_stop = httpx.post(f"{base}/v1/completions", json=GOOD | {"stop": "x" * 1_000_000}, timeout=PATIENCE)
    assert huge_stop.status_code == 200  # a long stop string is legal: it just never matches
    still_serves(base)


def test_streaming_clients_that_disconnect_free_the_replica(base):
    body = GOOD | {"max_tokens": 64, "stream": True}
    before = rss_mb()
    for _ in range(20):
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=PATIENCE) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # the first event, then hang up
    still_serves(base)
    assert rss_mb() - before < MEMORY_BOUND_MB
