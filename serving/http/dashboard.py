"""The operator dashboard: `/dashboard` (a page and its script, served by the app itself) and
`/dashboard/data` (everything the page draws, as JSON).

The data come pre-aggregated from the store, never from raw traces: the metric series of the
chosen range (`store.metrics`: 10 s buckets, or its 5-minute rollups for the day) are summed into
at most `BINS` display bins of whole buckets, overall,
per domain and per draft version, with latency percentiles read off the histogram bins; the
registry's history gives the publish, rollback and reject markers; the draft versions, the
standing drift alerts (`store.drift`) and the trainer's status (with what it is doing or
waiting for, in words) complete it. The speedup over plain
decoding comes from the speedup model with each bin's measured tau and the k and c the replicas
report in their heartbeats; which proposer drafted the steps (the per-step controller's choices)
and how each was accepted; and with suffix speculation the replicas' suffix index (what each
holds, how often a lookup matched). `aggregate`, `with_speedup` and `suffix_index` are pure.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from importlib import resources

import redis
from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, Response

from serving.http.admin import TrainerControl
from serving.http.prometheus import gauge
from store.drift import DriftConfig, read_alerts
from store.load import read_metrics
from store.metrics import LATENCY_EDGES, MetricPoint, MetricsConfig, read_series
from store.registry import Registry

RANGES = {"5m": 300, "1h": 3600, "24h": 86400}
BINS = 120


def percentile(counts: Counter, histogram: str, q: float) -> float | None:
    """The q-quantile (0..1) of a latency histogram in `counts` (`<histogram>:<bin>` keys), as the
    upper edge of the bin it falls in; None without observations."""
    bins = sorted((int(k.split(":")[1]), v) for k, v in counts.items() if k.startswith(histogram + ":"))
    total = sum(v for _, v in bins)
    if not total:
        return None
    seen = 0
    for index, count in bins:
        seen += count
        if seen >= q * total:
            return LATENCY_EDGES[index]
    return LATENCY_EDGES[bins[-1][0]]


def summary(counts: Counter, seconds: float) -> dict:
    """What one display bin shows of summed counters."""
    drafted, accepted, steps = counts["drafted"], counts["accepted"], counts["steps"]
    return {
        "requests": counts["requests"],
        "acceptance": accepted / drafted if drafted else None,
        "mean_accepted_length": (accepted + steps) / steps if steps else None,
        "tokens_per_s": counts["tokens"] / seconds,
        "ttft_p50": percentile(counts, "ttft", 0.5),
        "ttft_p99": percentile(counts, "ttft", 0.99),
        "tpot_p50": percentile(counts, "tpot", 0.5),
        "tpot_p99": percentile(counts, "tpot", 0.99),
    }


def bin_layout(seconds: float, now: float, resolution: int, bins: int = BINS) -> tuple[float, float, int]:
    """(start, end, count) of at most `bins` display bins ending with the one that holds `now` and
    covering the last `seconds` to within a bin; each is a whole number of the series' buckets
    (`resolution` seconds) and aligned to them, so that every bin sums whole buckets."""
    width = math.ceil(seconds / bins / resolution) * resolution
    end = math.ceil(now / width) * width
    count = math.ceil(seconds / width)
    return end - count * width, end, count


def with_speedup(overall: list[dict], k: float, c: float) -> list[dict]:
    """Each bin with the speedup over plain decoding that the speedup model gives for its measured
    tau: S = tau / (k c + 1), tau = (1 - alpha^(k+1)) / (1 - alpha) being the tokens per step."""
    return [
        b
        | {"speedup": None if b["mean_accepted_length"] is None else b["mean_accepted_length"] / (k * c + 1)}
        for b in overall
    ]


def suffix_index(snapshots: Mapping[str, Iterable[dict]]) -> dict | None:
    """Suffix speculation's index as the replicas report it (None without it): the most requests
    and tokens one holds (each holds every replica's requests), and the share of all lookups that
    matched."""
    tokens = gauge(snapshots, "suffix_index_tokens")
    if not tokens:
        return None
    lookups, hits = sum(gauge(snapshots, "suffix_lookups")), sum(gauge(snapshots, "suffix_hits"))
    return {
        "documents": max(gauge(snapshots, "suffix_index_documents")),
        "tokens": max(tokens),
        "hit_rate": hits / lookups if lookups else None,
    }


def aggregate(points: Iterable[MetricPoint], start: float, end: float, bins: int = BINS) -> dict:
    """Series of `bins` equal bins over [start, end): overall, by domain, by version (acceptance
    only for the last two), per proposer (its share of the steps; its acceptance over the whole
    range), and per-position acceptance by version over the whole range."""
    width = (end - start) / bins
    overall: dict[int, Counter] = defaultdict(Counter)
    by_domain: dict[str, dict[int, Counter]] = defaultdict(lambda: defaultdict(Counter))
    by_version: dict[str, dict[int, Counter]] = defaultdict(lambda: defaultdict(Counter))
    positions: dict[str, Counter] = defaultdict(Counter)
    for point in points:
        index = int((point.start - start) // width)
        if not 0 <= index < bins:
            continue
        overall[index].update(point.counts)
        by_domain[point.domain][index].update(point.counts)
        by_version[point.version][index].update(point.counts)
        positions[point.version].update({k: v for k, v in point.counts.items() if k.startswith("pos_")})

    def times(index: int) -> float:
        return start + index * width

    def acceptance(series: dict[int, Counter]) -> list[dict]:
        return [
            {"t": times(i), "acceptance": c["accepted"] / c["drafted"]}
            for i, c in sorted(series.items())
            if c["drafted"]
        ]

    def proposers() -> dict[str, dict]:
        total = sum(overall.values(), Counter())
        names = sorted(k.split(":", 1)[1] for k in total if k.startswith("proposer_steps:"))
        return {
            name: {
                "share": [
                    {"t": times(i), "share": c[f"proposer_steps:{name}"] / c["steps"]}
                    for i, c in sorted(overall.items())
                    if c["steps"]
                ],
                "acceptance": total[f"proposer_accepted:{name}"] / drafted
                if (drafted := total[f"proposer_drafted:{name}"])
                else None,
            }
            for name in names
        }

    def per_position(counts: Counter) -> list[float | None]:
        n = max((int(k.split(":")[1]) for k in counts), default=0)
        return [
            counts[f"pos_accepted:{i}"] / counts[f"pos_drafted:{i}"] if counts[f"pos_drafted:{i}"] else None
            for i in range(1, n + 1)
        ]

    return {
        "bin_seconds": width,
        "overall": [{"t": times(i)} | summary(c, width) for i, c in sorted(overall.items())],
        "by_domain": {d: acceptance(s) for d, s in sorted(by_domain.items())},
        "by_version": {v: acceptance(s) for v, s in sorted(by_version.items())},
        "positions": {v: per_position(c) for v, c in sorted(positions.items())},
        "proposers": proposers(),
    }


def dashboard_router(
    client: redis.Redis,
    draft_name: str,
    domain: str,
    metrics: MetricsConfig,
    trainer: TrainerControl | None = None,
    adapters: bool = False,
) -> APIRouter:
    """The dashboard's routes; `adapters`: whether the replicas serve per-domain adapters (the
    drift alerts depend on it, see `store.drift`)."""
    router = APIRouter()
    registry = Registry(client)

    @router.get("/dashboard", response_class=HTMLResponse)
    def page() -> str:
        return _asset("dashboard.html")

    @router.get("/dashboard/dashboard.js")
    def script() -> Response:
        return Response(_asset("dashboard.js"), media_type="text/javascript")

    @router.get("/dashboard/data")
    def data(range: str = Query("1h", pattern="^(5m|1h|24h)$")) -> dict:
        now = time.time()
        rollup = RANGES[range] / BINS >= metrics.rollup_seconds
        resolution = metrics.rollup_seconds if rollup else metrics.bucket_seconds
        start, end, bins = bin_layout(RANGES[range], now, resolution)
        drift_since = now - DriftConfig().window_seconds
        try:  # the drift alerts look back window_seconds in the fine series; short ranges share the read
            recent = read_series(client, metrics, since=drift_since if rollup else min(start, drift_since))
            points = read_series(client, metrics, since=start, rollup=True) if rollup else recent
            body = aggregate(points, start, end, bins)
            snapshots = read_metrics(client)
            ks, cs = gauge(snapshots, "num_speculative_tokens"), gauge(snapshots, "draft_cost_ratio")
            if ks and cs:  # the replicas' mean k and c
                body["speculation"] = {"k": sum(ks) / len(ks), "c": sum(cs) / len(cs)}
                body["overall"] = with_speedup(body["overall"], **body["speculation"])
            body["suffix"] = suffix_index(snapshots)
            body["events"] = [e for e in registry.history(since=start) if e.get("name") == draft_name]
            versions = [v for d in registry.domains(draft_name) for v in registry.versions(draft_name, d)]
            newest_first = sorted(versions, key=lambda v: -v.created)
            body["versions"] = [asdict(v) | {"label": v.label} for v in newest_first]
            alerts = read_alerts(client, draft_name, now=now, points=recent, adapters=adapters)
            body["alerts"] = [a.to_json() for a in alerts]
            body["store"] = "ok"
        except redis.RedisError as err:
            empty = {"events": [], "versions": [], "alerts": [], "store": str(err)}
            body = aggregate([], start, end, bins) | empty
        body["trainer"] = _trainer_status(trainer)
        return body | {"now": now, "range": range, "draft_name": draft_name, "domain": domain}

    return router


def _trainer_status(trainer: TrainerControl | None) -> dict | None:
    if trainer is None:
        return None
    try:
        return trainer.status()
    except Exception as err:  # the trainer is restarting or gone: the page says so
        return {"state": f"unavailable: {err}"}


def _asset(name: str) -> str:
    return resources.files("serving.http").joinpath("static", name).read_text()
