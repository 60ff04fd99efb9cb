"""Metric series on a real redis-server: batched counters per bucket, version and domain."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from store.metrics import (
    LATENCY_EDGES,
    MetricsConfig,
    MetricsRecorder,
    latency_bin,
    read_series,
    request_counters,
)

NEVER = 24 * 3600.0  # seconds: a background flush that never comes during a test; tests flush


def counters(drafted: int, accepted: int, ttft: float = 0.02, tpot: float = 0.005):
    steps, first = 4, min(accepted, 4)
    return request_counters(
        steps=steps, drafted=drafted, accepted=accepted, tokens=accepted + steps,
        drafted_per_position=[steps, steps], accepted_per_position=[first, accepted - first],
        ttft_seconds=ttft, seconds_per_token=tpot,
    )  # fmt: skip


def test_latency_bins_cover_the_range():
    assert latency_bin(0.0) == 0 and latency_bin(1e9) == len(LATENCY_EDGES) - 1
    assert LATENCY_EDGES[latency_bin(0.05)] >= 0.05 > LATENCY_EDGES[latency_bin(0.05) - 1]


def test_recorded_requests_come_back_per_bucket_version_and_domain(redis_client):
    config = MetricsConfig(prefix="m:test", bucket_seconds=10, flush_seconds=NEVER)
    recorder = MetricsRecorder(redis_client, config)
    t0 = int(time.time()) // 10 * 10 - 3600  # an hour ago: inside the retention window
    recorder.record("v1", "python", counters(8, 4), at=t0)
    recorder.record("v1", "python", counters(8, 6, ttft=0.5), at=t0 + 9.5)
    recorder.record("v2", "python", counters(8, 8), at=t0 + 1)
    recorder.record("v1", "prose", counters(8, 2), at=t0 + 15)
    assert redis_client.keys("m:test*") == []  # batched: nothing written before a flush
    assert recorder.flush()
    recorder.close()

    points = {(p.start, p.version, p.domain): p for p in read_series(redis_client, config, since=0)}
    assert set(points) == {(t0, "v1", "python"), (t0, "v2", "python"), (t0 + 10, "v1", "prose")}
    python = points[t0, "v1", "python"]
    assert python.counts["requests"] == 2 and python.acceptance_rate == pytest.approx(10 / 16)
    assert python.mean_accepted_length == pytest.approx((10 + 8) / 8)
    assert python.acceptance_per_position == [1.0, pytest.approx(2 / 8)]
    assert python.latency_quantile("ttft", 0.5) == LATENCY_EDGES[latency_bin(0.02)]
    assert python.latency_quantile("ttft", 0.99) == LATENCY_EDGES[latency_bin(0.5)]
    assert points[t0, "v2", "python"].acceptance_rate == 1.0
    assert [p.start for p in read_series(redis_client, config, since=t0 + 5)] == [t0 + 10]
    assert redis_client.ttl(config.bucket_key(t0)) > 0  # retention
    rollups = read_series(redis_client, config, since=0, rollup=True)  # the same counters, in 5 min buckets
    assert all(p.start % config.rollup_seconds == 0 for p in rollups)
    requests = Counter()
    for p in rollups:
        requests[p.version, p.domain] += p.counts["requests"]
    assert requests == {("v1", "python"): 2, ("v2", "python"): 1, ("v1", "prose"): 1}


def test_buckets_past_retention_leave_the_index(redis_client):
    # An hour of retention: far more than any pause between recording, flushing and reading.
    config = MetricsConfig(
        prefix="m:old", bucket_seconds=10, rollup_seconds=30, retention_seconds=3600, flush_seconds=NEVER
    )
    recorder = MetricsRecorder(redis_client, config)
    recorder.record("v1", "c", counters(4, 2), at=time.time() - 10 * 3600)
    recorder.record("v1", "c", counters(4, 2))
    recorder.close()
    assert len(read_series(redis_client, config)) == len(read_series(redis_client, config, rollup=True)) == 1


def test_counters_survive_a_failed_flush(redis_client):
    config = MetricsConfig(prefix="m:retry", flush_seconds=NEVER)
    recorder = MetricsRecorder(redis_client, config)
    recorder.record("v1", "c", counters(4, 1))
    pool = redis_client.connection_pool
    redis_client.connection_pool = type(pool)(host="127.0.0.1", port=1)  # nothing listens there
    assert not recorder.flush() and recorder.flush_errors == 1
    recorder.record("v1", "c", counters(4, 3))
    redis_client.connection_pool = pool
    assert recorder.flush()
    recorder.close()
    (point,) = read_series(redis_client, config)
    assert point.counts["requests"] == 2 and point.counts["accepted"] == 4


def test_separator_in_labels_is_refused(redis_client):
    recorder = MetricsRecorder(redis_client, MetricsConfig(prefix="m:bad", flush_seconds=NEVER))
    with pytest.raises(ValueError, match="may not contain"):
        recorder.record("v|1", "c", counters(1, 1))
    recorder.close()
