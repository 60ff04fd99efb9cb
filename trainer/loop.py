"""The online distillation loop, one iteration at a time: read traces, train a small step,
checkpoint then ack, gate and publish, watch the publish and roll back.

While new traces come, the candidate is gated every `gate_every` steps on at least
`gate_min_positions` held-out positions. Once they stop, a candidate trained since the last
decision goes on learning from the replay buffer in rounds, scored on the held-out traces after
each (`replay_once`), and is gated when the score stops improving, on as few as
`gate_dry_min_positions`: a young deployment reaches a decision from the traffic it has. Then the
trainer waits for new traces. `activity` says in words what it is doing or waiting for.

The gate set (held-out traces, per domain) is kept on disk beside the checkpoints, one file per
trace written before its ack, so that a restart gates on the same traces. The live version is
scored on it once per trace and version: its weights wait on the CPU and are loaded into the
model only to score traces it has not scored yet, so no second copy of the draft sits on the device.

`OnlineTrainer` meets serving only through the store: traces in, registry versions out, metric
series and server load read. trainer.actor runs it in its own process.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import redis
import torch

from store.drift import read_alerts
from store.load import read_load
from store.metrics import MetricsConfig, read_series
from store.registry import ALL_DOMAINS, CorruptWeightsError, DraftVersion, Registry
from store.traces import StreamConfig, Trace, TraceReader
from trainer.buffer import ReplayBuffer
from trainer.checkpoint import (
    TrainerState,
    drop_held_out,
    load_checkpoint,
    load_held_out,
    save_checkpoint,
    save_held_out,
)
from trainer.config import TrainerConfig
from trainer.gate import GateDecision, Tally, WatchVerdict, gate, replay_stop, watch
from trainer.learners import autocast, learner_for

log = logging.getLogger(__name__)


class HeldOut(NamedTuple):
    """A trace of the gate set, its stream id, and how many positions the gate scores it on."""

    entry_id: bytes
    trace: Trace
    positions: int


Scores = dict[bytes, tuple[float, int]]  # per held-out trace (stream id): summed acceptance, positions


@dataclass
class Replay:
    """Replaying the buffer since new traces stopped: the held-out score before it and after each
    round, the weights of the best score so far, and the replayed steps of the current round."""

    scores: list[float]
    best_weights: dict[str, torch.Tensor]
    steps: int = 0


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
        self.live_weights: dict[str, torch.Tensor] = {}  # what servers run now, on the CPU
        self.live_scores: Scores = {}  # the live version's, on the gate set
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.reader = TraceReader(client, consumer, stream or StreamConfig())
        self.registry = Registry(client, file_dir=config.registry_dir)
        self.buffer = ReplayBuffer(config.buffer_cap, config.recency_half_life)
        self.gate_set: dict[str, deque[HeldOut]] = defaultdict(lambda: deque(maxlen=config.gate_window))
        for entry_id, trace in load_held_out(config.checkpoint_dir):
            self._hold_out(entry_id, trace, save=False)
        self.pending_acks: list[bytes] = []
        self.generator = torch.Generator().manual_seed(0)
        self.state = TrainerState()
        self.watching: tuple[DraftVersion, float] | None = None  # the publish being watched, and when
        self.replay: Replay | None = None  # replaying the buffer, once new traces stopped
        self.activity = "starting"  # what it is doing or waiting for, in words
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
            "activity": self.activity,
            "step": self.state.step,
            "trained_traces": self.state.trained_traces,
            "held_out_positions": self.held_out_positions(),
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
        loaded = bool(self.live_weights)  # false at the start, a restart's too
        live = self.registry.live(name, domain)
        if live is None:
            live = self.registry.publish(
                name,
                self.weights(),
                domain=domain,
                kind=self.learner.kind,
                extra={"origin": "starting draft", **self.learner.extra},
            )
        if live.version == known and loaded:
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
        self._set_live(weights)
        if known is None:
            self.learner.load(self.model, weights)
        elif live.version > known and live.parent is not None:
            self.watching = (live, time.time())
        self.state.live_version = live.version

    # One iteration.
    def run_once(self) -> str:
        """Do the next piece of work; returns what it did: throttled, idle or trained (a step on new
        traces, or once they stop on replayed ones: `replay_once`). Following and watching the live
        version go on while serving is busy; training waits."""
        self._sync_live()
        self.maybe_watch()
        in_flight = self._in_flight()
        if in_flight > self.config.max_in_flight:
            self.activity = (
                f"paused: servers busy ({in_flight} requests in flight or queued, "
                f"{self.config.max_in_flight} allowed)"
            )
            time.sleep(self.config.pause_seconds)
            return "throttled"
        if not self._step():
            if self.pending_acks:  # traffic paused: commit what was trained, so that it is acked now
                self.checkpoint()
            return self.replay_once()
        self.replay = None  # the candidate moved on: replay starts afresh once new traces stop
        if self.state.step % self.config.checkpoint_every == 0:
            self.checkpoint()
        if self.state.step % self.config.gate_every == 0:
            self.maybe_publish()
        self.activity = f"training on new traces ({self.buffer.untrained} untrained)"
        positions, needed = self.held_out_positions(), self.config.gate_min_positions
        if positions < needed:
            self.activity += f"; waiting for held-out traces: {positions} of {needed} positions"
        return "trained"

    def replay_once(self) -> str:
        """With no new trace to train on: a replayed step of a candidate trained since the last
        decision (`_replay_step`); once replay stops, the best-scoring weights back and the gate, on
        as few as `gate_dry_min_positions` held-out positions. Idle when there is no such candidate,
        or too few held-out positions to score it on."""
        if self.state.step == self.state.decided_step:
            since = "the last decision" if self.state.step else "the start"
            self.activity = f"idle: no new traces since {since}"
            return "idle"
        positions, needed = self.held_out_positions(), self.dry_min_positions
        if positions < needed:
            self.activity = f"waiting for held-out traces: {positions} of {needed} positions"
            return "idle"
        if self.replay is None:
            self.replay = Replay([self.held_out_score()], self.weights())
        scores = self.replay.scores
        stop = self._replay_step(self.replay)
        if stop is None:
            self.activity = (
                f"replaying the buffer (round {len(scores)}, held-out acceptance {scores[-1]:.3f}, "
                f"best {max(scores):.3f})"
            )
            return "trained"
        self.learner.load(self.model, self.replay.best_weights)
        self.replay = None
        decision = self.maybe_publish(needed, {"scores": scores, "stop": stop})
        self.activity = f"idle: no new traces since the last decision ({stop}; {decision.reason})"
        return "trained"

    def _replay_step(self, replay: Replay) -> str | None:
        """One replayed step, and the held-out score at the end of a round (keeping the weights of a
        new best); returns why replay stops (`replay_stop`), or None to go on."""
        config = self.config
        if stop := replay_stop(replay.scores, config.replay_patience, config.replay_max_rounds):
            return stop  # replay_max_rounds 0
        if self.train_step(replay_alone=True) is None:
            return "nothing to replay"  # a restart emptied the buffer
        replay.steps += 1
        if replay.steps < config.replay_round_steps:
            return None
        score = self.held_out_score()
        if score > max(replay.scores):
            replay.best_weights = self.weights()
        replay.scores.append(score)
        replay.steps = 0
        return replay_stop(replay.scores, config.replay_patience, config.replay_max_rounds)

    @property
    def dry_min_positions(self) -> int:
        return min(self.config.gate_dry_min_positions, self.config.gate_min_positions)

    def train(self, steps: int) -> GateDecision:
        """Exactly `steps` training steps now, whatever the servers' load, on what the stream holds
        (new traces first; once all are trained on, replayed ones), then a checkpoint and the gate:
        a budget of steps given explicitly, so that what is learnt does not depend on how much idle
        CPU the trainer happened to get. Fewer steps only when no trace has come at all."""
        self._sync_live()
        self.maybe_watch()
        self.replay = None
        for _ in range(steps):
            if not self._step(replay_alone=True):
                break
        self.checkpoint()
        decision = self.maybe_publish()
        self.activity = f"trained a budget of {steps} steps; gate: {decision.reason}"
        return decision

    def _step(self, replay_alone: bool = False) -> bool:
        """Read what waits in the stream, then one training step; False when there was nothing to
        train on (see `ReplayBuffer.batch` for `replay_alone`)."""
        self.poll()
        self.check_drift()
        return self.train_step(replay_alone) is not None

    def _in_flight(self) -> int:
        return sum(load.in_flight + load.queued for load in read_load(self.client))

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
                self._hold_out(delivery.entry_id, delivery.trace)
                gate_only.append(delivery.entry_id)  # evaluated on, never trained on; saved, then acked
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
        with autocast(self.config):
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

    def held_out_positions(self) -> int:
        """The positions the gate would score now, over every domain's held-out traces."""
        return sum(h.positions for held in self.gate_set.values() for h in held)

    def _hold_out(self, entry_id: bytes, trace: Trace, save: bool = True) -> None:
        """Add a trace to its domain's gate set (saved first unless it was read back from disk); the
        oldest beyond `gate_window` leaves it, and the disk. A trace already held (delivered again:
        a crash came between its save and its ack) is not added twice."""
        held = self.gate_set[trace.domain]
        if any(h.entry_id == entry_id for h in held):
            return
        if save:
            save_held_out(self.config.checkpoint_dir, entry_id, trace)
        evicted = held[0] if len(held) == held.maxlen else None
        held.append(HeldOut(entry_id, trace, self.learner.positions(trace)))
        if evicted is not None:
            drop_held_out(self.config.checkpoint_dir, evicted.entry_id)

    def _held_out(self) -> list[HeldOut]:
        return [h for held in self.gate_set.values() for h in held]

    def _score(self, held: list[HeldOut]) -> Scores:
        """The model's expected acceptance on held-out traces."""
        if not held:
            return {}
        self.model.eval()
        with autocast(self.config):
            per_trace = self.learner.acceptance(self.model, [h.trace for h in held])
        return {h.entry_id: score for h, score in zip(held, per_trace, strict=True)}

    def candidate_scores(self) -> Scores:
        """The candidate's (the model in training) expected acceptance on the gate set."""
        return self._score(self._held_out())

    def live_version_scores(self) -> Scores:
        """The live version's expected acceptance on the gate set, kept while it stays live: traces it
        has not scored yet are scored with its weights loaded into the model for the moment."""
        held = self._held_out()
        missing = [h for h in held if h.entry_id not in self.live_scores]
        if missing:
            candidate = self.weights()
            try:
                self.learner.load(self.model, self.live_weights)
                self.live_scores |= self._score(missing)
            finally:  # the candidate back, whatever happened
                self.learner.load(self.model, candidate)
        self.live_scores = {h.entry_id: self.live_scores[h.entry_id] for h in held}  # the evicted go
        return self.live_scores

    def _set_live(self, weights: dict[str, torch.Tensor], scores: Scores | None = None) -> None:
        """A new live version: its weights (on the CPU), and its scores on the gate set if known."""
        self.live_weights, self.live_scores = weights, dict(scores or {})

    def tallies(self, scores: Scores) -> dict[str, Tally]:
        """Per domain, the summed scores of its held-out traces."""
        tallies = {}
        for domain, held in self.gate_set.items():
            if held:
                per_trace = [scores[h.entry_id] for h in held]
                tallies[domain] = Tally(sum(s for s, _ in per_trace), sum(n for _, n in per_trace))
        return tallies

    def held_out_score(self) -> float:
        """The candidate's expected acceptance over all held-out positions."""
        return sum(self.tallies(self.candidate_scores()).values(), Tally()).rate or 0.0

    def evaluate(self, min_positions: int | None = None, candidate: Scores | None = None) -> GateDecision:
        """Candidate (the model in training, or its `candidate` scores) against the live version on
        the held-out traces, needing `min_positions` of them (default `gate_min_positions`)."""
        candidate = self.candidate_scores() if candidate is None else candidate
        needed = self.config.gate_min_positions if min_positions is None else min_positions
        live = self.live_version_scores()
        return gate(self.tallies(candidate), self.tallies(live), self.config.gate_margin, needed)

    def maybe_publish(self, min_positions: int | None = None, replay: dict | None = None) -> GateDecision:
        """Gate the candidate (`evaluate`); a decision, publish or refusal, is checkpointed first, so
        that the weights it judged are recoverable and a restart does not decide on the same steps
        twice, then goes to the registry. Too few held-out positions is a wait, not a decision.
        `replay`: how the replay before it went (its scores and why it stopped), kept with the rest."""
        needed = self.config.gate_min_positions if min_positions is None else min_positions
        scores = self.candidate_scores()
        decision = self.evaluate(needed, scores)
        record = decision.record() | ({"replay": replay} if replay else {})
        self._remember({"kind": "gate", "step": self.state.step, **record})
        if not decision.publish and decision.positions < needed:
            return decision  # a wait for more held-out traces, not a refusal
        self.state.decided_step = self.state.step
        self.checkpoint()
        weights = self.weights()
        candidate = self.registry.add(
            self.config.draft_name,
            weights,
            domain=self.config.domain,
            parent=self.state.live_version,
            train_steps=self.state.step,
            gate_acceptance=decision.candidate,
            kind=self.learner.kind,
            extra={"gate": record, **self.learner.extra},
        )
        if not decision.publish:
            self.registry.reject(
                self.config.draft_name, self.config.domain, candidate.version, decision.reason
            )
            return decision
        published = self.registry.promote(self.config.draft_name, self.config.domain, candidate.version)
        self._set_live(weights, scores)  # the candidate it was: scored already
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
            self._set_live(weights)
            self.learner.load(self.model, weights)  # train on from the version that worked
            self.state.live_version = parent.version
            self.state.decided_step, self.replay = self.state.step, None  # the candidate is live again
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
