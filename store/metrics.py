"""Metric series: acceptance counters and latency histograms per time bucket, draft version and domain.

Servers record each finished request into `MetricsRecorder`, which adds it to in-process counters
and flushes them every `flush_seconds` from a daemon thread in one pipelined batch of HINCRBYs.
While Redis is down, counters keep accumulating (they merge; nothing grows per request) and the
next successful flush writes them. The dashboard and the drift detector read with `read_series`.

Keys: `osd:metrics:<bucket start, unix seconds>` is a hash per bucket, expiring after
`retention_seconds`, with fields `<version>|<domain>|<counter>`; `osd:metrics:buckets` is a ZSET
index of bucket starts. Every flush also adds the same counters to coarser **rollup** buckets
(`rollup_seconds`, 5 minutes: `osd:metrics:rollup:<start>`, indexed by
`osd:metrics:rollup:buckets`), so that a day of history is read from 288 hashes, not 8640.
Counters: requests, steps, drafted, accepted, tokens, `pos_drafted:i` and
`pos_accepted:i` for draft position i (1-based), `proposer_steps:p`, `proposer_drafted:p` and
`proposer_accepted:p` for the steps proposer p drafted (`serving.engine.stats`), and `ttft:b` /
`tpot:b`, histogram bin b of time to first token and time per output token (bin edges
`LATENCY_EDGES`, seconds).
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import redis

log = logging.getLogger(__name__)

# Upper edges of the latency histogram bins: 0.1 ms growing by 25% per bin, to about 2 minutes.
LATENCY_EDGES = tuple(1e-4 * 1.25**i for i in range(64))


@dataclass(frozen=True)
class MetricsConfig:
    prefix: str = "osd:metrics"
    bucket_seconds: int = 10
    rollup_seconds: int = 300  # a multiple of bucket_seconds
    retention_seconds: int = 7 * 24 * 3600
    flush_seconds: float = 1.0

    def __post_init__(self):
        if self.bucket_seconds < 1 or self.retention_seconds < self.rollup_seconds:
            raise ValueError("need bucket_seconds >= 1 and retention_seconds >= rollup_seconds")
        if self.rollup_seconds % self.bucket_seconds:
            raise ValueError("rollup_seconds must be a multiple of bucket_seconds")

    def index_key(self, rollup: bool = False) -> str:
        return f"{self.prefix}:{'rollup:' if rollup else ''}buckets"

    def bucket_key(self, start: int, rollup: bool = False) -> str:
        return f"{self.prefix}:{'rollup:' if rollup else ''}{start}"


def latency_bin(seconds: float) -> int:
    return min(bisect.bisect_left(LATENCY_EDGES, seconds), len(LATENCY_EDGES) - 1)


def request_counters(
    steps: int,
    drafted: int,
    accepted: int,
    tokens: int,
    drafted_per_position: Sequence[int],
    accepted_per_position: Sequence[int],
    ttft_seconds: float | None,
    seconds_per_token: float | None,
    by_proposer: Mapping[str, Mapping[str, int]] | None = None,
) -> Counter:
    """One request's counters, keyed by counter name; `by_proposer`: SpecStats.by_proposer."""
    counts = Counter(requests=1, steps=steps, drafted=drafted, accepted=accepted, tokens=tokens)
    for i, (d, a) in enumerate(zip(drafted_per_position, accepted_per_position, strict=True), start=1):
        counts[f"pos_drafted:{i}"] += d
        counts[f"pos_accepted:{i}"] += a
    for name, count in (by_proposer or {}).items():
        for what, value in count.items():
            counts[f"proposer_{what}:{name}"] += value
    if ttft_seconds is not None:
        counts[f"ttft:{latency_bin(ttft_seconds)}"] += 1
    if seconds_per_token is not None:
        counts[f"tpot:{latency_bin(seconds_per_token)}"] += 1
    return counts


class MetricsRecorder:
    """Accumulates request counters in process and flushes them to Redis in batches."""

    def __init__(self, client: redis.Redis, config: MetricsConfig = MetricsConfig()):
        self.client, self.config = client, config
        self.flush_errors = 0
        self._pending: dict[tuple[int, str, str], Counter] = defaultdict(Counter)
        self._lock = threading.Lock()  # guards _pending; record() takes only this one
        self._flushing = threading.Lock()  # one flush at a time (see flush)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-flush", daemon=True)
        self._thread.start()

    def record(self, version: str, domain: str, counters: Counter, at: float | None = None) -> None:
        """Add a request's counters (see `request_counters`) to its bucket; never touches Redis."""
        if "|" in version or "|" in domain:
            raise ValueError(f"version and domain may not contain '|': {version!r}, {domain!r}")
        start = (
            int((time.time() if at is None else at) // self.config.bucket_seconds)
            * self.config.bucket_seconds
        )
        with self._lock:
            self._pending[start, version, domain].update(counters)

    def flush(self) -> bool:
        """Write the accumulated counters now; False (and they are kept) when Redis fails. Flushes
        run one at a time, so a True means that every counter recorded before the call is in Redis,
        those a concurrent flush (the background one) had already taken included."""
        with self._flushing:
            return self._flush()

    def _flush(self) -> bool:
        with self._lock:
            pending, self._pending = self._pending, defaultdict(Counter)
        if not pending:
            return True
        config, pipe = self.config, self.client.pipeline(transaction=False)
        for (start, version, domain), counters in pending.items():
            for rollup, bucket in ((False, start), (True, start - start % config.rollup_seconds)):
                key = config.bucket_key(bucket, rollup)
                for name, value in counters.items():
                    pipe.hincrby(key, f"{version}|{domain}|{name}", value)
                pipe.expire(key, config.retention_seconds)
                pipe.zadd(config.index_key(rollup), {str(bucket): bucket})
        for rollup in (False, True):
            pipe.zremrangebyscore(config.index_key(rollup), "-inf", time.time() - config.retention_seconds)
        try:
            pipe.execute()
        except redis.RedisError as err:
            self.flush_errors += 1
            log.warning("metrics flush failed, keeping counters for the next one: %s", err)
            with self._lock:
                for key, counters in pending.items():
                    self._pending[key].update(counters)
            return False
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.config.flush_seconds):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.flush()


@dataclass
class MetricPoint:
    """One bucket's counters for one draft version and domain."""

    start: int
    version: str
    domain: str
    counts: Counter = field(default_factory=Counter)

    @property
    def acceptance_rate(self) -> float | None:
        return self.counts["accepted"] / self.counts["drafted"] if self.counts["drafted"] else None

    @property
    def mean_accepted_length(self) -> float | None:
        steps = self.counts["steps"]
        return (self.counts["accepted"] + steps) / steps if steps else None

    @property
    def acceptance_per_position(self) -> list[float]:
        rates, i = [], 1
        while self.counts[f"pos_drafted:{i}"]:
            rates.append(self.counts[f"pos_accepted:{i}"] / self.counts[f"pos_drafted:{i}"])
            i += 1
        return rates

    def latency_quantile(self, kind: str, q: float) -> float | None:
        """The upper bin edge below which a fraction q of `kind` ("ttft" or "tpot") latencies fall."""
        bins = [self.counts[f"{kind}:{b}"] for b in range(len(LATENCY_EDGES))]
        total = sum(bins)
        if not total:
            return None
        seen = 0
        for edge, n in zip(LATENCY_EDGES, bins, strict=True):
            seen += n
            if seen >= q * total:
                return edge
        return LATENCY_EDGES[-1]


def read_series(
    client: redis.Redis,
    config: MetricsConfig = MetricsConfig(),
    since: float = 0.0,
    until: float | None = None,
    rollup: bool = False,
) -> list[MetricPoint]:
    """Every (bucket, version, domain) point with since <= bucket start <= until, oldest first; of
    the rollup buckets when `rollup`."""
    index = config.index_key(rollup)
    starts = [int(s) for s in client.zrangebyscore(index, since, "+inf" if until is None else until)]
    pipe = client.pipeline(transaction=False)
    for start in starts:
        pipe.hgetall(config.bucket_key(start, rollup))
    points: dict[tuple[int, str, str], MetricPoint] = {}
    for start, fields in zip(starts, pipe.execute() if starts else [], strict=True):
        for raw_field, raw_value in fields.items():
            version, domain, name = raw_field.decode().split("|", 2)
            point = points.get((start, version, domain))
            if point is None:
                point = points[start, version, domain] = MetricPoint(start, version, domain)
            point.counts[name] += int(raw_value)
    return sorted(points.values(), key=lambda p: (p.start, p.version, p.domain))
