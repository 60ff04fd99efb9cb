"""Acceptance drift: per-domain alerts computed from the pre-aggregated metric series.

Pure functions over `store.metrics.MetricPoint`s (never raw traces), evaluated at a given `now`.
Per domain, the buckets are summed over draft versions into (accepted, drafted), and two
drafted-weighted EWMAs of the acceptance rate follow them: a fast one (the current rate) and a
slow one (the baseline). The baseline is frozen while a drop stands, so a lasting drop cannot
become its own baseline. A domain is **quiet** when it has had no drafted tokens for the last
`quiet_seconds`: nothing is served there, so nothing is lost there.

An alert stands only while there is something to do about it, and clears once its cause is gone:

- **drop**: the current rate is more than `delta` below the baseline, both resting on at least
  `min_drafted` drafted tokens. The alert carries its onset (the first bucket of the run whose own
  rate fell below baseline - delta) and its delay (alert time - onset). It stands until
  - a **recovered** event: the current rate, again on `min_drafted` drafted tokens, is back within
    delta / 2 of the frozen baseline, whichever draft version brings it back. A version made live
    since the drop resolves it this way once its acceptance carries the domain's rate back; one
    that still accepts less leaves the drop standing (and the trainer prioritising the domain);
  - or the domain goes quiet. Should it come back still below the baseline, the same drop (same
    onset) stands again until it recovers.
- **new_domain**, only with per-domain adapters (`adapters=True`; without them the shared draft
  serving every domain is the design): a domain that is not quiet, has `min_drafted` drafted
  tokens in the window, and has no live version of its own in the registry, so the shared draft
  serves it. It clears when the domain's own version goes live or the domain goes quiet.
  Requests that name no domain (`ALL_DOMAINS`) are the shared draft's by design: never new.

`read_alerts` applies this to the last `window_seconds` of the series in Redis: a drop whose low
rate outlasts the window has become the baseline there.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass
from typing import Literal

import redis

from store.metrics import MetricPoint, MetricsConfig, read_series
from store.registry import ALL_DOMAINS, Registry


@dataclass(frozen=True)
class DriftConfig:
    delta: float = 0.15  # alert when acceptance falls this far below its baseline
    fast_halflife: float = 2.0  # buckets
    slow_halflife: float = 20.0  # buckets
    min_drafted: int = 200  # drafted tokens each average needs before it counts
    quiet_seconds: float = 300.0  # a domain without drafted tokens this long has nothing to alert on
    window_seconds: float = 3600.0  # history read_alerts looks at

    def __post_init__(self):
        if not 0 < self.delta < 1 or not 0 < self.fast_halflife < self.slow_halflife or self.min_drafted < 1:
            raise ValueError("need 0 < delta < 1, 0 < fast_halflife < slow_halflife and min_drafted >= 1")


@dataclass(frozen=True)
class DriftAlert:
    domain: str
    kind: Literal["drop", "recovered", "new_domain"]
    at: int  # bucket start (unix seconds) when it fired
    baseline: float | None
    current: float | None
    onset: int | None = None  # drop: the bucket where the fall began
    message: str = ""

    @property
    def delay_seconds(self) -> int | None:
        return None if self.onset is None else self.at - self.onset

    def to_json(self) -> dict:
        return asdict(self) | {"delay_seconds": self.delay_seconds}


def domain_series(points: Iterable[MetricPoint]) -> dict[str, list[tuple[int, int, int]]]:
    """domain -> [(bucket start, accepted, drafted)], oldest first, summed over draft versions."""
    sums: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for point in points:
        entry = sums[point.domain][point.start]
        entry[0] += point.counts["accepted"]
        entry[1] += point.counts["drafted"]
    return {domain: [(s, a, d) for s, (a, d) in sorted(buckets.items())] for domain, buckets in sums.items()}


def drop_events(domain: str, series: list[tuple[int, int, int]], config: DriftConfig) -> list[DriftAlert]:
    """The drop and recovered events over one domain's series, in order (they alternate)."""
    fast_keep, slow_keep = 0.5 ** (1 / config.fast_halflife), 0.5 ** (1 / config.slow_halflife)
    fast, slow = [0.0, 0.0], [0.0, 0.0]  # (accepted, drafted), decayed
    alerts, alerting, onset = [], False, None
    for start, accepted, drafted in series:
        fast = [fast[0] * fast_keep + accepted, fast[1] * fast_keep + drafted]
        if slow[1] >= config.min_drafted and fast[1] >= config.min_drafted:
            baseline, current = slow[0] / slow[1], fast[0] / fast[1]
            if drafted and accepted / drafted < baseline - config.delta:
                onset = start if onset is None else onset
            elif not alerting:
                onset = None
            if not alerting and current < baseline - config.delta:
                alerting, onset = True, start if onset is None else onset
                message = (
                    f"acceptance {current:.2f} is {baseline - current:.2f} below its baseline {baseline:.2f}"
                )
                alerts.append(DriftAlert(domain, "drop", start, baseline, current, onset, message))
            elif alerting and current >= baseline - config.delta / 2:
                alerting, onset = False, None
                alerts.append(DriftAlert(domain, "recovered", start, baseline, current))
        if not alerting:  # the baseline is frozen while an alert stands, thin buckets included
            slow = [slow[0] * slow_keep + accepted, slow[1] * slow_keep + drafted]
    return alerts


def active_alerts(
    points: Iterable[MetricPoint],
    now: float,
    config: DriftConfig = DriftConfig(),
    *,
    adapters: bool = False,
    specialised: Collection[str] = (),
) -> list[DriftAlert]:
    """The alerts standing at `now`: unrecovered drops of domains that are not quiet, and, with
    `adapters`, busy domains without a live version of their own (`specialised`: those with one)."""
    standing = []
    for domain, series in sorted(domain_series(points).items()):
        if all(now - start > config.quiet_seconds for start, _, drafted in series if drafted):
            continue  # quiet: nothing served, nothing to act on
        events = drop_events(domain, series, config)
        if events and events[-1].kind == "drop":
            standing.append(events[-1])
        if (
            adapters
            and domain != ALL_DOMAINS
            and domain not in specialised
            and sum(d for _, _, d in series) >= config.min_drafted
        ):
            message = f"domain {domain!r} has no adapter of its own yet; the shared draft serves it"
            standing.append(DriftAlert(domain, "new_domain", series[0][0], None, None, message=message))
    return standing


def read_alerts(
    client: redis.Redis,
    draft_name: str = "draft",
    metrics: MetricsConfig | None = None,
    config: DriftConfig = DriftConfig(),
    now: float | None = None,
    points: list[MetricPoint] | None = None,
    *,
    adapters: bool = False,
) -> list[DriftAlert]:
    """The alerts standing now, from the last `config.window_seconds` of metric series (`points`
    when the caller has read them already, else read here). `adapters`: whether the replicas serve
    per-domain adapters; then a domain counts as specialised when the registry has a live version
    of `draft_name` for it."""
    now = time.time() if now is None else now
    since = now - config.window_seconds
    if points is None:
        points = read_series(client, metrics or MetricsConfig(), since=since)
    points = [p for p in points if p.start >= since]
    registry, domains = Registry(client), {p.domain for p in points}
    specialised = {d for d in domains if adapters and registry.live_version(draft_name, d) is not None}
    return active_alerts(points, now, config, adapters=adapters, specialised=specialised)
