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

A draft with fewer output rows than the target (a padded vocabulary, serving.engine.vocab) can never
propose the target's ids beyond its rows: those leave S, and p_hat is renormalised over the
rest; a position with nothing left, or whose emitted token lies beyond, trains nothing.

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


def _on_support(
    draft_logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p_hat and log q on S [..., K] (q with its full normalisation), log q(S) [...], and which
    positions have any of S among the draft's rows [...]. Where S holds ids beyond the draft's rows,
    they are dropped from S; a position left with none gets finite placeholders, masked by callers."""
    vocab = draft_logits.shape[-1]
    inside = top_ids < vocab  # [..., K]
    log_q = torch.log_softmax(draft_logits.float(), dim=-1).gather(-1, top_ids.clamp_max(vocab - 1))
    if bool(inside.all()):
        return truncated_target(top_logprobs), log_q, torch.logsumexp(log_q, dim=-1), inside[..., 0]
    any_inside = inside.any(-1)
    keep = inside | ~any_inside.unsqueeze(-1)  # an empty S keeps its entries: finite, then masked
    log_p = truncated_target(top_logprobs.masked_fill(~keep, float("-inf")))
    log_q = log_q.masked_fill(~keep, float("-inf"))
    return log_p, log_q, torch.logsumexp(log_q, dim=-1), any_inside


def _mass_weighted(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_x a(x) (log a(x) - log b(x)) over the last axis, 0 where a(x) = 0 (gradients too)."""
    present = log_a > float("-inf")
    terms = log_a.exp() * (log_a.masked_fill(~present, 0.0) - log_b.masked_fill(~present, 0.0))
    return terms.masked_fill(~present, 0.0).sum(-1)


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
        vocab = draft_logits.shape[-1]
        log_q = torch.log_softmax(draft_logits.float(), dim=-1)
        loss = -log_q.gather(-1, emitted.clamp_max(vocab - 1).unsqueeze(-1)).squeeze(-1)
        return loss.masked_fill(emitted >= vocab, 0.0)
    if name not in ("fkl", "tvd", "rkl", "jsd"):
        raise ValueError(f"unknown loss {name!r}; choose from fkl, rkl, jsd, tvd, ce")
    if name == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"JSD beta must lie in (0, 1), got {beta}")
    log_p, log_q, log_mass, trainable = _on_support(draft_logits, top_ids, top_logprobs)
    if name == "fkl":
        loss = _mass_weighted(log_p, log_q)
    elif name == "tvd":
        loss = 0.5 * ((log_p.exp() - log_q.exp()).abs().sum(-1) + (1 - log_mass.exp()))
    else:
        log_q_hat = log_q - log_mass.unsqueeze(-1)
        if name == "rkl":
            loss = _mass_weighted(log_q_hat, log_p) - log_mass
        else:
            mixture = beta * log_p.exp() + (1 - beta) * log_q_hat.exp()
            log_m = torch.where(mixture > 0, mixture, 1.0).log()  # 0 only off the support
            loss = (
                beta * _mass_weighted(log_p, log_m) + (1 - beta) * _mass_weighted(log_q_hat, log_m) - log_mass
            )
    return loss.masked_fill(~trainable, 0.0)


def topk_acceptance(
    draft_logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor
) -> torch.Tensor:
    """Expected acceptance sum_x min(p_hat(x), q(x)) per position [...] (1 - the TVD above)."""
    log_p, log_q, _, trainable = _on_support(draft_logits, top_ids, top_logprobs)
    return torch.minimum(log_p.exp(), log_q.exp()).sum(-1).masked_fill(~trainable, 0.0)


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
