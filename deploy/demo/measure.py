"""What `osd demo` measures once its workload is served, besides what the clients saw.

- Decode speed side by side (`rotate`): engines that share a target decode the same prompts in
  rotation (each prompt through every engine before the next), so that a slow spell of the
  machine hits all alike; their greedy outputs must be identical. The benchmarks use it too.
- Expected acceptance on the run's held-out traces (`held_out_acceptance`): the starting draft
  (or heads) against the live version, per domain, on the traces the trainer never trains on.
  It depends only on the weights and the traces, never on timing: what the draft learnt.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

import redis
import torch
from transformers import AutoModelForCausalLM

from deploy.demo.build import DemoModels
from deploy.ray_serve import ServiceConfig, trainer_config
from distill.acceptance import mean_acceptance
from distill.heads import DraftHeads
from serving.engine.hf import SpecEngine
from serving.engine.proposers import DraftModelProposer, HeadsProposer, NullProposer
from serving.engine.protocol import Generation
from serving.engine.versions import version_draft
from store.registry import DraftVersion, Registry
from store.traces import StreamConfig, Trace, TraceDecodeError, decode, is_held_out
from trainer.learners import learner_for


class Decoder(Protocol):
    """A `serving.engine.hf.SpecEngine`, or anything that picks one per prompt."""

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


def measure_speed(
    models: DemoModels,
    config: ServiceConfig,
    registry: Registry,
    live: DraftVersion | None,
    prompts: list[tuple[int, ...]],
    max_new_tokens: int,
) -> dict:
    """Greedy tokens/s on `prompts` with no speculation, the starting draft (or heads) and the live
    one, in rotation, on one thread as a replica decodes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        target = AutoModelForCausalLM.from_pretrained(models.target).eval()

        def proposer(version: DraftVersion | None) -> DraftModelProposer | HeadsProposer:
            """The starting draft (or heads), or with `version` its weights loaded into it."""
            heads = config.heads
            if heads:
                module = DraftHeads.for_target(heads, target)
            else:
                module = AutoModelForCausalLM.from_pretrained(models.draft)
            if version is not None and heads:
                module.load_state_dict(registry.load(version))
            elif version is not None:
                module = version_draft(module, version, registry.load(version))
            module.eval()
            return HeadsProposer(module) if heads else DraftModelProposer(module)

        engines = {
            "no speculation": SpecEngine(target, NullProposer(), 0),
            "initial draft": SpecEngine(target, proposer(None), config.k),
            "live draft": SpecEngine(target, proposer(live), config.k),
        }
        return rotate(engines, prompts, max_new_tokens)
    finally:
        torch.set_num_threads(threads)


def held_out_traces(client: redis.Redis, stream: StreamConfig) -> list[Trace]:
    """The held-out traces the stream holds, oldest first (entries that do not decode are skipped)."""
    traces = []
    for _, fields in client.xrange(stream.stream):
        try:
            trace = decode(fields)
        except TraceDecodeError:
            continue
        if is_held_out(trace.request_id, stream.held_out_fraction):
            traces.append(trace)
    return traces


@torch.no_grad()
def held_out_acceptance(
    config: ServiceConfig, registry: Registry, client: redis.Redis, live: DraftVersion | None
) -> dict[str, dict]:
    """Per domain: held-out traces, and the expected acceptance (sum min(p, q) on the logged
    top-K, `distill.acceptance`) of the starting draft (or heads) and of `live` on them."""
    learner = learner_for(trainer_config(config), config.target if config.heads else config.draft)
    starting, current = learner.build().eval(), learner.build().eval()
    if live is not None:
        learner.load(current, registry.load(live))
    by_domain: dict[str, list[Trace]] = defaultdict(list)
    for trace in held_out_traces(client, config.stream):
        if learner.usable(trace):
            by_domain[trace.domain].append(trace)
    return {
        domain: {
            "traces": len(traces),
            "starting": round(mean_acceptance(learner.acceptance(starting, traces)), 4),
            "live": round(mean_acceptance(learner.acceptance(current, traces)), 4),
        }
        for domain, traces in sorted(by_domain.items())
    }
