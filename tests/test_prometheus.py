"""Prometheus metrics: a replica's counters, and one exposition merged from several replicas."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from serving.engine.stats import SpecStats
from serving.http import prometheus
from serving.http.prometheus import ReplicaMetrics, gauge, render
from store.drift import DriftAlert

STATE = dict.fromkeys(prometheus.STATE, 0.0) | {"num_speculative_tokens": 3, "draft_cost_ratio": 0.25}


def one_request(metrics: ReplicaMetrics, version: str, domain: str) -> None:
    stats = SpecStats()
    for drafted, accepted in [(3, 3), (3, 1), (3, 0)]:
        stats.record(drafted, accepted)
    metrics.observe(version, domain, stats, prompt_tokens=5, tokens=7, finish_reason="length",
                    ttft_seconds=0.02, seconds=0.14)  # fmt: skip


def samples(exposition: bytes) -> dict[tuple, float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition.decode())
        for s in family.samples
    }


def test_vllm_spec_decode_counters_per_version_and_domain_from_every_replica():
    a, b = ReplicaMetrics(), ReplicaMetrics()
    one_request(a, "draft:v1", "python")
    one_request(a, "draft:v1", "python")
    one_request(b, "draft:v2", "c")
    swapped = STATE | {"draft_swaps": 2}
    snapshots = {"ra": a.snapshot("draft:v1", STATE), "rb": b.snapshot("draft:v2", swapped)}
    got = samples(render(snapshots))
    labels_a = (("domain", "python"), ("draft_version", "draft:v1"), ("replica", "ra"))
    assert got[("osd:spec_decode_num_drafts_total", labels_a)] == 6
    assert got[("osd:spec_decode_num_draft_tokens_total", labels_a)] == 18
    assert got[("osd:spec_decode_num_accepted_tokens_total", labels_a)] == 8
    per_pos = {
        p: got[
            (
                "osd:spec_decode_num_accepted_tokens_per_pos_total",
                tuple(sorted({**dict(labels_a), "position": str(p)}.items())),
            )
        ]
        for p in (1, 2, 3)
    }
    assert per_pos == {1: 4, 2: 2, 3: 2}
    assert (
        got[
            (
                "osd:generation_tokens_total",
                (("domain", "c"), ("draft_version", "draft:v2"), ("replica", "rb")),
            )
        ]
        == 7
    )
    assert got[("osd:time_to_first_token_seconds_count", (("domain", "python"), ("replica", "ra")))] == 2
    assert got[("osd:time_per_output_token_seconds_sum", (("domain", "c"), ("replica", "rb")))] == 0.02
    assert got[("osd:draft_swaps_total", (("replica", "rb"),))] == 2
    assert got[("osd:draft_info", (("draft_version", "draft:v2"), ("replica", "rb")))] == 1
    assert got[("osd:replicas", ())] == 2
    assert got[("osd:draft_cost_ratio", (("replica", "rb"),))] == 0.25
    assert gauge(snapshots, "num_speculative_tokens") == [3, 3]


def test_standing_drift_alerts_are_a_gauge_per_domain_and_kind():
    alert = DriftAlert("python", "drop", at=100, baseline=0.6, current=0.3, onset=90)
    got = samples(render({}, [alert]))
    assert got[("osd:drift_alert", (("domain", "python"), ("kind", "drop")))] == 1
