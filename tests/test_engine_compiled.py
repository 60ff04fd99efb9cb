"""The GPU's compiled path, run on the CPU with the real compiler: torch.compile's inductor backend
with fullgraph=True on the verify and draft steps (a graph break would be an error), a bounded,
known number of graphs (step widths in buckets, serving.engine.device), and output that stays exact,
greedy and seeded-sampled alike, against the eager engine."""

from __future__ import annotations

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from serving.engine.device import DeviceProfile
from serving.engine.hf import SpecEngine
from serving.engine.proposers import DraftModelProposer

PROMPTS = [[5, 17, 42, 9, 3, 77], [8, 1, 30], [61, 2, 2, 14, 90, 33, 7, 19, 4]]
REQUESTS = [dict(), dict(temperature=0.9, seed=3), dict(temperature=1.0, top_p=0.8, seed=11)]


def outputs(engine: SpecEngine) -> list[list[int]]:
    """Every prompt under every request kind, two sequences at a time."""
    done = []
    for kind in REQUESTS:
        batch = [engine.add(prompt, 12, stop_token_ids=[], **kind) for prompt in PROMPTS[:2]]
        done += run(engine, batch)
        done += run(engine, [engine.add(PROMPTS[2], 12, stop_token_ids=[], **kind)])
    return done


def run(engine: SpecEngine, batch) -> list[list[int]]:
    finished = {}
    while engine.active:
        for decoding, step in engine.step():
            if step.generation is not None:
                finished[id(decoding)] = step.generation.token_ids
    return [finished[id(d)] for d in batch]


def test_inductor_fullgraph_steps_are_exact_and_their_graphs_bounded(model_dirs):
    llama = model_dirs["llama"]
    eager = SpecEngine.from_pretrained(llama["target"], draft=llama["small"], num_speculative_tokens=3)
    profile = DeviceProfile(
        torch.float32, static_cache=True, slots=2, capacity=64, compile_mode="default",
        compile_backend="inductor",
    )  # fmt: skip
    torch._dynamo.reset()
    counters.clear()
    compiled = SpecEngine(eager.target, DraftModelProposer(eager.proposer.model, profile), 3, profile)
    expected = outputs(eager)
    assert outputs(compiled) == expected  # greedy: the target's own; seeded: the same draws
    # The verify step runs at k + 1 = 4; the draft's catch-ups at widths 1, 2 and 4 (buckets).
    graphs = counters["stats"]["unique_graphs"]
    assert 2 <= graphs <= 4 and not counters["graph_break"], dict(counters["stats"])
    assert outputs(compiled) == expected and counters["stats"]["unique_graphs"] == graphs  # no more
