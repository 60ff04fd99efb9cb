"""The HF engine behind a replica (serving.engine.protocol): a SpecEngine (serving.engine.hf) served
by one decode loop on its own thread, with continuous batching.

Between two steps the loop installs staged draft versions, takes what was submitted and abandoned,
and admits waiting requests while the batch has room (first come, first served, up to `max_batch`),
so one target forward verifies the drafts of every request in flight. Each step's tokens go to the
replica's Deliver in one batch. At start-up the engine times its steps (`SpecEngine.calibrate`):
with `adaptive_k`, the per-step controller (serving.engine.speculation) then chooses each
sequence's proposer (its learnt one, suffix speculation's candidates, none) and how much it drafts,
by the load, down to plain decoding when the batch is too full for speculation to pay.

Draft versions, in place: `load_draft` merges and checks a version's weights on the caller's
thread, on the host (serving.engine.versions); the decode loop then copies them into the live
draft (or heads) between two steps: no new module, no new cache, no recompiled graph. Requests in
flight go on with the new weights (each draft slot is prefilled again; the target's verification
keeps the output exact), and each Step names the version that drafted it. A domain's own draft
(its adapter) is built on its first version, then updated in place.

A failed step fails its requests (StepFailedError) and the loop goes on; if the loop itself
breaks, every request it holds or is given fails at once (ServerBusyError) and check_health says why.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from serving.engine.hf import Decoding, ProposerName, SpecEngine
from serving.engine.proposers import DraftModelProposer, HeadsProposer, Proposer
from serving.engine.protocol import Deliver, EngineRequest, Step, Swaps
from serving.engine.versions import checked_weights
from serving.errors import EngineError, ServerBusyError, StepFailedError
from store.registry import ALL_DOMAINS, DraftVersion

log = logging.getLogger(__name__)

IDLE_WAKE_SECONDS = 0.2  # an idle decode loop looks for staged versions this often


@dataclass(frozen=True)
class _Staged:
    """A version's weights on the host, checked, for the decode loop to copy in between steps."""

    meta: DraftVersion
    weights: dict[str, torch.Tensor]
    began: float  # when its load began


@dataclass(frozen=True)
class Draft:
    """A draft that proposes for requests, and the version it serves."""

    proposer: Proposer
    label: str


class HFEngine:
    """See the module docstring."""

    def __init__(
        self,
        target: str,
        draft: str | None = None,
        proposer: ProposerName | None = None,
        k: int = 3,
        device: str | None = None,
        dtype: str | None = None,
        heads_tree: tuple[int, ...] | None = None,
        max_batch: int = 8,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.8,
        trainer_gpu_share: float = 0.0,
        adaptive_k: bool = True,
        base_label: str = "draft:base",  # the base draft's label, when it has one (else "none")
        domain: str = ALL_DOMAINS,
        suffix: bool = False,
    ):
        self.spec = SpecEngine.from_pretrained(
            target, draft, proposer, k, device, dtype, heads_tree, max_batch, max_model_len,
            gpu_memory_utilization, trainer_gpu_share, suffix,
        )  # fmt: skip
        self.max_batch, self.domain = max_batch, domain
        self.max_length, self.k, self.device = self.spec.max_length, self.spec.k, self.spec.device
        live = self.spec.proposer
        if isinstance(live, DraftModelProposer):
            self.serves, base = "draft", live.model
        elif isinstance(live, HeadsProposer):
            self.serves, base = "heads", live.heads
        else:
            self.serves, base = None, None
        self.host_base = None if base is None else copy.deepcopy(base).to("cpu")  # merges start here
        # Step costs, timed once (a swap keeps the architecture): c of the speedup model for the
        # dashboard, and the controller's plans (serving.engine.speculation).
        costs = self.spec.calibrate(max_batch)
        self.cost_ratio = costs.cost_ratio
        self.spec.costs = costs if adaptive_k else None
        # domain -> its draft; `domain`'s is the shared one
        self.drafts = {domain: Draft(live, base_label if self.serves else "none")}
        self._inbox: queue.SimpleQueue[tuple[str, object] | None] = queue.SimpleQueue()
        self._staged: queue.SimpleQueue[_Staged] = queue.SimpleQueue()
        self._waiting: deque[EngineRequest] = deque()
        self._running: dict[str, tuple[Decoding, str]] = {}  # request id -> (sequence, its draft's domain)
        self._deliver: Deliver = lambda events: None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._broken: str | None = None  # why the decode loop stopped, if it did while serving
        self.swaps = Swaps()

    # The replica's side (any thread).
    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._thread = threading.Thread(target=self._decode_loop, name="decode", daemon=True)
        self._thread.start()

    def submit(self, request: EngineRequest) -> None:
        self._inbox.put(("submit", request))
        if self._broken:  # it broke meanwhile: nobody else will answer it
            self._fail_inbox()

    def abandon(self, request_id: str) -> None:
        self._inbox.put(("abandon", request_id))

    def remember(self, domain: str, token_ids: list[int]) -> None:
        self._inbox.put(("remember", (domain, token_ids)))

    def load_draft(self, meta: DraftVersion, weights: Mapping[str, torch.Tensor]) -> None:
        began = time.perf_counter()
        staged = _Staged(meta, checked_weights(self.host_base, self.serves, meta, weights), began)
        if self._thread is None:
            self._install(staged)  # before serving: at once
        else:
            self._staged.put(staged)

    def versions(self) -> dict[str, str]:
        return {domain: draft.label for domain, draft in self.drafts.items()}

    def running(self) -> int:
        return len(self._running)

    def status(self) -> dict:
        """Swaps, and with suffix speculation what its index holds and how often it matched."""
        status = self.swaps.status()
        if self.spec.suffix is not None:
            index = self.spec.suffix.shared
            status |= {
                "suffix_index_tokens": index.tokens, "suffix_index_documents": len(index),
                "suffix_lookups": index.lookups, "suffix_hits": index.hits,
            }  # fmt: skip
        return status

    def metrics(self) -> list:
        return []  # what this engine counts, the replica counts by version and domain

    def check_health(self) -> None:
        if self._broken or (self._thread is not None and not self._thread.is_alive() and not self._closing):
            raise RuntimeError(self._broken or "the decode thread has exited")

    def close(self, timeout: float = 10.0) -> None:
        self._closing = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    # The decode thread.
    def _decode_loop(self) -> None:
        """Serve until close(); if the loop itself breaks, every request it holds or will be given
        fails at once and check_health says why."""
        try:
            self._serve()
        except BaseException as err:
            self._broken = f"the decode loop has stopped: {err!r}"
            log.critical("%s; failing %d requests", self._broken, len(self._running), exc_info=err)
            failure = ServerBusyError(self._broken)
            self._deliver(
                [(rid, failure) for rid in self._running] + [(r.request_id, failure) for r in self._waiting]
            )
            self._running.clear()
            self._waiting.clear()
            self._fail_inbox()

    def _serve(self) -> None:
        """Install, take, admit, step, hand over; until close() and every request has left."""
        stopping = False
        while not stopping or self._running or self._waiting:
            self._install_staged()
            stopping = self._take(block=not (self._running or self._waiting)) or stopping
            events = self._admit() + self._step()
            if events:
                self._deliver(events)

    def _take(self, block: bool) -> bool:
        """Move what the replica sent into the waiting queue (submits), out of the batch (abandons)
        or into the suffix index (requests served elsewhere); idle, wait a while for the first.
        True once close() has been asked for."""
        closing = False
        while True:
            try:
                item = self._inbox.get(block=block, timeout=IDLE_WAKE_SECONDS if block else None)
            except queue.Empty:
                return closing
            block = False
            if item is None:
                closing = True
            elif item[0] == "submit":
                self._waiting.append(item[1])
            elif item[0] == "remember":
                if self.spec.suffix is not None:
                    self.spec.suffix.remember(*item[1])
            else:
                self._drop(item[1])

    def _drop(self, request_id: str) -> None:
        running = self._running.pop(request_id, None)
        if running is not None:
            self.spec.abandon(running[0])
        else:
            self._waiting = deque(r for r in self._waiting if r.request_id != request_id)

    def _admit(self) -> list[tuple[str, Step | BaseException]]:
        """Waiting requests into the batch while it has room; a bad one answered with its error."""
        failed: list[tuple[str, Step | BaseException]] = []
        while self._waiting and len(self._running) < self.max_batch:
            request = self._waiting.popleft()
            domain = request.domain if request.domain in self.drafts else self.domain
            try:
                decoding = self.spec.add(
                    request.prompt_ids, request.max_new_tokens, request.temperature, request.top_p,
                    request.top_k, request.seed, request.stop_token_ids, request.top_logprobs,
                    request.hidden_states, self.drafts[domain].proposer, request.domain,
                )  # fmt: skip
            except EngineError as err:  # a bad request: the caller gets it as is
                failed.append((request.request_id, err))
                continue
            except Exception as err:  # a bug: the request fails, the engine goes on
                log.exception("request %s failed", request.request_id)
                failed.append((request.request_id, RuntimeError(f"internal error: {err}")))
                continue
            self._running[request.request_id] = (decoding, domain)
        return failed

    def _step(self) -> list[tuple[str, Step | BaseException]]:
        """One engine step, each Step labelled with its draft's version; if the step raises, its
        requests fail (logged) and the engine goes on."""
        if not self._running:
            return []
        by_decoding = {id(decoding): (rid, domain) for rid, (decoding, domain) in self._running.items()}
        try:
            stepped = self.spec.step()
        except Exception as err:
            log.exception("a decode step failed; failing its %d requests", len(self._running))
            failure = StepFailedError(f"a decode step failed: {err!r}; the request may be retried")
            for decoding, _ in self._running.values():
                self.spec.abandon(decoding)
            failed = [(rid, failure) for rid in self._running]
            self._running.clear()
            return failed
        events: list[tuple[str, Step | BaseException]] = []
        for decoding, step in stepped:
            rid, domain = by_decoding[id(decoding)]
            if step.generation is not None:
                del self._running[rid]
            events.append((rid, dataclasses.replace(step, version=self.drafts[domain].label)))
        return events

    def _fail_inbox(self) -> None:
        """Answer every submitted request with why the decode loop stopped."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[0] == "submit":
                self._deliver([(item[1].request_id, ServerBusyError(self._broken))])

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
        draft = self.drafts.get(domain)
        if draft is None:  # a domain's first adapter: its own draft, built once
            model = copy.deepcopy(self.host_base).to(self.device)
            proposer = DraftModelProposer(model, self.spec.profile, self.spec.vocab_size)
        else:
            proposer = draft.proposer
        paused = time.perf_counter()
        proposer.load_weights(staged.weights)
        self.drafts = self.drafts | {domain: Draft(proposer, meta.label)}
        now = time.perf_counter()
        self.swaps.record(now - staged.began, now - paused)
        log.info(
            "serving draft %s (ready in %.3f s, copied in place in %.3f s)",
            meta.label, self.swaps.last_seconds, self.swaps.last_pause_seconds,
        )  # fmt: skip
