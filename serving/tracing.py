"""What a served request leaves behind: the store's Trace, built from the engine's Generation."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from serving.engine.protocol import Generation
from store.traces import Trace


def trace_of(
    request_id: str,
    domain: str,
    target_id: str,
    draft_versions: tuple[str, ...],
    prompt_ids: Sequence[int],
    generation: Generation,
    sampling: dict,
    top_k: int | None = None,
) -> Trace:
    """The trace of one request, with the target's `top_k` (default: all the generation has) most
    likely tokens per position; `generation` must come from generate(top_logprobs=K > 0)."""
    if generation.top_ids is None:
        raise ValueError("a trace needs the target's top-K: generate with top_logprobs > 0")
    return Trace(
        request_id=request_id,
        time=time.time(),
        domain=domain,
        target_id=target_id,
        draft_versions=draft_versions,
        prompt_ids=np.asarray(prompt_ids, np.int32),
        output_ids=np.asarray(generation.token_ids, np.int32),
        top_ids=generation.top_ids[:, :top_k].numpy().astype(np.int32),
        top_logprobs=generation.top_logprobs[:, :top_k].numpy().astype(np.float16),
        drafted=np.asarray(generation.stats.drafted_per_step, np.uint8),
        accepted=np.asarray(generation.stats.accepted_per_step, np.uint8),
        sampling=sampling,
        hidden=None if generation.hidden is None else generation.hidden.float().numpy().astype(np.float16),
    )
