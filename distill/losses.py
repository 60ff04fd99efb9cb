"""Distillation losses between a target distribution p and a draft distribution q.

Pure tensor functions: logits in, a scalar out. `mask` [...] selects the positions that count.
"""

from __future__ import annotations

import torch


def forward_kl(target_logits: torch.Tensor, draft_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of KL(p || q) = sum_x p(x) (log p(x) - log q(x)); logits [..., V]."""
    log_p = torch.log_softmax(target_logits.float(), dim=-1)
    log_q = torch.log_softmax(draft_logits.float(), dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)  # [...]
    mask = mask.float()
    return (per_position * mask).sum() / mask.sum().clamp_min(1.0)
