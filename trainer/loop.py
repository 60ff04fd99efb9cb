"""The online distillation loop, one iteration at a time: read traces, train a small step,
checkpoint then ack, gate and publish, watch the publish and roll back.

`OnlineTrainer` meets serving only through the store: traces in, registry versions out, metric
series and server load read. trainer.actor runs it in its own process.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from pathlib import Path

import redis
import torch

from store.drift import read_alerts
from store.load import read_load
from store.metrics import MetricsConfig, read_series
from store.registry import ALL_DOMAINS, CorruptWeightsError, DraftVersion, Registry
from store.traces import StreamConfig, Trace, TraceReader
from trainer.buffer import ReplayBuffer
from trainer.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from trainer.config import TrainerConfig
from trainer.gate import GateDecision, Tally, WatchVerdict, gate, watch
from trainer.learners import learner_for

log = logging.getLogger(__name__)


class OnlineTrainer:
    def __init__(
        self,
        config: TrainerConfig,
        base: str | Path,
        client: redis.Redis,
        consumer: str = "trainer-0",
        stream: StreamConfig | None = None,
        metrics: MetricsConfig | None = None,
    ):
        """`base`: the starting draft model, or with `config.heads` the target the heads read."""
        self.config, self.client, self.metrics = config, client, metrics or MetricsConfig()
        self.learner = learner_for(config, base)
        self.model = self.learner.build()
        self.live_model = self.learner.build().eval()  # what servers run now, for the gate
        self.learner.load(self.live_model, self.learner.weights(self.model))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.reader = TraceReader(client, consumer, stream or StreamConfig())
        self.registry = Registry(client, file_dir=config.registry_dir)
        self.buffer = ReplayBuffer(config.buffer_cap, config.recency_half_life)
        self.gate_set: dict[str, deque[Trace]] = defaultdict(lambda: deque(maxlen=config.gate_window))
        self.pending_acks: list[bytes] = []
        self.generator = torch.Generator().manual_seed(0)
        self.state = TrainerState()
        self.watching: tuple[DraftVersion, float] | None = None  # the publish being watched, and when
        self.last_loss: float | None = None
        self.prioritised: frozenset[str] = frozenset()  # domains with a drift alert
        self.skipped = 0  # traces the learner cannot use (heads: no hidden states)
        self._next_drift_check = 0.0
        restored = load_checkpoint(config.checkpoint_dir)
        if restored is not None:
            weights, optimizer_state, self.state = restored
            self.learner.load(self.model, weights)
            self.optimizer.load_state_dict(optimizer_state)
            log.info("trainer resumed at step %d", self.state.step)
        self._sync_live()

    def weights(self) -> dict[str, torch.Tensor]:
        return self.learner.weights(self.model)

    def status(self) -> dict:
        """What the trainer panel shows (the actor adds its state and the stream's backlog)."""
        return {
            "step": self.state.step,
            "trained_traces": self.state.trained_traces,
            "skipped_traces": self.skipped,  # heads: traces without hidden states
            "live_version": self.state.live_version,
            "loss": self.last_loss,
            "buffer": len(self.buffer),
            "untrained": self.buffer.untrained,
            "prioritised_domains": sorted(self.prioritised),
            "history": self.state.history[-5:],
        }

    def _sync_live(self) -> None:
        """Agree with the registry on the live version: publish the starting draft as the first, and
        follow what others make live. A newer version made live past the gate (by an operator, or
        anything with access to the registry) is watched like a publish of ours, and one whose
        weights do not load (non-finite, corrupt) is rolled back at once."""
        name, domain, known = self.config.draft_name, self.config.domain, self.state.live_version
        live = self.registry.live(name, domain)
        if live is None:
            live = self.registry.publish(
                name,
                self.weights(),
                domain=domain,
                kind=self.learner.kind,
                extra={"origin": "starting draft", **self.learner.extra},
            )
        if live.version == known:
            return
        try:
            weights = self.registry.load(live)
        except CorruptWeightsError as err:
            if known is None:
                raise
            reason = f"refused on load: {err}"
            self.registry.rollback(name, domain, reason=reason)
            log.warning("rolled back %s, %s", live.label, reason)
            self._remember({"kind": "watch", "version": live.version, "action": "rollback", "reason": reason})
            return
        self.learner.load(self.live_model, weights)
        if known is None:
            self.learner.load(self.model, weights)
        elif live.version > known and live.parent is not None:
            self.watching = (live, time.time())
        self.state.live_version = live.version

    # One iteration.
    def run_once(self) -> str:
        """Do the next piece of work; returns what it did: throttled, idle or trained. Following and
        watching the live version go on while serving is busy; training waits."""
        self._sync_live()
        self.maybe_watch()
        if self._busy():
            time.sleep(self.config.pause_seconds)
            return "throttled"
        if not self._step():
            if self.pending_acks:  # traffic paused: commit what was trained, so that it is acked now
                self.checkpoint()
            return "idle"
        if self.state.step % self.config.checkpoint_every == 0:
            self.checkpoint()
        if self.state.step % self.config.gate_every == 0:
            self.maybe_publish()
        return "trained"

    def train(self, steps: int) -> GateDecision:
        """Exactly `steps` training steps now, whatever the servers' load, on what the stream holds
        (new traces first; once all are trained on, replayed ones), then a checkpoint and the gate:
        a budget of steps given explicitly, so that what is learnt does not depend on how much idle
        CPU the trainer happened to get. Fewer steps only when no trace has come at all."""
        self._sync_live()
        self.maybe_watch()
        for _ in range(steps):
            if not self._step(replay_alone=True):
                break
        self.checkpoint()
        return self.maybe_publish()

    def _step(self, replay_alone: bool = False) -> bool:
        """Read what waits in the stream, then one training step; False when there was nothing to
        train on (see `ReplayBuffer.batch` for `replay_alone`)."""
        self.poll()
        self.check_drift()
        return self.train_step(replay_alone) is not None

    def _busy(self) -> bool:
        in_flight = sum(load.in_flight + load.queued for load in read_load(self.client))
        return in_flight > self.config.max_in_flight

    def poll(self) -> int:
        """Read traces while fewer than a batch of untrained ones wait; held-out ones go to the gate set.
        A trainer of one domain (`config.domain`) passes over the others' traces."""
        if self.buffer.untrained >= self.config.batch_size:
            return 0
        deliveries = self.reader.read(count=self.config.read_count)
        gate_only = []
        for delivery in deliveries:
            if self.config.domain not in (ALL_DOMAINS, delivery.trace.domain):
                gate_only.append(delivery.entry_id)  # another domain's: its own trainer learns from it
            elif not self.learner.usable(delivery.trace):
                self._skip(delivery.trace)
                gate_only.append(delivery.entry_id)  # nothing to learn from: acked at once
            elif delivery.held_out:
                self.gate_set[delivery.trace.domain].append(delivery.trace)
                gate_only.append(delivery.entry_id)  # evaluated on, never trained on
            else:
                self.buffer.add(delivery.entry_id, delivery.trace)
        self.reader.ack(gate_only)
        return len(deliveries)

    def check_drift(self) -> None:
        """Every `drift_check_seconds`: prioritise the traces of domains whose acceptance dropped."""
        if time.monotonic() < self._next_drift_check:
            return
        self._next_drift_check = time.monotonic() + self.config.drift_check_seconds
        alerts = read_alerts(self.client, self.config.draft_name, self.metrics)
        prioritised = frozenset(a.domain for a in alerts if a.kind == "drop")
        if prioritised != self.prioritised:
            log.info("prioritising traces of %s (drift alerts)", sorted(prioritised) or "no domain")
        self.prioritised = prioritised

    def train_step(self, replay_alone: bool = False) -> float | None:
        entries = self.buffer.batch(
            self.config.batch_size, self.generator, self.prioritised, self.config.drift_boost, replay_alone
        )
        if not entries:
            return None
        self.model.train()
        loss = self.learner.loss(self.model, [e.trace for e in entries])
        self.optimizer.zero_grad()
        loss.backward()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(trainable, self.config.grad_clip)
        self.optimizer.step()
        first_time = self.buffer.mark_trained(entries)
        self.pending_acks += first_time
        self.state.step += 1
        self.state.trained_traces += len(first_time)
        self.last_loss = loss.item()
        return self.last_loss

    def checkpoint(self) -> None:
        """Save, then ack every trace trained on since the last checkpoint."""
        save_checkpoint(self.config.checkpoint_dir, self.weights(), self.optimizer, self.state)
        self.reader.ack(self.pending_acks)
        self.pending_acks = []

    def evaluate(self) -> GateDecision:
        """Candidate (the model in training) against the live version on the held-out traces."""
        candidate, live = {}, {}
        self.model.eval()
        for domain, traces in self.gate_set.items():
            if not traces:
                continue
            for tallies, model in ((candidate, self.model), (live, self.live_model)):
                per_trace = self.learner.acceptance(model, list(traces))
                tallies[domain] = Tally(sum(s for s, _ in per_trace), sum(n for _, n in per_trace))
        return gate(candidate, live, self.config.gate_margin, self.config.gate_min_positions)

    def maybe_publish(self) -> GateDecision:
        decision = self.evaluate()
        self._remember({"kind": "gate", "step": self.state.step, **decision.record()})
        if not decision.publish and decision.positions < self.config.gate_min_positions:
            return decision  # a wait for more held-out traces, not a refusal
        if decision.publish:
            self.checkpoint()  # the published weights are recoverable from the trainer's side too
        weights = self.weights()
        candidate = self.registry.add(
            self.config.draft_name,
            weights,
            domain=self.config.domain,
            parent=self.state.live_version,
            train_steps=self.state.step,
            gate_acceptance=decision.candidate,
            kind=self.learner.kind,
            extra={"gate": decision.record(), **self.learner.extra},
        )
        if not decision.publish:
            self.registry.reject(
                self.config.draft_name, self.config.domain, candidate.version, decision.reason
            )
            return decision
        published = self.registry.promote(self.config.draft_name, self.config.domain, candidate.version)
        self.learner.load(self.live_model, weights)
        self.state.live_version = published.version
        self.watching = (published, time.time())
        log.info("published %s: %s", published.label, decision.reason)
        return decision

    def maybe_watch(self) -> WatchVerdict | None:
        """After a publish: keep it, or roll back to its parent when live acceptance dropped."""
        if self.watching is None:
            return None
        published, since = self.watching
        parent = self.registry.get(published.name, published.domain, published.parent)
        points = read_series(self.client, self.metrics, since=since - 3600)
        baseline, after, requests = defaultdict(Tally), defaultdict(Tally), defaultdict(int)
        for point in points:
            tally = Tally(point.counts["accepted"], point.counts["drafted"])
            if point.version == parent.label and point.start < since:
                baseline[point.domain] += tally
            elif point.version == published.label:
                after[point.domain] += tally
                requests[point.domain] += point.counts["requests"]
        verdict = watch(baseline, after, requests, self.config.watch_requests, self.config.watch_delta)
        if verdict.action == "rollback":
            self.registry.rollback(published.name, published.domain, to=parent.version, reason=verdict.reason)
            weights = self.registry.load(parent)
            self.learner.load(self.live_model, weights)
            self.learner.load(self.model, weights)  # train on from the version that worked
            self.state.live_version = parent.version
            log.warning("rolled back %s: %s", published.label, verdict.reason)
        if verdict.action != "wait":
            self._remember(
                {
                    "kind": "watch",
                    "version": published.version,
                    "action": verdict.action,
                    "reason": verdict.reason,
                }
            )
            self.watching = None
        return verdict

    def _skip(self, trace: Trace) -> None:
        """Count a trace the learner cannot use; say why on the first and every 1000th."""
        if self.skipped % 1000 == 0:
            log.warning(
                "skipping trace %s: head training needs the target's hidden states, which only the "
                "traces of a sampled fraction of requests carry (set the replicas' hidden_fraction "
                "above 0); %d skipped so far", trace.request_id, self.skipped + 1,
            )  # fmt: skip
        self.skipped += 1

    def _remember(self, event: dict) -> None:
        self.state.history = (self.state.history + [event | {"time": time.time()}])[-50:]
