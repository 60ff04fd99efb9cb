"""A serving replica: the engine behind a bounded request queue, with everything a request leaves.

`Replica` decodes on its own decode thread with continuous batching: between two engine steps,
requests join the batch from the queue (first come, first served, up to `max_batch` at once) and
finished or abandoned ones leave it, so one target forward verifies the drafts of every request
in flight (serving.engine.hf). Callers on an asyncio loop await `stream()` or `complete()`. At
start-up the replica times the engine's steps (`SpecEngine.calibrate`): with `adaptive_k`, k
then follows the load, down to 0 when the batch is too full for speculation to pay.

Per request it writes a trace (non-blocking, through `store.traces`), and records acceptance and
latency counters per draft version and domain, both as time series in Redis (`store.metrics`,
for the dashboard and drift) and as Prometheus metrics (`serving.http.prometheus`). A heartbeat
thread publishes the replica's load (requests in flight and queued) for the trainer's throttle
whenever it changes, and its version and metrics snapshot every `heartbeat_seconds`
(`store.load`).

Hot-swap in place: a `LiveWatcher` follows the registry's live version of the draft. A new
version's weights are loaded and checked on the watcher's thread, off the decode path, on the
host (a LoRA adapter is merged there, into a host copy of the base draft); the decode thread then
copies them into the live draft (or heads) between two steps: no new module, no new cache, no
recompiled graph. The served version's weights and the previous ones stay on the host, so a
rollback copies them back without a load. Requests in flight go on with the new weights (each
draft slot is prefilled again; the target's verification keeps the output exact), and a trace
names every version that drafted for its request. A version that fails to load (corrupt blob,
wrong vocabulary or shapes) is refused and counted, and the replica keeps serving the one it
has. At start-up the replica loads the live version, if any, before it takes requests.

Per-domain adapters (`adapters`): the watcher follows every domain of the draft's name, and each
domain's live LoRA adapter is merged into its own draft (built once per domain, then updated in
place), so that switching between domains from one request to the next costs nothing. A request
goes to the adapter of the domain it names, else to the one the live router (`distill.router`)
picks with at least `router_min_confidence`, else to the shared draft. A domain whose adapter
fails to load keeps what it had, or the shared draft.

Redis failures degrade, never fail, serving: traces queue and drop oldest-first in the writer,
metric counters wait for the next flush, and a failed load publication is logged and retried on
the next beat.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import redis
import torch

from distill.heads import HeadsSpec
from distill.lora import LoraSpec, merged_adapter
from distill.router import ROUTER, DomainRouter, served_domain
from serving.engine.hf import Decoding, Generation, ProposerName, SpecEngine, Step
from serving.engine.proposers import DraftModelProposer, Proposer, check_weights
from serving.errors import (
    EngineError,
    IncompatibleDraftError,
    InvalidRequestError,
    RequestTimeoutError,
    StepFailedError,
)
from serving.http.prometheus import ReplicaMetrics
from serving.tracing import trace_of
from store.load import forget, publish_load
from store.metrics import MetricsConfig, MetricsRecorder, request_counters
from store.registry import ALL_DOMAINS, CorruptWeightsError, DraftVersion, LiveWatcher, Registry
from store.traces import StreamConfig, TraceWriter, in_fraction

log = logging.getLogger(__name__)

IDLE_WAKE_SECONDS = 0.2  # an idle decode thread looks for staged versions this often
DEADLINE_GRACE_SECONDS = 1.0  # a caller waits this long past its deadline for the decode thread's answer
DOMAIN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # a request's domain tag, as traces and metrics key it


class ServerBusyError(EngineError):
    """The replica's queue is full: try again later (HTTP 503)."""


@dataclass(frozen=True)
class ReplicaConfig:
    """One replica: the models it serves and where its traces, metrics and drafts live."""

    target: str  # local directory or hub id
    draft: str | None = None  # the base draft; registry versions are loaded into copies of it
    proposer: ProposerName | None = None  # default: "draft" with a draft, else "none"
    num_speculative_tokens: int = 3
    device: str | None = None
    dtype: str | None = None
    target_id: str | None = None  # the name traces carry; default: the target's directory name
    draft_name: str = "draft"  # the registry name whose live version is served
    registry_dir: str | None = None  # the registry's file directory (drafts too large for Redis)
    domain: str = ALL_DOMAINS
    replica_id: str = field(default_factory=lambda: f"replica-{uuid.uuid4().hex[:8]}")
    max_queue: int = 64  # waiting requests beyond this are refused with ServerBusyError
    max_batch: int = 8  # requests decoded together (continuous batching); 1: one at a time
    max_model_len: int | None = None  # prompt plus output, per request; None: the target's context
    gpu_memory_utilization: float = 0.8  # on CUDA, the replica's share of the GPU (weights, KV, graphs)
    trainer_gpu_share: float = 0.0  # the trainer's part of the same GPU, when it trains there
    request_timeout: float | None = None  # seconds from arrival; past it a request fails and frees its slot
    adaptive_k: bool = True  # choose k per step from the load and acceptance (else always k)
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
    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # Step, then Finished; or an exception
    enqueued: float
    deadline: float | None  # perf_counter time past which it fails (request_timeout)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    def put(self, event: object) -> None:
        _deliver([(self, event)])


def _deliver(events: list[tuple[_Job, object]]) -> None:
    """Hand events to their callers' event loops: one wake-up per loop, however many requests
    a step served (each is a system call and a turn of the GIL for the decode thread)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, object]]] = {}
    for job, event in events:
        by_loop.setdefault(job.loop, []).append((job, event))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the callers' event loop has closed: nobody is listening any more
            for job, _ in batch:
                job.cancelled.set()


def _put_all(events: list[tuple[_Job, object]]) -> None:
    for job, event in events:
        job.events.put_nowait(event)


@dataclass(frozen=True)
class _Served:
    """The proposer and the version label new requests start on."""

    proposer: Proposer
    version: str


@dataclass(frozen=True)
class _Staged:
    """A version's weights on the host, checked, for the decode thread to copy in between steps."""

    meta: DraftVersion
    weights: dict[str, torch.Tensor]
    began: float  # when its load began


@dataclass
class _Running:
    """A request in the batch: its caller, its sequence, the versions that drafted for it (the first
    is the one it started on) and the domain it is served as."""

    job: _Job
    decoding: Decoding
    versions: list[str]
    domain: str
    first: float | None = None  # when its first tokens were handed over


class Replica:
    """See the module docstring."""

    def __init__(self, config: ReplicaConfig, client: redis.Redis):
        self.config, self.client = config, client
        self.engine = SpecEngine.from_pretrained(
            config.target,
            config.draft,
            config.proposer,
            config.num_speculative_tokens,
            config.device,
            config.dtype,
            config.heads_tree,
            config.max_batch,
            config.max_model_len,
            config.gpu_memory_utilization,
            config.trainer_gpu_share,
        )
        self.target_id = config.target_id or Path(config.target).name
        self.context = self.engine.max_length  # prompt plus new tokens
        proposer = self.engine.proposer
        self.base_draft = getattr(proposer, "model", None)  # None unless the proposer is a draft
        self.base_heads = getattr(proposer, "heads", None)  # None unless it is draft heads
        live = self.base_draft if self.base_draft is not None else self.base_heads
        self._host_base = None if live is None else copy.deepcopy(live).to("cpu")  # merges start here
        learns = self.base_draft is not None or self.base_heads is not None  # registry versions apply
        self.k = self.engine.k
        # Step costs, timed once (a swap keeps the architecture): c of the speedup model for the
        # dashboard, and the load-aware choice of k.
        costs = self.engine.calibrate(config.max_batch)
        self.cost_ratio = costs.cost_ratio
        self.engine.costs = costs if config.adaptive_k else None
        self.registry = Registry(client, file_dir=config.registry_dir)
        self.swaps = self.refused = 0
        self.last_swap_seconds: float | None = None  # from the load's start to serving it
        self.last_swap_pause_seconds: float | None = None  # the copy in place, between two steps
        self._served = _Served(proposer, f"{config.draft_name}:base" if learns else "none")
        self._staged: queue.SimpleQueue[_Staged] = queue.SimpleQueue()
        self._serving = False  # once the decode thread runs, only it installs versions
        self._running: dict[int, _Running] = {}  # id(decoding) -> the request: the decode thread's
        self._host: dict[str, tuple[str, dict]] = {}  # domain -> (label, weights) served, on the host
        self._previous: dict[str, tuple[str, dict]] = {}  # domain -> what it served before (rollback)
        self.writer = TraceWriter(client, config.stream)
        self.recorder = MetricsRecorder(client, config.metrics)
        self.metrics = ReplicaMetrics()
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=config.max_queue)
        self._in_flight = 0
        self._closed = False
        self._broken: str | None = None  # why the decode loop stopped, if it did while serving
        self._adapters: dict[str, _Served] = {}  # domain -> its own version (with `adapters`)
        self._router: tuple[DomainRouter, str] | None = None  # the live router and its label
        self.watcher = self.router_watcher = None
        if learns:
            watched = None if config.adapters else config.domain
            self.watcher = LiveWatcher(
                self.registry, config.draft_name, self._swap, watched, config.poll_seconds
            )
            if not self.watcher.started.wait(timeout=60):  # the live version first, then requests
                log.warning("no answer from the registry yet; serving %s meanwhile", self._served.version)
        if learns and config.adapters:
            self.router_watcher = LiveWatcher(
                self.registry, ROUTER, self._load_router, ALL_DOMAINS, config.poll_seconds
            )
        self._thread = threading.Thread(
            target=self._decode_loop, name=f"decode-{config.replica_id}", daemon=True
        )
        self._serving = True
        self._thread.start()
        self._changed = threading.Event()  # the load changed: beat now
        self._changed.set()  # the first beat announces the replica
        self._heartbeat = threading.Thread(
            target=self._beat, name=f"heartbeat-{config.replica_id}", daemon=True
        )
        self._heartbeat.start()

    # The caller's side (asyncio).
    async def stream(self, request: Request) -> AsyncIterator[Step | Finished]:
        """Each decode step's tokens as they come, then a Finished. Raises InvalidRequestError for
        a bad request and ServerBusyError when the queue is full. Leaving early frees the slot."""
        now, timeout = time.perf_counter(), self.config.request_timeout
        job = _Job(request, asyncio.get_running_loop(), asyncio.Queue(), now, timeout and now + timeout)
        if self._closed or self._broken:
            raise ServerBusyError(self._broken or "the replica is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ServerBusyError(f"{self._queue.qsize()} requests are waiting; try again later") from None
        self._changed.set()
        if self._broken:  # it broke while this one was queued: nobody else will answer it
            self._fail_queued()
        try:
            while True:
                event = await self._next_event(job)
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            job.cancelled.set()  # a no-op when it finished; else the decode thread stops at the next step

    async def _next_event(self, job: _Job) -> object:
        """The job's next event; past its deadline (and a grace for the decode thread, which fails
        it between steps) a RequestTimeoutError, even when a step never returns."""
        if job.deadline is None:
            return await job.events.get()
        wait = max(0.0, job.deadline - time.perf_counter()) + DEADLINE_GRACE_SECONDS
        try:
            return await asyncio.wait_for(job.events.get(), wait)
        except TimeoutError:
            return self._timed_out(job)

    def _timed_out(self, job: _Job) -> RequestTimeoutError:
        return RequestTimeoutError(
            f"request {job.request.request_id} ran past its deadline of {self.config.request_timeout:g} s"
        )

    async def complete(self, request: Request) -> Finished:
        events = [event async for event in self.stream(request)]
        return events[-1]  # the stream ends with Finished

    @property
    def draft_version(self) -> str:
        return self._served.version

    def status(self) -> dict:
        return {
            "replica": self.config.replica_id,
            "pid": os.getpid(),
            "draft_version": self._served.version,
            "adapters": {domain: served.version for domain, served in sorted(self._adapters.items())},
            "router": None if self._router is None else self._router[1],
            "in_flight": self._in_flight,
            "queued": self._queue.qsize(),
            "swaps": self.swaps,
            "refused_versions": self.refused,
            "last_swap_seconds": self.last_swap_seconds,
            "last_swap_pause_seconds": self.last_swap_pause_seconds,
            "traces": vars(self.writer.stats()),
        }

    def metrics_snapshot(self) -> list[dict]:
        """This replica's Prometheus families, as `serving.http.prometheus.render` takes them."""
        traces = self.writer.stats()
        state = {
            "num_requests_running": self._in_flight,
            "num_requests_waiting": self._queue.qsize(),
            "draft_swaps": self.swaps,
            "draft_refused": self.refused,
            "draft_swap_load_seconds": self.last_swap_seconds or 0.0,
            "traces_written": traces.written,
            "traces_dropped": traces.dropped,
            "traces_queued": traces.queued,
            "traces_write_errors": traces.write_errors,
            "trace_store_up": float(traces.connected),
            "num_speculative_tokens": self.k,
            "draft_cost_ratio": self.cost_ratio,
        }
        return self.metrics.snapshot(self._served.version, state)

    def check_health(self) -> None:
        """Raise RuntimeError when the decode loop is gone (Ray Serve then replaces the replica)."""
        if self._broken or (not self._thread.is_alive() and not self._closed):
            raise RuntimeError(self._broken or "the decode thread has exited")

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop; flush traces and metrics."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        self._changed.set()
        self._heartbeat.join(timeout)
        for watcher in (self.watcher, self.router_watcher):
            if watcher is not None:
                watcher.stop()
        self.writer.close(timeout)
        self.recorder.close()

    # The decode thread.
    def _decode_loop(self) -> None:
        """Serve until close(); if the loop itself breaks, every request it holds or will be given
        fails at once and check_health says why."""
        running = self._running
        try:
            self._serve(running)
        except BaseException as err:
            self._broken = f"the decode loop has stopped: {err!r}"
            log.critical("%s; failing %d requests", self._broken, len(running), exc_info=err)
            _deliver([(run.job, ServerBusyError(self._broken)) for run in running.values()])
            self._fail_queued()

    def _serve(self, running: dict[int, _Running]) -> None:
        """Admit, step, hand over, expire; until close() and the batch has drained."""
        stopping = False
        while not stopping or running:
            self._install_staged()
            stopping = self._admit(running) or stopping
            handed: list[tuple[_Job, object]] = []
            for decoding, step in self._step(running):
                handed += self._hand_over(running, running[id(decoding)], step)
            now = time.perf_counter()
            for key, run in list(running.items()):  # callers that went away, and requests out of time
                if run.job.cancelled.is_set() or run.job.expired(now):
                    self.engine.abandon(run.decoding)
                    del running[key]
                    if not run.job.cancelled.is_set():
                        handed.append((run.job, self._timed_out(run.job)))
            _deliver(handed)
            if self._in_flight != len(running):
                self._in_flight = len(running)
                self._changed.set()

    def _step(self, running: dict[int, _Running]) -> list[tuple[Decoding, Step]]:
        """One engine step; if it raises, its requests fail (logged) and the replica goes on."""
        try:
            return self.engine.step()
        except Exception as err:
            log.exception("a decode step failed; failing its %d requests", len(running))
            failure = StepFailedError(f"a decode step failed: {err!r}; the request may be retried")
            _deliver([(run.job, failure) for run in running.values()])
            for run in running.values():
                self.engine.abandon(run.decoding)
            running.clear()
            return []

    def _fail_queued(self) -> None:
        """Answer every queued request with why the decode loop stopped."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.put(ServerBusyError(self._broken))

    def _admit(self, running: dict[int, _Running]) -> bool:
        """Move queued requests into the batch while it has room (waiting for one when it is
        empty); True once close() has been asked for."""
        while len(running) < self.config.max_batch:
            try:  # idle, it wakes now and then to install staged versions
                job = self._queue.get(block=not running, timeout=None if running else IDLE_WAKE_SECONDS)
            except queue.Empty:
                return False
            if job is None:
                return True
            if job.cancelled.is_set():
                continue
            if job.expired(time.perf_counter()):
                job.put(self._timed_out(job))
                continue
            request = job.request
            served, domain = self._route(request)  # the version it starts and finishes on
            hidden = in_fraction(f"hidden:{request.request_id}", self.config.hidden_fraction)
            try:
                decoding = self.engine.add(
                    request.prompt_ids, request.max_new_tokens, request.temperature, request.top_p,
                    request.top_k, request.seed, request.stop_token_ids,
                    max(self.config.trace_top_k, request.logprobs or 0), hidden, served.proposer,
                )  # fmt: skip
            except EngineError as err:  # a bad request: the caller gets it as is
                job.put(err)
                continue
            except Exception as err:  # a bug: the request fails, the replica goes on
                log.exception("request %s failed", request.request_id)
                job.put(RuntimeError(f"internal error: {err}"))
                continue
            running[id(decoding)] = _Running(job, decoding, [served.version], domain)
            self._in_flight = len(running)
            self._changed.set()
        return False

    def _hand_over(
        self, running: dict[int, _Running], run: _Running, step: Step
    ) -> list[tuple[_Job, object]]:
        """What a step gives the caller: its tokens and, at the end, Finished (the request is
        logged first, so its metrics are recorded before the caller hears)."""
        if step.generation is not None:
            del running[id(run.decoding)]  # it has left the engine's batch
        if run.job.cancelled.is_set():
            return []  # nobody listens; an unfinished one leaves the batch below
        now = time.perf_counter()
        run.first = run.first or now
        if step.generation is None:
            return [(run.job, step)]
        enqueued = run.job.enqueued
        versions = tuple(run.versions)
        finished = Finished(step.generation, versions[0], versions, run.first - enqueued, now - enqueued)
        try:
            self._log(run.job.request, finished, run.domain)
        except Exception:  # a bug in what a request leaves: the caller still gets its answer
            log.exception("could not log request %s", run.job.request.request_id)
        return [(run.job, step), (run.job, finished)]

    def _route(self, request: Request) -> tuple[_Served, str]:
        """The version for a request, and the domain its metrics count under: the adapter of the
        domain it names, else of the router's confident guess, else the shared draft."""
        router = None if self._router is None else self._router[0]
        domain = served_domain(request.domain, router, request.prompt_ids, self.config.router_min_confidence)
        return self._adapters.get(domain, self._served), domain

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
        self.writer.append(trace)
        tokens = len(generation.token_ids)
        per_token = (finished.seconds - finished.ttft_seconds) / (tokens - 1) if tokens > 1 else None
        counters = request_counters(
            stats.steps, stats.drafted, stats.accepted, tokens, stats.drafted_per_position,
            stats.accepted_per_position, finished.ttft_seconds, per_token,
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
                    self.client, config.replica_id, self._in_flight, self._queue.qsize(),
                    config.load_ttl_seconds, self._served.version, snapshot,
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

    # The watcher's thread.
    def _host_weights(self, meta: DraftVersion) -> dict[str, torch.Tensor]:
        """`meta`'s weights on the host, checked against the live draft or heads: what was served
        just before (a rollback) as kept, else loaded; IncompatibleDraftError when the version is of
        another kind than this replica serves (heads for a draft, or the reverse), or does not fit."""
        previous = self._previous.get(meta.domain)
        if previous is not None and previous[0] == meta.label:
            return previous[1]
        if self.base_heads is not None:
            spec = self.base_heads.spec
            if meta.kind != "heads" or HeadsSpec(**meta.extra.get("heads", {})) != spec:
                raise IncompatibleDraftError(f"this replica serves {spec}; {meta.label} is {meta.kind}")
            weights = self.registry.load(meta)
            check_weights(self._host_base, weights, "heads")
            return weights
        if meta.kind == "heads":
            raise IncompatibleDraftError(f"this replica serves a draft model; {meta.label} is draft heads")
        weights = version_weights(self._host_base, meta, self.registry.load(meta))
        check_weights(self._host_base, weights, "draft")
        return weights

    def _swap(self, meta: DraftVersion) -> None:
        """Load and check `meta` here, then have the decode thread copy it in between two steps
        (before the decode thread starts: at once)."""
        began = time.perf_counter()
        try:
            staged = _Staged(meta, self._host_weights(meta), began)
        except (CorruptWeightsError, IncompatibleDraftError, KeyError, TypeError, ValueError) as err:
            self.refused += 1
            kept = self._adapters.get(meta.domain, self._served).version
            log.error("refused draft %s, serving %s on: %s", meta.label, kept, err)
            return
        if self._serving:
            self._staged.put(staged)
        else:
            self._install(staged)

    # The decode thread (or start-up, before it runs).
    def _install_staged(self) -> None:
        while True:
            try:
                self._install(self._staged.get_nowait())
            except queue.Empty:
                return

    def _install(self, staged: _Staged) -> None:
        """Copy a staged version into the draft of its domain, in place, and serve it from now on:
        to new requests, and to those in flight on that draft."""
        meta, domain = staged.meta, staged.meta.domain
        served = self._served if domain == self.config.domain else self._adapters.get(domain)
        if served is None:  # a domain's first adapter: its own draft, built once
            model = copy.deepcopy(self._host_base).to(self.engine.device)
            proposer = DraftModelProposer(model, self.engine.profile, self.engine.vocab_size)
        else:
            proposer = served.proposer
        paused = time.perf_counter()
        proposer.load_weights(staged.weights)
        now = time.perf_counter()
        if domain == self.config.domain:
            self._served = _Served(proposer, meta.label)
        else:
            self._adapters = self._adapters | {domain: _Served(proposer, meta.label)}
        for run in self._running.values():
            if run.decoding.proposer is proposer:
                run.versions.append(meta.label)
        if domain in self._host:
            self._previous[domain] = self._host[domain]
        self._host[domain] = (meta.label, staged.weights)
        self.swaps += 1
        self.last_swap_seconds, self.last_swap_pause_seconds = now - staged.began, now - paused
        log.info(
            "serving draft %s (ready in %.3f s, copied in place in %.3f s)",
            meta.label, self.last_swap_seconds, self.last_swap_pause_seconds,
        )  # fmt: skip

    def _load_router(self, meta: DraftVersion) -> None:
        try:
            router = DomainRouter.from_registry(self.registry.load(meta), meta.extra)
        except (CorruptWeightsError, KeyError, TypeError, ValueError) as err:
            self.refused += 1
            log.error("refused router %s, routing on with what it had: %s", meta.label, err)
            return
        self._router = (router, meta.label)
        log.info("routing with %s over %s", meta.label, list(router.domains))


def version_weights(
    base: torch.nn.Module, meta: DraftVersion, weights: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A draft version's whole weights for a model shaped as `base` (left untouched): a LoRA
    adapter merged into a copy of it, else the version's weights as they are."""
    if meta.kind == "lora":
        return merged_adapter(copy.deepcopy(base), LoraSpec(**meta.extra["lora"]), weights).state_dict()
    return weights


def version_draft(
    base: torch.nn.Module, meta: DraftVersion, weights: dict[str, torch.Tensor]
) -> torch.nn.Module:
    """A draft version as a plain model, in a copy of `base` (IncompatibleDraftError or ValueError
    when its weights do not fit)."""
    model = copy.deepcopy(base)
    DraftModelProposer(model).load_weights(version_weights(base, meta, weights))
    return model.eval()
