"""A serving replica: an engine (serving.engine.protocol) behind a bounded queue, with everything a
request leaves.

Callers on an asyncio loop await `stream()` or `complete()`. The replica submits each request to
its engine (serving.engine.core for the HF engine), which decodes with continuous batching on its
own thread and hands each step's tokens back in one batch; the replica wakes each caller's loop
once per step. Past `max_batch` requests decoding and `max_queue` waiting, a request is refused
(ServerBusyError); past its `request_timeout` it fails and is abandoned, freeing its slot.

Per request it writes a trace (non-blocking, through `store.traces`), and records acceptance and
latency counters per draft version and domain, both as time series in Redis (`store.metrics`,
for the dashboard and drift) and as Prometheus metrics (`serving.http.prometheus`). A heartbeat
thread publishes the replica's load (requests in flight and queued) for the trainer's throttle
whenever it changes, and its version and metrics snapshot every `heartbeat_seconds`
(`store.load`).

Hot-swap: a `LiveWatcher` follows the registry's live version of the draft. A new version's
weights are loaded on the watcher's thread and handed to the engine, which checks them and serves
them from a later step on, in place, to new requests and to those in flight (the target's
verification keeps the output exact); a trace names every version that drafted for its request.
The weights served and the previous ones stay on the host, so a rollback loads nothing from the
registry. A version that fails to load (corrupt blob, wrong vocabulary or shapes) is refused and
counted, and the replica keeps serving the one it has. At start-up the replica loads the live
version, if any, before it takes requests.

Per-domain adapters (`adapters`): the watcher follows every domain of the draft's name, and each
domain's live LoRA adapter is served by its own draft in the engine. A request goes to the adapter
of the domain it names, else to the one the live router (`distill.router`) picks with at least
`router_min_confidence`, else to the shared draft. A domain whose adapter fails to load keeps what
it had, or the shared draft.

Suffix speculation (`suffix`): a follower thread reads every replica's traces as they
land (`store.traces.TraceFollower`) and hands the other replicas' requests to the engine's index
(`Engine.remember`); its own, which its engine indexed as they finished, it skips by request id.

Redis failures degrade, never fail, serving: traces queue and drop oldest-first in the writer,
metric counters wait for the next flush, and a failed load publication is logged and retried on
the next beat.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import redis

from distill.router import ROUTER, DomainRouter, served_domain
from serving.engine.core import HFEngine
from serving.engine.hf import ProposerName
from serving.engine.process import EngineProcess
from serving.engine.protocol import Engine, EngineRequest, Generation, Step
from serving.engine.vllm import VLLMEngine, VLLMSettings
from serving.errors import (
    IncompatibleDraftError,
    InvalidRequestError,
    RequestTimeoutError,
    ServerBusyError,
)
from serving.http.prometheus import STATE, ReplicaMetrics
from serving.tracing import trace_of
from store.load import forget, publish_load
from store.metrics import MetricsConfig, MetricsRecorder, request_counters
from store.registry import ALL_DOMAINS, CorruptWeightsError, DraftVersion, LiveWatcher, Registry
from store.traces import StreamConfig, TraceFollower, TraceWriter, in_fraction

log = logging.getLogger(__name__)

EngineName = Literal["hf", "vllm"]
ENGINES: tuple[EngineName, ...] = ("hf", "vllm")
DOMAIN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # a request's domain tag, as traces and metrics key it
OWN_TRACES = 4096  # own request ids remembered, so that a replica does not index its own twice
FOLLOW_BLOCK_MS = 500  # the follower waits this long for traces, then looks whether to stop
REFUSED = (CorruptWeightsError, IncompatibleDraftError, KeyError, TypeError, ValueError)  # a bad version


@dataclass(frozen=True)
class ReplicaConfig:
    """One replica: the models it serves and where its traces, metrics and drafts live."""

    target: str  # local directory or hub id
    draft: str | None = None  # the base draft; registry versions are loaded into copies of it
    engine: EngineName = "hf"  # the HF engine (serving.engine.core) or vLLM (serving.engine.vllm)
    vllm: VLLMSettings = VLLMSettings()  # vLLM's own engine arguments, with engine "vllm"
    engine_process: bool = True  # hf: decode in a process of its own (serving.engine.process), else a thread
    proposer: ProposerName | None = None  # default: "draft" with a draft, else "none"
    num_speculative_tokens: int = 3
    device: str | None = None
    dtype: str | None = None
    target_id: str | None = None  # the name traces carry; default: the target's directory name
    draft_name: str = "draft"  # the registry name whose live version is served
    registry_dir: str | None = None  # the registry's file directory (drafts too large for Redis)
    domain: str = ALL_DOMAINS
    replica_id: str = field(default_factory=lambda: f"replica-{uuid.uuid4().hex[:8]}")
    max_queue: int = 64  # requests waiting beyond the batch; more are refused with ServerBusyError
    max_batch: int = 8  # requests decoded together (continuous batching); 1: one at a time
    max_model_len: int | None = None  # prompt plus output, per request; None: the target's context
    gpu_memory_utilization: float = 0.8  # on CUDA, the replica's share of the GPU (weights, KV, graphs)
    trainer_gpu_share: float = 0.0  # the trainer's part of the same GPU, when it trains there
    request_timeout: float | None = None  # seconds from arrival; past it a request fails and frees its slot
    adaptive_k: bool = True  # the per-step controller plans each step from the load (else always k)
    suffix: bool = False  # suffix speculation beside the proposer, under the per-step controller (HF engine)
    trace_top_k: int = 16  # the target's top-K logged per position
    hidden_fraction: float = 0.0  # requests whose traces carry the target's hidden states (for heads)
    heads_tree: tuple[int, ...] | None = None  # heads: a static tree's branching, for greedy requests
    adapters: bool = False  # serve each domain's own live version, and route by the live router
    router_min_confidence: float = 0.6  # a less confident routing gets the shared draft
    load_ttl_seconds: float = 10.0  # a heartbeat not refreshed for this long counts as gone
    heartbeat_seconds: float = 1.0
    poll_seconds: float = 2.0  # registry poll, a fallback to pub/sub
    stream: StreamConfig = StreamConfig()
    metrics: MetricsConfig = MetricsConfig()

    def __post_init__(self):
        if self.max_queue < 1 or self.trace_top_k < 1 or self.max_batch < 1:
            raise ValueError("max_queue, max_batch and trace_top_k must be >= 1")
        if not 0.0 <= self.hidden_fraction <= 1.0:
            raise ValueError(f"hidden_fraction must lie in [0, 1], got {self.hidden_fraction}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must lie in (0, 1], got {self.gpu_memory_utilization}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {self.request_timeout}")
        if not 0 < self.heartbeat_seconds < self.load_ttl_seconds:
            raise ValueError("need 0 < heartbeat_seconds < load_ttl_seconds")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "vllm" and (problem := vllm_problem(self)):
            raise ValueError(problem)


@dataclass(frozen=True)
class Request:
    """One completion request, in token ids (the API layer tokenizes)."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] | None = None  # None: the target's EOS
    domain: str = "-"
    request_id: str = field(default_factory=lambda: f"req-{uuid.uuid4().hex}")
    logprobs: int | None = None  # the target's top log-probs per token the caller wants (0: the chosen only)

    def __post_init__(self):
        if not DOMAIN.fullmatch(self.domain):
            raise InvalidRequestError(f"domain must match {DOMAIN.pattern}, got {self.domain!r}")


@dataclass(frozen=True)
class Finished:
    """The end of a request: what was generated, and by which draft version."""

    generation: Generation
    draft_version: str  # it started on, e.g. "draft:v3", or the proposer's name without a registry ("ngram")
    draft_versions: tuple[str, ...]  # every version that drafted for it, in order
    ttft_seconds: float
    seconds: float


@dataclass
class _Job:
    """A request from its submission to its end: its caller, the domain it is served as, the versions
    that drafted for it (the first is the one it started on)."""

    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # Step, then Finished; or an exception
    enqueued: float
    deadline: float | None  # perf_counter time past which it fails (request_timeout)
    domain: str
    versions: list[str] = field(default_factory=list)
    first: float | None = None  # when its first tokens were handed over


def vllm_problem(config: ReplicaConfig) -> str | None:
    """Why the vLLM engine cannot serve `config`, in one line; None when it can."""
    if config.proposer in ("medusa", "hydra") or config.heads_tree or config.hidden_fraction:
        return (
            "the vLLM engine cannot serve draft heads (they read the target's hidden states): use --engine hf"
        )
    if config.adapters:
        return "the vLLM engine serves one draft, not per-domain adapters: use --engine hf"
    if config.suffix:
        return "the vLLM engine drafts with a draft model or n-grams, not suffix speculation: use --engine hf"
    return None


def open_engine(config: ReplicaConfig) -> Engine:
    """The engine `config` asks for, loaded."""
    if config.engine == "vllm":
        return VLLMEngine(
            config.target, config.draft, config.proposer, config.num_speculative_tokens, config.dtype,
            config.max_batch, config.max_model_len, config.gpu_memory_utilization,
            f"{config.draft_name}:base", config.domain, config.vllm,
        )  # fmt: skip
    hf = {
        "target": config.target, "draft": config.draft, "proposer": config.proposer,
        "k": config.num_speculative_tokens, "device": config.device, "dtype": config.dtype,
        "heads_tree": config.heads_tree, "max_batch": config.max_batch,
        "max_model_len": config.max_model_len, "gpu_memory_utilization": config.gpu_memory_utilization,
        "trainer_gpu_share": config.trainer_gpu_share,
        "adaptive_k": config.adaptive_k, "base_label": f"{config.draft_name}:base", "domain": config.domain,
        "suffix": config.suffix,
    }  # fmt: skip
    return EngineProcess(hf) if config.engine_process else HFEngine(**hf)


class Replica:
    """See the module docstring."""

    def __init__(self, config: ReplicaConfig, client: redis.Redis):
        self.config, self.client = config, client
        self.engine = open_engine(config)
        self.target_id = config.target_id or Path(config.target).name
        self.context = self.engine.max_length  # prompt plus new tokens
        self.k, self.cost_ratio = self.engine.k, self.engine.cost_ratio
        self.registry = Registry(client, file_dir=config.registry_dir)
        self.refused = 0
        self._jobs: dict[str, _Job] = {}  # request id -> its job, from submission to its end
        self._host: dict[str, tuple[str, dict]] = {}  # domain -> (label, weights) served, on the host
        self._previous: dict[str, tuple[str, dict]] = {}  # domain -> what it served before (rollback)
        self.writer = TraceWriter(client, config.stream)
        self.recorder = MetricsRecorder(client, config.metrics)
        self.metrics = ReplicaMetrics()
        self._closed = False
        self._router: tuple[DomainRouter, str] | None = None  # the live router and its label
        self.watcher = self.router_watcher = None
        if self.engine.serves is not None:  # registry versions apply
            watched = None if config.adapters else config.domain
            self.watcher = LiveWatcher(
                self.registry, config.draft_name, self._swap, watched, config.poll_seconds
            )
            if not self.watcher.started.wait(timeout=60):  # the live version first, then requests
                log.warning("no answer from the registry yet; serving %s meanwhile", self.draft_version)
            if config.adapters:
                self.router_watcher = LiveWatcher(
                    self.registry, ROUTER, self._load_router, ALL_DOMAINS, config.poll_seconds
                )
        self.engine.start(self._hand_over)
        self._changed = threading.Event()  # the load changed: beat now
        self._changed.set()  # the first beat announces the replica
        self._heartbeat = threading.Thread(
            target=self._beat, name=f"heartbeat-{config.replica_id}", daemon=True
        )
        self._heartbeat.start()
        self._own: dict[str, None] = {}  # this replica's latest traced request ids, oldest first
        self._follower = None
        if config.suffix:
            self._follower = threading.Thread(target=self._follow, name="trace-follower", daemon=True)
            self._follower.start()

    # The caller's side (asyncio).
    async def stream(self, request: Request) -> AsyncIterator[Step | Finished]:
        """Each decode step's tokens as they come, then a Finished. Raises InvalidRequestError for
        a bad request and ServerBusyError when the replica is full or stopped. Leaving early frees
        the slot."""
        self._check_open()
        waiting = len(self._jobs) - self.engine.running()
        if len(self._jobs) >= self.config.max_batch + self.config.max_queue:
            raise ServerBusyError(f"{waiting} requests are waiting; try again later")
        if request.request_id in self._jobs:
            raise InvalidRequestError(f"request id {request.request_id!r} is already being served")
        now, timeout = time.perf_counter(), self.config.request_timeout
        deadline = timeout and now + timeout
        job = _Job(request, asyncio.get_running_loop(), asyncio.Queue(), now, deadline, self._domain(request))
        self._jobs[request.request_id] = job
        hidden = in_fraction(f"hidden:{request.request_id}", self.config.hidden_fraction)
        self.engine.submit(EngineRequest(
            request.request_id, request.prompt_ids, request.max_new_tokens, request.temperature,
            request.top_p, request.top_k, request.seed, request.stop_token_ids,
            max(self.config.trace_top_k, request.logprobs or 0), hidden, job.domain,
        ))  # fmt: skip
        self._changed.set()
        try:
            while True:
                event = await self._next_event(job)
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            if self._jobs.pop(request.request_id, None) is not None:  # it left before its end
                self.engine.abandon(request.request_id)
                self._changed.set()

    def _check_open(self) -> None:
        if self._closed:
            raise ServerBusyError("the replica is shutting down")
        try:
            self.engine.check_health()
        except RuntimeError as err:
            raise ServerBusyError(str(err)) from None

    async def _next_event(self, job: _Job) -> object:
        """The job's next event; past its deadline a RequestTimeoutError, even when a step never
        returns."""
        if job.deadline is None:
            return await job.events.get()
        try:
            return await asyncio.wait_for(job.events.get(), max(0.0, job.deadline - time.perf_counter()))
        except TimeoutError:
            return RequestTimeoutError(
                f"request {job.request.request_id} ran past its deadline of {self.config.request_timeout:g} s"
            )

    async def complete(self, request: Request) -> Finished:
        events = [event async for event in self.stream(request)]
        return events[-1]  # the stream ends with Finished

    @property
    def draft_version(self) -> str:
        return self.engine.versions()[self.config.domain]

    def _load(self) -> tuple[int, int]:
        """Requests in flight (in the engine's batch) and queued (waiting for room)."""
        running = self.engine.running()
        return running, max(0, len(self._jobs) - running)

    def status(self) -> dict:
        versions = self.engine.versions()
        in_flight, queued = self._load()
        return {
            "replica": self.config.replica_id,
            "pid": os.getpid(),
            "draft_version": versions[self.config.domain],
            "adapters": {d: label for d, label in sorted(versions.items()) if d != self.config.domain},
            "router": None if self._router is None else self._router[1],
            "in_flight": in_flight,
            "queued": queued,
            "refused_versions": self.refused,
            **self.engine.status(),
            "traces": vars(self.writer.stats()),
        }

    def metrics_snapshot(self) -> list[dict]:
        """This replica's Prometheus families, as `serving.http.prometheus.render` takes them."""
        traces, engine = self.writer.stats(), self.engine.status()
        in_flight, queued = self._load()
        state = {
            "num_requests_running": in_flight,
            "num_requests_waiting": queued,
            "draft_swaps": engine["swaps"],
            "draft_refused": self.refused,
            "draft_swap_load_seconds": engine["last_swap_seconds"] or 0.0,
            "traces_written": traces.written,
            "traces_dropped": traces.dropped,
            "traces_queued": traces.queued,
            "traces_write_errors": traces.write_errors,
            "trace_store_up": float(traces.connected),
            "num_speculative_tokens": self.k,
            "draft_cost_ratio": self.cost_ratio,
            **{name: value for name, value in engine.items() if name in STATE},  # the suffix index's
        }
        return self.metrics.snapshot(self.draft_version, state, self.engine.metrics())

    def check_health(self) -> None:
        """Raise RuntimeError when the engine can no longer decode (Ray Serve then replaces the replica)."""
        self.engine.check_health()

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop; flush traces and metrics."""
        self._closed = True
        if self._follower is not None:
            self._follower.join(timeout)
        self.engine.close(timeout)
        self._changed.set()
        self._heartbeat.join(timeout)
        for watcher in (self.watcher, self.router_watcher):
            if watcher is not None:
                watcher.stop()
        self.writer.close(timeout)
        self.recorder.close()

    # The engine's thread.
    def _hand_over(self, events: list[tuple[str, Step | BaseException]]) -> None:
        """What a step gave each caller: its tokens and, at its end, Finished (the request is
        logged first, so its metrics are recorded before the caller hears); or its failure."""
        handed: list[tuple[_Job, object]] = []
        left = False  # a request left: the load changed
        for request_id, event in events:
            job = self._jobs.get(request_id)
            if job is None:
                continue  # it was abandoned: nobody listens
            if isinstance(event, BaseException):
                del self._jobs[request_id]
                handed.append((job, event))
                left = True
                continue
            if not job.versions or job.versions[-1] != event.version:
                job.versions.append(event.version)
            now = time.perf_counter()
            job.first = job.first or now
            handed.append((job, event))
            if event.generation is not None:
                del self._jobs[request_id]
                handed.append((job, self._finished(job, event.generation, now)))
                left = True
        self._deliver(handed)
        if left:  # the heartbeat publishes the load when it changes, not at every step
            self._changed.set()

    def _finished(self, job: _Job, generation: Generation, now: float) -> Finished:
        versions = tuple(job.versions)
        finished = Finished(generation, versions[0], versions, job.first - job.enqueued, now - job.enqueued)
        try:
            self._log(job.request, finished, job.domain)
        except Exception:  # a bug in what a request leaves: the caller still gets its answer
            log.exception("could not log request %s", job.request.request_id)
        return finished

    def _deliver(self, events: list[tuple[_Job, object]]) -> None:
        """Hand events to their callers' event loops: one wake-up per loop, however many requests
        a step served (each is a system call and a turn of the GIL for the engine's thread)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, object]]] = {}
        for job, event in events:
            by_loop.setdefault(job.loop, []).append((job, event))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the callers' event loop has closed: nobody is listening any more
                for job, _ in batch:
                    if self._jobs.pop(job.request.request_id, None) is not None:
                        self.engine.abandon(job.request.request_id)

    def _domain(self, request: Request) -> str:
        """The domain a request is served as (its metrics' domain, and its adapter's when it has one):
        the one it names, else the router's confident guess, else the shared one."""
        router = None if self._router is None else self._router[0]
        return served_domain(request.domain, router, request.prompt_ids, self.config.router_min_confidence)

    def _log(self, request: Request, finished: Finished, domain: str) -> None:
        """The trace (under the domain the request named: what the router learns from) and the
        metrics (under the domain it was served as)."""
        generation, stats = finished.generation, finished.generation.stats
        sampling = {"temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k}
        if request.seed is not None:
            sampling["seed"] = request.seed
        trace = trace_of(
            request.request_id, request.domain, self.target_id, finished.draft_versions,
            request.prompt_ids, generation, sampling, self.config.trace_top_k,
        )  # fmt: skip
        if self._follower is not None:  # its own traces are in its engine's index already
            self._own[request.request_id] = None
            if len(self._own) > OWN_TRACES:
                del self._own[next(iter(self._own))]
        self.writer.append(trace)
        tokens = len(generation.token_ids)
        per_token = (finished.seconds - finished.ttft_seconds) / (tokens - 1) if tokens > 1 else None
        counters = request_counters(
            stats.steps, stats.drafted, stats.accepted, tokens, stats.drafted_per_position,
            stats.accepted_per_position, finished.ttft_seconds, per_token, stats.by_proposer,
        )  # fmt: skip
        self.recorder.record(finished.draft_version, domain, counters)
        self.metrics.observe(
            finished.draft_version, domain, stats, len(request.prompt_ids), tokens,
            generation.finish_reason, finished.ttft_seconds, finished.seconds,
        )  # fmt: skip

    # The heartbeat thread.
    def _beat(self) -> None:
        config, next_snapshot = self.config, 0.0
        while not self._closed:
            self._changed.wait(config.heartbeat_seconds)
            self._changed.clear()
            now = time.monotonic()
            snapshot = self.metrics_snapshot() if now >= next_snapshot else None
            try:
                publish_load(
                    self.client, config.replica_id, *self._load(), config.load_ttl_seconds,
                    self.draft_version, snapshot,
                )  # fmt: skip
                if snapshot is not None:
                    next_snapshot = now + config.heartbeat_seconds
            except redis.RedisError as err:
                log.warning("heartbeat failed: %s", err)
                time.sleep(config.heartbeat_seconds)  # no tight loop while Redis is down
        try:
            forget(self.client, config.replica_id)
        except redis.RedisError as err:
            log.warning(
                "could not remove the heartbeat; it expires in %s s: %s", config.load_ttl_seconds, err
            )

    # The follower's thread.
    def _follow(self) -> None:
        """Suffix speculation drafts from what every replica serves: the other replicas' requests
        join this engine's index as their traces land."""
        follower = None
        while not self._closed:
            try:
                follower = follower or TraceFollower(self.client, self.config.stream)
                for trace in follower.read(block_ms=FOLLOW_BLOCK_MS):
                    if trace.request_id not in self._own:
                        ids = [*trace.prompt_ids.tolist(), *trace.output_ids.tolist()]
                        self.engine.remember(trace.domain, ids)
            except redis.RedisError as err:
                log.warning("reading the other replicas' traces failed: %s", err)
                time.sleep(self.config.heartbeat_seconds)  # no tight loop while Redis is down

    # The watcher's thread.
    def _swap(self, meta: DraftVersion) -> None:
        """Load `meta`'s weights (what was served just before, for a rollback, as kept) and hand
        them to the engine, which checks them and serves them from a later step on."""
        previous = self._previous.get(meta.domain)
        try:
            weights = previous[1] if previous and previous[0] == meta.label else self.registry.load(meta)
            self.engine.load_draft(meta, weights)
        except REFUSED as err:
            self.refused += 1
            versions = self.engine.versions()
            kept = versions.get(meta.domain, versions[self.config.domain])
            log.error("refused draft %s, serving %s on: %s", meta.label, kept, err)
            return
        if meta.domain in self._host:
            self._previous[meta.domain] = self._host[meta.domain]
        self._host[meta.domain] = (meta.label, weights)

    def _load_router(self, meta: DraftVersion) -> None:
        try:
            router = DomainRouter.from_registry(self.registry.load(meta), meta.extra)
        except (CorruptWeightsError, KeyError, TypeError, ValueError) as err:
            self.refused += 1
            log.error("refused router %s, routing on with what it had: %s", meta.label, err)
            return
        self._router = (router, meta.label)
        log.info("routing with %s over %s", meta.label, list(router.domains))


def _put_all(events: list[tuple[_Job, object]]) -> None:
    for job, event in events:
        job.events.put_nowait(event)
