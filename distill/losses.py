"""Distillation losses between a target distribution p and a draft distribution q.

Pure tensor functions. Online, the target is known only through its logged top-K at each
position (ids and log-probs, see store.traces), so every loss takes that truncated p:
p_hat = p renormalised over the top-K set S. The truncation is handled explicitly, per loss:

- forward KL(p_hat || q) needs q only on S (q keeps its full normalisation, so mass outside S
  is still paid for through log q);
- reverse KL and JSD compare q_hat = q renormalised on S with p_hat, plus the tail term
  -log q(S), which pushes the draft's mass back into S (zero when q lies inside S);
- TVD is exact for p_hat: 1/2 (sum_S |p_hat - q| + (1 - q(S))), and 1 - TVD = sum min(p_hat, q)
  is the expected acceptance;
- cross-entropy -log q(y) of the token y the target emitted there.

Each loss returns a per-position tensor [...]; `weighted_mean` reduces it with token weights
(see `token_weights`). `forward_kl` takes full target logits, for offline distillation.
"""

from __future__ import annotations

from typing import Literal

import torch

LossName = Literal["fkl", "rkl", "jsd", "tvd", "ce"]
Selection = Literal["all", "wrong", "confidence"]


def forward_kl(target_logits: torch.Tensor, draft_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of KL(p || q) = sum_x p(x) (log p(x) - log q(x)); logits [..., V]."""
    log_p = torch.log_softmax(target_logits.float(), dim=-1)
    log_q = torch.log_softmax(draft_logits.float(), dim=-1)
    return weighted_mean((log_p.exp() * (log_p - log_q)).sum(-1), mask)


def weighted_mean(per_position: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    weights = weights.float()
    return (per_position * weights).sum() / weights.sum().clamp_min(1e-8)


def truncated_target(top_logprobs: torch.Tensor) -> torch.Tensor:
    """log p_hat [..., K]: the logged top-K log-probs renormalised over the top-K set; a constant
    (detached), so that gradients reach the draft only."""
    return torch.log_softmax(top_logprobs.detach().float(), dim=-1)


def _draft_on_support(draft_logits: torch.Tensor, top_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log q on S [..., K] (full normalisation) and log q(S) [...]."""
    log_q = torch.log_softmax(draft_logits.float(), dim=-1).gather(-1, top_ids)
    return log_q, torch.logsumexp(log_q, dim=-1)


def topk_loss(
    name: LossName,
    draft_logits: torch.Tensor,
    top_ids: torch.Tensor,
    top_logprobs: torch.Tensor,
    emitted: torch.Tensor,
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-position loss [...] of the draft against the target's truncated p.

    draft_logits [..., V]; top_ids, top_logprobs [..., K]; emitted [...] the target's token there.
    beta weighs p_hat in the generalised JSD's mixture m = beta p_hat + (1 - beta) q_hat.
    """
    if name == "ce":
        return -torch.log_softmax(draft_logits.float(), dim=-1).gather(-1, emitted.unsqueeze(-1)).squeeze(-1)
    log_p = truncated_target(top_logprobs)
    log_q, log_mass = _draft_on_support(draft_logits, top_ids)
    if name == "fkl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if name == "tvd":
        return 0.5 * ((log_p.exp() - log_q.exp()).abs().sum(-1) + (1 - log_mass.exp()))
    log_q_hat = log_q - log_mass.unsqueeze(-1)
    tail = -log_mass
    if name == "rkl":
        return (log_q_hat.exp() * (log_q_hat - log_p)).sum(-1) + tail
    if name == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"JSD beta must lie in (0, 1), got {beta}")
        p, q_hat = log_p.exp(), log_q_hat.exp()
        log_m = torch.log(beta * p + (1 - beta) * q_hat)
        kl_p = (p * (log_p - log_m)).sum(-1)
        kl_q = (q_hat * (log_q_hat - log_m)).sum(-1)
        return beta * kl_p + (1 - beta) * kl_q + tail
    raise ValueError(f"unknown loss {name!r}; choose from fkl, rkl, jsd, tvd, ce")


def topk_acceptance(
    draft_logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor
) -> torch.Tensor:
    """Expected acceptance sum_x min(p_hat(x), q(x)) per position [...] (1 - the TVD above)."""
    log_p = truncated_target(top_logprobs)
    log_q, _ = _draft_on_support(draft_logits, top_ids)
    return torch.minimum(log_p.exp(), log_q.exp()).sum(-1)


def token_weights(
    selection: Selection,
    mask: torch.Tensor,
    draft_logits: torch.Tensor,
    emitted: torch.Tensor,
    top_logprobs: torch.Tensor,
) -> torch.Tensor:
    """Which positions train, and how much [...]: every masked one ("all"), those where the
    draft's argmax missed the emitted token ("wrong", OSD's choice), or every one weighted by
    the target's confidence, its top-1 probability in p_hat ("confidence")."""
    mask = mask.float()
    if selection == "all":
        return mask
    if selection == "wrong":
        return mask * (draft_logits.argmax(-1) != emitted).float()
    if selection == "confidence":
        return mask * truncated_target(top_logprobs).exp().amax(-1)
    raise ValueError(f"unknown token selection {selection!r}; choose from all, wrong, confidence")
