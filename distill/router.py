"""The domain router's model: a linear classifier over hashed n-grams of a prompt's token ids.

A request that names no domain is routed by it to a domain's draft adapter. The model is small
(buckets × domains weights), learnt online from the traces of requests that did name their
domain (`trainer.router`), and published through the registry like a draft (kind "router"), so
that serving loads it with the same checks. Nothing here touches Redis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

ROUTER = "router"  # the registry name routers are published under
SHARED = "-"  # a request that names no domain; the shared draft's domain (store.registry.ALL_DOMAINS)
_PRIME, _MODULUS = 1_000_003, 2_147_483_647  # the n-gram hash, the same in every process


@dataclass(frozen=True)
class RouterSpec:
    buckets: int = 1 << 13  # hashed features
    orders: tuple[int, ...] = (1, 2, 3)  # n-gram orders over token ids
    prompt_tokens: int = 256  # the prompt's last tokens read

    def __post_init__(self):
        if self.buckets < 2 or not self.orders or min(self.orders) < 1 or self.prompt_tokens < 1:
            raise ValueError(f"invalid router spec {self}")


@dataclass(frozen=True)
class Routing:
    domain: str | None  # None: the router knows no domain yet
    confidence: float  # the chosen domain's probability


def features(token_ids: Sequence[int], spec: RouterSpec) -> torch.Tensor:
    """Counts of the prompt's hashed n-grams, L2-normalised -> [buckets]."""
    ids = torch.as_tensor(list(token_ids)[-spec.prompt_tokens :], dtype=torch.int64)
    counts = torch.zeros(spec.buckets)
    for n in spec.orders:
        if len(ids) < n:
            continue
        grams = ids.unfold(0, n, 1)  # [L - n + 1, n]
        hashed = torch.full((grams.shape[0],), n, dtype=torch.int64)
        for j in range(n):
            hashed = (hashed * _PRIME + grams[:, j]) % _MODULUS
        counts += torch.bincount(hashed % spec.buckets, minlength=spec.buckets).float()
    return counts / counts.norm().clamp_min(1.0)


class DomainRouter(nn.Module):
    """Softmax regression from `features` to one of `domains`."""

    def __init__(self, domains: Sequence[str], spec: RouterSpec = RouterSpec()):
        super().__init__()
        self.domains, self.spec = tuple(domains), spec
        self.linear = nn.Linear(spec.buckets, max(1, len(self.domains)))
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    @torch.no_grad()
    def route(self, token_ids: Sequence[int]) -> Routing:
        if not self.domains:
            return Routing(None, 0.0)
        probs = torch.softmax(self(features(token_ids, self.spec)), dim=-1)
        best = int(probs.argmax())
        return Routing(self.domains[best], float(probs[best]))

    def with_domains(self, domains: Sequence[str]) -> DomainRouter:
        """A router over `domains` (a superset of this one's) that keeps what this one learnt."""
        grown = DomainRouter(domains, self.spec)
        with torch.no_grad():
            for row, domain in enumerate(self.domains):
                index = grown.domains.index(domain)
                grown.linear.weight[index] = self.linear.weight[row]
                grown.linear.bias[index] = self.linear.bias[row]
        return grown

    def metadata(self) -> dict:
        """What the registry keeps next to the weights to rebuild the router."""
        return {"domains": list(self.domains), "spec": asdict(self.spec)}

    @classmethod
    def from_registry(cls, weights: dict[str, torch.Tensor], metadata: dict) -> DomainRouter:
        """The router a registry version holds; ValueError when weights and metadata disagree."""
        spec = metadata["spec"]
        router = cls(metadata["domains"], RouterSpec(**spec | {"orders": tuple(spec["orders"])}))
        expected = {k: v.shape for k, v in router.state_dict().items()}
        if {k: v.shape for k, v in weights.items()} != expected:
            raise ValueError(f"router weights do not fit {len(router.domains)} domains: {expected}")
        router.load_state_dict(weights)
        return router.eval()


def served_domain(
    named: str, router: DomainRouter | None, prompt_ids: Sequence[int], min_confidence: float
) -> str:
    """The domain a request is served as: the one it names, else the router's guess when at least
    `min_confidence` sure, else the shared one ("-")."""
    if named != SHARED or router is None:
        return named
    routing = router.route(prompt_ids)
    confident = routing.domain is not None and routing.confidence >= min_confidence
    return routing.domain if confident else SHARED


def fit(router: DomainRouter, x: torch.Tensor, labels: torch.Tensor, steps: int, lr: float = 0.05) -> float:
    """`steps` full-batch Adam steps of softmax regression on features x [N, buckets] and label
    indices [N]; returns the last loss. Lightly L2-regularised, so that rare n-grams do not rule."""
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = nn.functional.cross_entropy(router(x), labels) + 1e-4 * router.linear.weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()
