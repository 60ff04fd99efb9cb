"""Drift detection on synthetic metric series: it fires on a drop, stays quiet on noise of the
same variance and reports its delay; a drop stands while acceptance stays low and clears on
recovery or when its domain goes quiet; new domains without an adapter are flagged only with
adapters, until their adapter is live or they go quiet. Every call passes `now`."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from store.drift import DriftConfig, active_alerts, drop_events, read_alerts
from store.metrics import MetricPoint
from store.registry import Registry

BUCKET = 10  # seconds
DRAFTED = 300  # drafted tokens per bucket per domain
QUIET = DriftConfig().quiet_seconds


def series(
    rates: list[float],
    seed: int,
    domain: str = "python",
    start: int = 1_000_000,
    drafted: int = DRAFTED,
    version: str = "draft:v1",
) -> list[MetricPoint]:
    """One point per bucket whose accepted count is binomial(drafted, rate): the noise real
    acceptance counts have."""
    rng = np.random.default_rng(seed)
    return [
        MetricPoint(
            start + i * BUCKET,
            version,
            domain,
            Counter(accepted=int(rng.binomial(drafted, r)), drafted=drafted),
        )
        for i, r in enumerate(rates)
    ]


def after(points: list[MetricPoint], gap: float = BUCKET) -> int:
    """The bucket start `gap` seconds after the last of `points`."""
    return int(points[-1].start + gap)


def standing(points, now, **kwargs) -> set[tuple[str, str]]:
    return {(a.domain, a.kind) for a in active_alerts(points, now, **kwargs)}


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


def test_new_domain_only_with_adapters_and_until_the_domain_s_adapter_is_live():
    old = series([0.6] * 100, 3, "python")
    new = series([0.4] * 5, 4, "c", start=old[-5].start)
    untagged = series([0.4] * 5, 5, "-", start=old[-5].start)  # requests naming no domain: never new
    points, now = old + new + untagged, old[-1].start
    assert standing(points, now) == set()  # without adapters the shared draft serves every domain
    assert standing(points, now, adapters=True) == {("python", "new_domain"), ("c", "new_domain")}
    assert standing(points, now, adapters=True, specialised={"python", "c"}) == set()
    busy = series([0.4] * 200, 6, "c")  # half an hour without an adapter: still something to do
    assert standing(busy, busy[-1].start, adapters=True) == {("c", "new_domain")}


def test_new_domain_clears_when_the_domain_goes_quiet():
    new = series([0.4] * 5, 4, "c")
    assert standing(new, after(new, QUIET), adapters=True) == {("c", "new_domain")}
    assert standing(new, after(new, QUIET + BUCKET), adapters=True) == set()


def test_the_registry_s_live_versions_name_the_domains_with_their_own_adapter(redis_client):
    points = series([0.4] * 5, 4, "c") + series([0.4] * 5, 5, "python")
    now = after(points)

    def kinds(**kwargs) -> set[tuple[str, str]]:
        return {
            (a.domain, a.kind) for a in read_alerts(redis_client, "draft", now=now, points=points, **kwargs)
        }

    registry = Registry(redis_client)
    registry.publish("draft", {"w": torch.zeros(2)})  # the shared draft's live version specialises nothing
    assert kinds(adapters=True) == {("c", "new_domain"), ("python", "new_domain")}
    registry.publish("draft", {"w": torch.ones(2)}, domain="c")
    assert kinds(adapters=True) == {("python", "new_domain")}
    assert kinds() == set()


def test_a_drop_stands_while_acceptance_stays_low_thin_traffic_and_a_new_version_included():
    fall = series([0.6] * 100 + [0.3] * 10, 7)
    thin = series([0.3] * 100, 8, start=after(fall), drafted=50)  # too few drafted to judge: no recovery
    low = series([0.3] * 20, 9, start=after(thin), version="draft:v2")
    (drop,) = events(fall + thin + low)  # the baseline stayed frozen through the thin buckets
    assert drop.kind == "drop" and drop.baseline == pytest.approx(0.6, abs=0.03)
    assert standing(fall + thin + low, after(low, 0)) == {("python", "drop")}


def test_a_drop_clears_on_recovery_whichever_version_brings_it():
    fall = series([0.6] * 100 + [0.3] * 10, 7)
    healthy = series([0.6] * 20, 9, start=after(fall), version="draft:v2")
    assert [e.kind for e in events(fall + healthy)] == ["drop", "recovered"]
    assert standing(fall + healthy, after(healthy, 0)) == set()


def test_a_drop_clears_when_its_domain_goes_quiet_and_stands_again_if_it_returns_low():
    fall = series([0.6] * 100 + [0.3] * 10, 7)
    (drop,) = active_alerts(fall, after(fall, QUIET))
    assert drop.kind == "drop"
    assert active_alerts(fall, after(fall, QUIET + BUCKET)) == []
    back = series([0.3] * 3, 10, start=after(fall, QUIET + BUCKET))
    assert active_alerts(fall + back, after(back, 0)) == [drop]  # the same drop: not yet recovered
