"""Per-domain LoRA adapters over one shared base draft, and the router that picks them.

`DomainTrainers` reads every trace through a consumer group of its own: it counts the traces of
each named domain and hands their prompts to the router's learner (`trainer.router`). A domain
gets its adapter once `min_traces` of its traces came: an `OnlineTrainer` with a LoRA spec,
registry domain set to that domain, a checkpoint folder and a consumer group of its own (read from
the stream's start, so it also learns from the domain's traces still kept). Each adapter is gated,
published, watched and rolled back on its own domain's traces alone; the base draft stays as it
is, since every adapter is trained on top of it. `run_once` gives the trainers turns in rotation
(an idle one passes its turn on; each replays its buffer and gates once its domain's traces
stop, as `OnlineTrainer` does); `train` gives each of them a budget of steps at once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

import redis

from store.metrics import MetricsConfig
from store.registry import ALL_DOMAINS, Registry
from store.traces import StreamConfig, TraceReader
from trainer.config import TrainerConfig
from trainer.gate import GateDecision
from trainer.loop import OnlineTrainer
from trainer.router import RouterLearner

log = logging.getLogger(__name__)


class DomainTrainers:
    def __init__(
        self,
        config: TrainerConfig,
        base: str | Path,
        client: redis.Redis,
        consumer: str = "trainer-0",
        stream: StreamConfig | None = None,
        metrics: MetricsConfig | None = None,
    ):
        """`config.adapters` says when a domain gets an adapter and how; `base`: the shared draft."""
        if config.adapters is None:
            raise ValueError("DomainTrainers needs config.adapters")
        self.config, self.base, self.client, self.consumer = config, base, client, consumer
        self.stream, self.metrics = stream or StreamConfig(), metrics
        self.policy = config.adapters
        self.reader = TraceReader(client, consumer, self._stream_of("router"))
        self.registry = Registry(client, file_dir=config.registry_dir)
        self.router = RouterLearner(self.registry, self.policy.router)
        self.seen: Counter[str] = Counter()  # traces per named domain, since start
        self.trainers: dict[str, OnlineTrainer] = {}
        for domain in self.registry.domains(config.draft_name):  # adapters of earlier runs go on
            if domain != ALL_DOMAINS:
                self._spawn(domain)
        self._turn = 0

    def _stream_of(self, part: str) -> StreamConfig:
        return dataclasses.replace(self.stream, group=f"{self.stream.group}:{part}")

    def _spawn(self, domain: str) -> None:
        config = dataclasses.replace(
            self.config,
            domain=domain,
            lora=self.policy.lora,
            learning_rate=self.policy.learning_rate,
            adapters=None,
            checkpoint_dir=self.config.checkpoint_dir / "domains" / domain,
        )
        stream = self._stream_of(f"domain:{domain}")
        trainer = OnlineTrainer(config, self.base, self.client, self.consumer, stream, self.metrics)
        self.trainers[domain] = trainer
        log.info("training an adapter for domain %r (%d traces seen)", domain, self.seen[domain])

    def run_once(self) -> str:
        """Read and count new traces, spawn adapters that are due, refit the router when due, then
        give the next domain's trainer a turn, passed on to the one after while a trainer is idle;
        returns what the turn did (idle when every trainer was, or there is none)."""
        self.observe()
        self.router.maybe_refit()
        domains = sorted(self.trainers)
        for _ in domains:
            self._turn = (self._turn + 1) % len(domains)
            did = self.trainers[domains[self._turn]].run_once()
            if did != "idle":
                return did
        return "idle"

    def train(self, steps: int) -> dict[str, GateDecision]:
        """Count every trace the stream holds, refit the router when due, then give each domain's
        adapter `steps` steps and its gate (`OnlineTrainer.train`)."""
        while self.observe():
            pass
        self.router.maybe_refit()
        return {domain: trainer.train(steps) for domain, trainer in sorted(self.trainers.items())}

    def observe(self) -> int:
        """Count and ack a batch of new traces; start the adapters that are due."""
        deliveries = self.reader.read(count=self.config.read_count)
        for delivery in deliveries:
            domain = delivery.trace.domain
            if domain == ALL_DOMAINS:
                continue
            self.seen[domain] += 1
            self.router.observe(delivery.trace)
            due = self.seen[domain] >= self.policy.min_traces and len(self.trainers) < self.policy.max_domains
            if due and domain not in self.trainers:
                self._spawn(domain)
        self.reader.ack([d.entry_id for d in deliveries])
        return len(deliveries)

    def status(self) -> dict:
        """The trainer panel's fields summed over the domains, and each domain's own."""
        trainers = self.trainers.values()
        history = sorted((e for t in trainers for e in t.state.history), key=lambda e: e["time"])
        losses = [t.last_loss for t in trainers if t.last_loss is not None]
        return {
            "activity": "; ".join(f"{d}: {t.activity}" for d, t in sorted(self.trainers.items()))
            or f"waiting for {self.policy.min_traces} traces of a domain to train its adapter",
            "step": sum(t.state.step for t in trainers),
            "trained_traces": sum(t.state.trained_traces for t in trainers),
            "held_out_positions": sum(t.held_out_positions() for t in trainers),
            "skipped_traces": 0,
            "live_version": None,
            "loss": sum(losses) / len(losses) if losses else None,
            "buffer": sum(len(t.buffer) for t in trainers),
            "untrained": sum(t.buffer.untrained for t in trainers),
            "prioritised_domains": sorted({d for t in trainers for d in t.prioritised}),
            "history": history[-5:],
            "domains": {
                domain: {
                    "step": t.state.step,
                    "live_version": t.state.live_version,
                    "loss": t.last_loss,
                    "trained_traces": t.state.trained_traces,
                    "seen": self.seen[domain],
                }
                for domain, t in sorted(self.trainers.items())
            },  # fmt: skip
            "router": self.router.last,
        }
