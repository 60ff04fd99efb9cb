"""Traces into padded training batches: token ids for the draft, and the target's logged top-K at
every position where the target emitted a token.

A trace of prompt P and output T becomes the sequence s = P + T; the draft reads s[:-1] and at
position j predicts s[j + 1], so output token t is predicted at position len(P) + t - 1. Long
sequences keep their last `max_len` input tokens (the output end), rows are right-padded, and
`mask` marks the positions that carry a logged target distribution. A draft with fewer rows
than the target (serving.engine.vocab) reads the ids it has no embedding for as `pad_id`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


class TraceLike(Protocol):
    """What a batch needs of a trace (store.traces.Trace has it)."""

    prompt_ids: np.ndarray  # [P]
    output_ids: np.ndarray  # [T]
    top_ids: np.ndarray  # [T, K]
    top_logprobs: np.ndarray  # [T, K]


@dataclass(frozen=True)
class TraceBatch:
    input_ids: torch.Tensor  # [B, L] draft input, right-padded
    attention_mask: torch.Tensor  # [B, L] 1 on real tokens
    mask: torch.Tensor  # [B, L] bool: a target distribution was logged for this position
    emitted: torch.Tensor  # [B, L] the token the target emitted there (0 elsewhere)
    top_ids: torch.Tensor  # [B, L, K]
    top_logprobs: torch.Tensor  # [B, L, K] (0 where mask is False)

    def to(self, device: torch.device | str) -> TraceBatch:
        return TraceBatch(*(t.to(device) for t in vars(self).values()))


def make_batch(
    traces: Sequence[TraceLike], max_len: int, pad_id: int = 0, vocab: int | None = None
) -> TraceBatch:
    """Pad traces into one batch of at most max_len input positions per row, for a draft with
    `vocab` input rows (None: every id has one)."""
    if not traces:
        raise ValueError("a batch needs at least one trace")
    top_k = {np.shape(t.top_ids)[1] for t in traces}
    if len(top_k) != 1:
        raise ValueError(f"traces log different top-K sizes {sorted(top_k)}; batch them separately")
    (top_k,) = top_k
    rows = []
    for trace in traces:
        sequence = np.concatenate([trace.prompt_ids, trace.output_ids]).astype(np.int64)
        inputs = sequence[:-1]
        first = len(trace.prompt_ids) - 1  # input position predicting output token 0
        cut = max(0, len(inputs) - max_len)
        rows.append((inputs[cut:], first - cut, trace))
    length = max(len(inputs) for inputs, _, _ in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    emitted = torch.zeros(batch, length, dtype=torch.long)
    top_ids = torch.zeros(batch, length, top_k, dtype=torch.long)
    top_logprobs = torch.zeros(batch, length, top_k, dtype=torch.float32)
    for row, (inputs, first, trace) in enumerate(rows):
        input_ids[row, : len(inputs)] = torch.from_numpy(inputs)
        attention_mask[row, : len(inputs)] = 1
        outputs = np.arange(len(trace.output_ids))
        positions = first + outputs
        keep = (positions >= 0) & (positions < len(inputs))
        positions, outputs = torch.from_numpy(positions[keep]), outputs[keep]
        mask[row, positions] = True
        emitted[row, positions] = torch.from_numpy(np.asarray(trace.output_ids, np.int64)[outputs])
        top_ids[row, positions] = torch.from_numpy(np.asarray(trace.top_ids, np.int64)[outputs])
        top_logprobs[row, positions] = torch.from_numpy(np.asarray(trace.top_logprobs, np.float32)[outputs])
    if vocab is not None:
        input_ids = input_ids.masked_fill(input_ids >= vocab, pad_id)
    return TraceBatch(input_ids, attention_mask, mask, emitted, top_ids, top_logprobs)
