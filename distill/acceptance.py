"""Offline acceptance estimates: how often speculative sampling would keep a draft's tokens.

The expected acceptance at one position is sum_x min(p(x), q(x)) for target p and draft q
(DESIGN.md); it is what speculative sampling realises, so training and gating use it. Offline,
with full target logits, `expected_acceptance`; online, on traces that logged the target's
top-K, `trace_acceptance`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distill.batches import TraceLike, make_batch
from distill.losses import topk_acceptance


def expected_acceptance(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """Per-position expected acceptance from logits [..., V] of the same positions -> [...]."""
    p = torch.softmax(target_logits.float(), dim=-1)
    q = torch.softmax(draft_logits.float(), dim=-1)
    return torch.minimum(p, q).sum(-1)


def greedy_agreement(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """Per-position 1.0 where the draft's argmax equals the target's, else 0.0 -> [...]."""
    return (target_logits.argmax(-1) == draft_logits.argmax(-1)).float()


@torch.no_grad()
def trace_acceptance(
    draft: torch.nn.Module,
    traces: Sequence[TraceLike],
    max_len: int,
    batch_size: int = 16,
    greedy: bool = False,
) -> list[tuple[float, int]]:
    """Per trace: (sum over its logged positions of sum_x min(p_hat(x), q(x)), number of positions),
    with p_hat the target's logged top-K renormalised (distill.losses). Batched, on the draft's device.
    The expected acceptance of a set of traces is the sum of the first over the sum of the second.

    greedy=True scores instead whether the draft's argmax is the token the target emitted: the
    acceptance of a greedy draft on greedy requests, which needs no truncated p. With a small K
    and a flat target, sum min(p_hat, q) on the top-K is far below the full-vocabulary value."""
    device, rows = next(draft.parameters()).device, draft.get_input_embeddings().weight.shape[0]
    results = []
    for start in range(0, len(traces), batch_size):
        batch = make_batch(traces[start : start + batch_size], max_len, vocab=rows).to(device)
        logits = draft(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        if greedy:
            accepted = (logits.argmax(-1) == batch.emitted).float() * batch.mask  # [B, L]
        else:
            accepted = topk_acceptance(logits, batch.top_ids, batch.top_logprobs) * batch.mask  # [B, L]
        results += list(zip(accepted.sum(-1).tolist(), batch.mask.sum(-1).tolist(), strict=True))
    return results


def mean_acceptance(per_trace: Sequence[tuple[float, int]]) -> float | None:
    """Position-weighted mean of `trace_acceptance` results (None when there are no positions)."""
    positions = sum(n for _, n in per_trace)
    return sum(s for s, _ in per_trace) / positions if positions else None
