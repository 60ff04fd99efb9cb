"""The dashboard's aggregation (pure) and its routes over a tiny replica: the page, its script,
and the data after requests, a publish and a drift."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from fastapi.testclient import TestClient
from polling import wait_for
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks import dashboard_load
from serving.http.api import create_app
from serving.http.dashboard import BINS, aggregate, bin_layout, percentile, suffix_index, with_speedup
from store.metrics import LATENCY_EDGES, MetricPoint, latency_bin
from store.registry import Registry


def point(start: int, version: str, domain: str, **counts) -> MetricPoint:
    return MetricPoint(start, version, domain, Counter(counts))


def test_aggregate_sums_buckets_into_bins_overall_by_domain_and_by_version():
    points = [
        point(0, "draft:v1", "py", drafted=10, accepted=5, steps=4, tokens=9, requests=1,
              **{"pos_drafted:1": 4, "pos_accepted:1": 3}),
        point(10, "draft:v1", "c", drafted=10, accepted=1, steps=5, tokens=6, requests=1),
        point(60, "draft:v2", "py", drafted=20, accepted=18, steps=4, tokens=22, requests=2),
        point(500, "draft:v2", "py", drafted=1, accepted=1, steps=1, tokens=2),  # outside the range
    ]  # fmt: skip
    data = aggregate(points, start=0, end=120, bins=4)  # 30 s bins
    assert data["bin_seconds"] == 30
    first, third = data["overall"]
    assert (first["t"], first["requests"], first["acceptance"]) == (0, 2, 0.3)
    assert first["mean_accepted_length"] == pytest.approx((6 + 9) / 9) and first["tokens_per_s"] == 0.5
    assert (third["t"], third["acceptance"]) == (60, 0.9)
    assert data["by_domain"]["c"] == [{"t": 0, "acceptance": 0.1}]
    assert [p["acceptance"] for p in data["by_version"]["draft:v2"]] == [0.9]
    assert data["positions"]["draft:v1"] == [0.75]
    sped = with_speedup(data["overall"], k=3, c=0.5)  # tau / (k c + 1)
    assert sped[0]["speedup"] == pytest.approx(first["mean_accepted_length"] / 2.5)


def test_the_suffix_index_is_what_one_replica_holds_and_the_hit_rate_of_all_lookups():
    def replica(documents, tokens, lookups, hits) -> list[dict]:
        values = {"documents": documents, "tokens": tokens, "lookups": lookups, "hits": hits}
        names = {"documents": "suffix_index_documents", "tokens": "suffix_index_tokens"}
        return [
            {"name": "osd:" + names.get(key, f"suffix_{key}"), "samples": [["", {}, value]]}
            for key, value in values.items()
        ]

    snapshots = {"a": replica(3, 300, 10, 6), "b": replica(4, 410, 30, 6)}
    assert suffix_index(snapshots) == {"documents": 4, "tokens": 410, "hit_rate": 0.3}
    assert suffix_index({"a": replica(0, 0, 0, 0)})["hit_rate"] is None
    assert suffix_index({"a": [{"name": "osd:draft_swaps", "samples": [["", {}, 1]]}]}) is None


def test_display_bins_hold_whole_buckets():
    assert bin_layout(300, now=1000.5, resolution=10) == (710, 1010, 30)  # 10 s bins, not 2.5 s
    assert bin_layout(3600, now=7205, resolution=10) == (3630, 7230, 120)  # 30 s bins
    assert bin_layout(86400, now=100_000, resolution=300) == (14400, 100800, 96)  # 900 s of rollups


def test_percentiles_are_read_off_the_latency_histogram():
    counts = Counter({f"ttft:{latency_bin(0.01)}": 98, f"ttft:{latency_bin(1.0)}": 2})
    assert percentile(counts, "ttft", 0.5) == LATENCY_EDGES[latency_bin(0.01)]
    assert percentile(counts, "ttft", 0.99) == LATENCY_EDGES[latency_bin(1.0)]
    assert percentile(counts, "tpot", 0.5) is None


@pytest.fixture
def client(tiny_replica):
    make, models = tiny_replica
    replica = make("dash")
    with TestClient(create_app(replica, AutoTokenizer.from_pretrained(models.target), "demo")) as test_client:
        yield test_client, replica, models


def test_the_page_its_script_and_its_data(client):
    http, replica, models = client
    page = http.get("/dashboard")
    assert page.status_code == 200 and '<script src="/dashboard/dashboard.js">' in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # no asset from the internet
    assert http.get("/dashboard/dashboard.js").headers["content-type"].startswith("text/javascript")
    weights = AutoModelForCausalLM.from_pretrained(models.draft).state_dict()
    Registry(replica.client).publish("draft", {n: t.clone() for n, t in weights.items()})
    Registry(replica.client).add("draft", {"x": torch.zeros(1)}, domain="c")  # a domain's candidate
    body = {
        "model": "demo",
        "prompt": "def f():",
        "max_tokens": 8,
        "temperature": 0,
        "metadata": {"domain": "py"},
    }
    assert http.post("/v1/completions", json=body).status_code == 200
    assert replica.recorder.flush()  # the request's counters, recorded before its reply, are in Redis
    data = http.get("/dashboard/data", params={"range": "5m"}).json()
    assert data["store"] == "ok" and data["range"] == "5m"
    assert data["overall"][-1]["requests"] >= 1 and "py" in data["by_domain"]
    assert [(e["event"], e["version"]) for e in data["events"]] == [("publish", 1)]
    versions = [(v["label"], v["status"]) for v in data["versions"]]  # every domain's, newest first
    assert versions == [("draft/c:v1", "candidate"), ("draft:v1", "live")]
    assert data["domain"] == "-" and data["trainer"] is None
    # The speedup model's k and c come from the replicas' heartbeats: k = 2 here, c measured.
    assert wait_for(lambda: "speculation" in http.get("/dashboard/data").json())
    data = http.get("/dashboard/data", params={"range": "5m"}).json()
    k, c = data["speculation"]["k"], data["speculation"]["c"]
    assert k == 2 and c == replica.cost_ratio > 0
    last = data["overall"][-1]
    assert last["speedup"] == pytest.approx(last["mean_accepted_length"] / (k * c + 1))
    assert http.get("/dashboard/data", params={"range": "2d"}).status_code == 400


def test_a_long_history_is_drawn_from_at_most_the_display_bins():
    report = dashboard_load.main(["--requests", "3000", "--repeats", "1"])
    rows = {row["range"]: row for row in report["ranges"]}
    assert 2900 <= rows["24h"]["requests_in_range"] <= 3000  # the oldest may fall out as time moves
    in_range = [rows[name]["requests_in_range"] for name in ("5m", "1h", "24h")]
    assert in_range == sorted(in_range) and in_range[0] < in_range[2]
    assert all(row["max_points_per_series"] <= BINS for row in rows.values())
