"""Online training of the domain router (`distill.router`) from the traces of requests that named
their domain: a bounded set of (prompt features, domain), split by request id into training and
held-out rows, refitted every `refit_every` new rows and published through the registry (name
`router`, kind "router") when its held-out accuracy is at least the live router's.
"""

from __future__ import annotations

import logging
from collections import deque

import torch

from distill.router import ROUTER, DomainRouter, features, fit
from store.registry import ALL_DOMAINS, CorruptWeightsError, Registry
from store.traces import Trace, in_fraction
from trainer.config import RouterConfig

log = logging.getLogger(__name__)


class RouterLearner:
    """`observe` the traces of tagged requests; `maybe_refit` now and then."""

    def __init__(self, registry: Registry, config: RouterConfig):
        self.registry, self.config = registry, config
        self.train: deque[tuple[torch.Tensor, str]] = deque(maxlen=config.rows)
        self.held_out: deque[tuple[torch.Tensor, str]] = deque(maxlen=config.held_out_rows)
        self.new_rows = 0
        self.last: dict | None = None  # the last fit's numbers

    def observe(self, trace: Trace) -> None:
        """Keep a trace's prompt if its request named a domain."""
        if trace.domain == ALL_DOMAINS:
            return
        row = (features(trace.prompt_ids.tolist(), self.config.spec), trace.domain)
        held_out = in_fraction(f"router:{trace.request_id}", self.config.held_out_fraction)
        (self.held_out if held_out else self.train).append(row)
        self.new_rows += not held_out

    def maybe_refit(self) -> dict | None:
        """Refit once `refit_every` new rows came (and two domains are known), and publish when the
        result is at least as accurate on the held-out rows as the live router; returns the fit's
        numbers, or None when it waited."""
        domains = sorted({domain for _, domain in [*self.train, *self.held_out]})
        if self.new_rows < self.config.refit_every or len(self.held_out) < self.config.min_held_out:
            return None
        if len(domains) < 2:
            return None  # one domain is no choice: every prompt would go to it
        self.new_rows = 0
        live = self._live()
        warm = live is not None and set(live.domains) <= set(domains)
        router = live.with_domains(domains) if warm else DomainRouter(domains, self.config.spec)
        loss = fit(router, *stack(self.train, domains), self.config.steps)
        held_x, held_domains = torch.stack([x for x, _ in self.held_out]), [d for _, d in self.held_out]
        score = domain_accuracy(router, held_x, held_domains)
        live_score = None if live is None else domain_accuracy(live, held_x, held_domains)
        self.last = {
            "domains": domains,
            "loss": round(loss, 4),
            "accuracy": round(score, 4),
            "live_accuracy": None if live_score is None else round(live_score, 4),
            "held_out": len(held_domains),
            "rows": len(self.train),
        }
        if live_score is None or score >= live_score:
            meta = self.registry.publish(ROUTER, router.state_dict(), kind="router",
                                         extra=router.metadata() | {"fit": self.last})  # fmt: skip
            log.info("published router %s: held-out accuracy %.3f over %s", meta.label, score, domains)
        return self.last

    def _live(self) -> DomainRouter | None:
        """The live router, to start from and to beat; None when there is none or it is unreadable."""
        meta = self.registry.live(ROUTER)
        if meta is None:
            return None
        try:
            return DomainRouter.from_registry(self.registry.load(meta), meta.extra)
        except (CorruptWeightsError, KeyError, TypeError, ValueError) as err:
            log.warning("live router %s unreadable, fitting a new one: %s", meta.label, err)
            return None


def stack(rows, domains: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, buckets] and label indices [N] of (features, domain) rows."""
    return torch.stack([x for x, _ in rows]), torch.tensor([domains.index(d) for _, d in rows])


@torch.no_grad()
def domain_accuracy(router: DomainRouter, x: torch.Tensor, domains: list[str]) -> float:
    """The share of rows `router` gives their own domain (it may not know every domain)."""
    chosen = router(x).argmax(-1).tolist()
    return sum(router.domains[c] == d for c, d in zip(chosen, domains, strict=True)) / max(1, len(domains))
