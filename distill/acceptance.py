"""Offline acceptance estimates: how often speculative sampling would keep a draft's tokens.

The expected acceptance at one position is sum_x min(p(x), q(x)) for target p and draft q
(DESIGN.md); it is what speculative sampling realises, so training and gating use it.
"""

from __future__ import annotations

import torch


def expected_acceptance(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """Per-position expected acceptance from logits [..., V] of the same positions -> [...]."""
    p = torch.softmax(target_logits.float(), dim=-1)
    q = torch.softmax(draft_logits.float(), dim=-1)
    return torch.minimum(p, q).sum(-1)


def greedy_agreement(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """Per-position 1.0 where the draft's argmax equals the target's, else 0.0 -> [...]."""
    return (target_logits.argmax(-1) == draft_logits.argmax(-1)).float()
