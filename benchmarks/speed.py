"""Decode speed side by side: engines that share a target, on the same prompts, in rotation (each
prompt through every engine before the next), so that a slow spell of the machine hits all alike."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from serving.engine import Generation


class Decoder(Protocol):
    """A `serving.engine.SpecEngine`, or anything that picks one per prompt."""

    def generate(
        self, prompt: Sequence[int], max_new_tokens: int, *, stop_token_ids: list[int]
    ) -> Generation: ...


def rotate(engines: dict[str, Decoder], prompts: Sequence[Sequence[int]], max_new_tokens: int) -> dict:
    """Greedy tokens/s and acceptance α of each engine on `prompts`; raises if their outputs differ
    (lossless)."""
    seconds, tokens = dict.fromkeys(engines, 0.0), 0
    drafted, accepted = dict.fromkeys(engines, 0), dict.fromkeys(engines, 0)
    for prompt in prompts:
        outputs = {}
        for name, engine in engines.items():
            began = time.perf_counter()
            generation = engine.generate(prompt, max_new_tokens, stop_token_ids=[])
            seconds[name] += time.perf_counter() - began
            outputs[name] = generation.token_ids
            drafted[name] += generation.stats.drafted
            accepted[name] += generation.stats.accepted
        if len({tuple(o) for o in outputs.values()}) != 1:
            raise RuntimeError(f"greedy outputs differ across engines: {outputs}")
        tokens += len(next(iter(outputs.values())))
    return {
        "prompts": len(prompts),
        "tokens": tokens,
        "tokens_per_s": {name: round(tokens / s, 1) for name, s in seconds.items()},
        "acceptance": {n: round(accepted[n] / drafted[n], 4) if drafted[n] else None for n in engines},
    }
