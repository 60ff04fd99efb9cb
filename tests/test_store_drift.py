"""Drift detection on synthetic metric series: it fires on a drop, stays quiet on noise of the
same variance, reports its delay, clears on recovery, and flags new domains without a draft."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from store.drift import DriftConfig, active_alerts, drop_events
from store.metrics import MetricPoint

BUCKET = 10  # seconds
DRAFTED = 300  # drafted tokens per bucket per domain


def series(
    rates: list[float], seed: int, domain: str = "python", start: int = 1_000_000
) -> list[MetricPoint]:
    """One point per bucket whose accepted count is binomial(DRAFTED, rate): the noise real
    acceptance counts have."""
    rng = np.random.default_rng(seed)
    return [
        MetricPoint(
            start + i * BUCKET,
            "draft:v1",
            domain,
            Counter(accepted=int(rng.binomial(DRAFTED, r)), drafted=DRAFTED),
        )
        for i, r in enumerate(rates)
    ]


def events(points):
    (domain,) = {p.domain for p in points}
    return drop_events(
        domain, [(p.start, p.counts["accepted"], p.counts["drafted"]) for p in points], DriftConfig()
    )


@pytest.mark.parametrize("seed", range(5))
def test_a_drop_fires_within_a_few_buckets_and_reports_its_delay(seed):
    points = series([0.6] * 100 + [0.3] * 30, seed)
    (alert,) = events(points)
    change = points[100].start
    assert alert.kind == "drop" and alert.onset == change
    assert 0 <= alert.delay_seconds == alert.at - change <= 5 * BUCKET
    assert alert.baseline == pytest.approx(0.6, abs=0.03) and alert.current < 0.45


@pytest.mark.parametrize("seed", range(5))
def test_noise_of_the_same_variance_stays_quiet(seed):
    assert events(series([0.6] * 1000, seed)) == []
    assert events(series([0.3] * 1000, seed)) == []


def test_a_rise_is_no_alert_and_a_recovery_clears_a_drop():
    assert events(series([0.3] * 100 + [0.6] * 100, 1)) == []  # a better draft published
    drop, recovered = events(series([0.6] * 100 + [0.3] * 20 + [0.6] * 20, 2))
    assert (drop.kind, recovered.kind) == ("drop", "recovered") and recovered.at > drop.at


def test_standing_alerts_name_dropped_and_new_domains_without_a_draft():
    old = series([0.6] * 100 + [0.3] * 10, 3, "python")
    new = series([0.4] * 5, 4, "c", start=old[-5].start)
    untagged = series([0.4] * 5, 5, "-", start=old[-5].start)  # requests naming no domain: not new
    now = old[-1].start
    alerts = {(a.domain, a.kind) for a in active_alerts(old + new + untagged, now, specialised=set())}
    assert alerts == {("python", "drop"), ("c", "new_domain")}
    assert {(a.domain, a.kind) for a in active_alerts(old + new, now, specialised={"c"})} == {
        ("python", "drop")
    }
    later = now + DriftConfig().new_domain_seconds + BUCKET  # no longer new
    assert {a.kind for a in active_alerts(new, later, specialised=set())} == set()
