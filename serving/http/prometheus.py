"""Prometheus metrics: each replica counts in process; `/metrics` shows every live replica.

A replica counts finished requests into its own `ReplicaMetrics`: vLLM's spec-decode counters
under the `osd:` prefix (`osd:spec_decode_num_drafts_total`, `..._num_draft_tokens_total`,
`..._num_accepted_tokens_total`, `..._num_accepted_tokens_per_pos_total{position}`) with
`draft_version` and `domain` labels, the same per proposer (`osd:proposer_steps_total`,
`..._draft_tokens_total`, `..._accepted_tokens_total`, labelled `proposer` too: draft, heads, ngram,
suffix, none), token and request counters, and latency histograms (time to
first token, time per output token, end to end). `snapshot()` adds the replica's state (load,
swaps, refused versions, the last swap's load time, trace writes and drops) and what its engine
counts itself (with the vLLM engine, vLLM's own `vllm:spec_decode_*` counters), and returns it all
as JSON-able families, which the replica's heartbeat publishes next to its load (`store.load`).
`render()` merges the snapshots of all live replicas into one exposition, each sample labelled
`replica`, so a scrape through any load balancer sees the whole deployment. Standing drift
alerts (`store.drift`) appear as `osd:drift_alert{domain,kind}`, and restarts of the embedded
redis-server by `osd serve` (`store.redis_server`) as `osd:redis_restarts_total`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import Metric

from serving.engine.stats import SpecStats
from store.drift import DriftAlert

PREFIX = "osd:"
LABELS = ("draft_version", "domain")
# Latency bucket upper edges, seconds: CPU tiny models to GPU 7B targets.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60)
TPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)
E2E_BUCKETS = (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)

# The replica's state at snapshot time: name -> (type, help). Counters get the `_total` suffix.
STATE = {
    "num_requests_running": ("gauge", "Requests decoding now."),
    "num_requests_waiting": ("gauge", "Requests queued on the replica."),
    "draft_swaps": ("counter", "Draft versions swapped in."),
    "draft_refused": ("counter", "Draft versions refused on load (corrupt, wrong vocabulary or shapes)."),
    "draft_swap_load_seconds": (
        "gauge",
        "Loading and checking the last swapped-in version, off the decode path.",
    ),
    "traces_written": ("counter", "Traces Redis acknowledged."),
    "traces_dropped": ("counter", "Traces dropped, oldest first, while Redis was slow or down."),
    "traces_queued": ("gauge", "Traces not yet written: queued, or in a batch being written."),
    "traces_write_errors": ("counter", "Failed trace writes (each retried): Redis down, out of memory, ..."),
    "trace_store_up": ("gauge", "1 when the last trace write succeeded, else 0 (see the replica's log)."),
    "num_speculative_tokens": ("gauge", "k: the most draft tokens proposed per step."),
    "draft_cost_ratio": ("gauge", "c: a step's extra time per drafted token over a plain step (at start)."),
    "suffix_index_tokens": ("gauge", "Tokens the suffix index holds (suffix speculation)."),
    "suffix_index_documents": ("gauge", "Requests the suffix index holds, from every replica."),
    "suffix_lookups": ("counter", "Suffix index lookups: one per sequence and drafting step."),
    "suffix_hits": ("counter", "Suffix index lookups that matched the context's suffix."),
}


class ReplicaMetrics:
    """One replica's counters and histograms, in a registry of its own."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=False)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, LABELS + extra, registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, ("domain",), registry=self.registry, buckets=buckets)

        self.drafts = counter("spec_decode_num_drafts", "Decode steps that verified a draft.")
        self.draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens proposed.")
        self.accepted = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.accepted_per_pos = counter(
            "spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted at each draft position.",
            ("position",),
        )  # fmt: skip
        self.proposer_steps = counter(
            "proposer_steps", "Decode steps, by the proposer that drafted.", ("proposer",)
        )
        self.proposer_drafted = counter(
            "proposer_draft_tokens", "Draft tokens proposed, by proposer.", ("proposer",)
        )
        self.proposer_accepted = counter(
            "proposer_accepted_tokens", "Draft tokens accepted, by proposer.", ("proposer",)
        )
        self.requests = counter("request_success", "Requests decoded to their end.", ("finished_reason",))
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated by finished requests.")
        self.ttft = histogram("time_to_first_token_seconds", "Queueing plus the first step.", TTFT_BUCKETS)
        self.tpot = histogram(
            "time_per_output_token_seconds", "Time per token after the first.", TPOT_BUCKETS
        )
        self.e2e = histogram("e2e_request_latency_seconds", "Queueing plus decoding.", E2E_BUCKETS)

    def observe(
        self,
        draft_version: str,
        domain: str,
        stats: SpecStats,
        prompt_tokens: int,
        tokens: int,
        finish_reason: str,
        ttft_seconds: float,
        seconds: float,
    ) -> None:
        """Count one finished request."""
        labels = (draft_version, domain)
        self.drafts.labels(*labels).inc(sum(1 for d in stats.drafted_per_step if d))
        self.draft_tokens.labels(*labels).inc(stats.drafted)
        self.accepted.labels(*labels).inc(stats.accepted)
        for position, accepted in enumerate(stats.accepted_per_position, start=1):
            self.accepted_per_pos.labels(*labels, str(position)).inc(accepted)
        for name, count in stats.by_proposer.items():
            self.proposer_steps.labels(*labels, name).inc(count["steps"])
            self.proposer_drafted.labels(*labels, name).inc(count["drafted"])
            self.proposer_accepted.labels(*labels, name).inc(count["accepted"])
        self.requests.labels(*labels, finish_reason).inc()
        self.prompt_tokens.labels(*labels).inc(prompt_tokens)
        self.generation_tokens.labels(*labels).inc(tokens)
        self.ttft.labels(domain).observe(ttft_seconds)
        self.e2e.labels(domain).observe(seconds)
        if tokens > 1:
            self.tpot.labels(domain).observe((seconds - ttft_seconds) / (tokens - 1))

    def snapshot(
        self, draft_version: str, state: Mapping[str, float], engine: Iterable[Metric] = ()
    ) -> list[dict]:
        """Every family as JSON-able dicts: the counters, `state` (keys of STATE), the version
        served, and what the engine counts itself (`engine`, collected). A state missing or None is
        left out."""
        families = [
            {
                "name": metric.name,
                "type": metric.type,
                "help": metric.documentation,
                "samples": [
                    [s.name, s.labels, s.value] for s in metric.samples if not s.name.endswith("_created")
                ],
            }
            for metric in [*self.registry.collect(), *engine]
        ]
        for name, (kind, doc) in STATE.items():
            if state.get(name) is None:  # unknown here (c under vLLM; the suffix index without one)
                continue
            sample = PREFIX + name + ("_total" if kind == "counter" else "")
            families.append(
                {"name": PREFIX + name, "type": kind, "help": doc, "samples": [[sample, {}, state[name]]]}
            )
        info = [[PREFIX + "draft_info", {"draft_version": draft_version}, 1.0]]
        families.append(
            {
                "name": PREFIX + "draft_info",
                "type": "gauge",
                "help": "The draft version served.",
                "samples": info,
            }
        )
        return families


def gauge(snapshots: Mapping[str, Iterable[dict]], name: str) -> list[float]:
    """The value of the unlabelled gauge `name` (without the prefix) in each replica's snapshot."""
    return [
        sample[2]
        for families in snapshots.values()
        for family in families
        if family["name"] == PREFIX + name
        for sample in family["samples"]
    ]


def render(
    snapshots: Mapping[str, Iterable[dict]],
    alerts: Iterable[DriftAlert] = (),
    redis_restarts: int | None = None,
) -> bytes:
    """One Prometheus text exposition of replica -> snapshot, each sample labelled `replica`, the
    standing drift alerts as `osd:drift_alert{domain,kind}`, and, when it is known (an embedded
    Redis), how often it was restarted as `osd:redis_restarts_total`."""
    merged: dict[str, Metric] = {}
    for replica, families in sorted(snapshots.items()):
        for family in families:
            metric = merged.setdefault(family["name"], Metric(family["name"], family["help"], family["type"]))
            for name, labels, value in family["samples"]:
                metric.add_sample(name, {**labels, "replica": replica}, value)
    replicas = Metric(PREFIX + "replicas", "Replicas whose metrics this exposition holds.", "gauge")
    replicas.add_sample(PREFIX + "replicas", {}, float(len(snapshots)))
    drift = Metric(PREFIX + "drift_alert", "Standing acceptance-drift alerts (1 each).", "gauge")
    for alert in alerts:
        drift.add_sample(PREFIX + "drift_alert", {"domain": alert.domain, "kind": alert.kind}, 1.0)
    families = [*merged.values(), replicas, drift]
    if redis_restarts is not None:
        doc = "Restarts of the embedded redis-server after it died."
        restarts = Metric(PREFIX + "redis_restarts", doc, "counter")
        restarts.add_sample(PREFIX + "redis_restarts_total", {}, float(redis_restarts))
        families.append(restarts)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    return generate_latest(registry)


class _Fixed:
    """A collector of ready-made families."""

    def __init__(self, metrics: list[Metric]):
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics
