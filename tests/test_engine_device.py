"""Device discipline: a decode step reads nothing back from the device except in its one batched
transfer (`serving.engine.hf.to_host`), whatever the proposer and whatever the request keeps.

On the CPU every tensor is a host tensor, so the test watches the operations that would make a
GPU wait: every `.item()`, `int()`, `bool()` of a tensor and every `nonzero` dispatches an ATen op
that a dispatch mode sees. None may run during a step outside `to_host`, which runs once."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import serving.engine.hf as engine_module
from serving.engine.hf import SpecEngine, to_host
from serving.engine.proposers import HeadsProposer
from serving.engine.tree import static_tree
from tiny_models import random_heads

SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "equal", "is_nonzero"}
PROMPT = [5, 17, 42, 9, 3, 77, 5, 17]


class SyncWatch(TorchDispatchMode):
    """Records the syncing ATen ops run while `watching`."""

    def __init__(self):
        super().__init__()
        self.watching, self.seen = True, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.watching and func.__name__.split(".")[0] in SYNCING:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def stepped(engine: SpecEngine, monkeypatch, requests: list[dict]) -> tuple[list[str], int, int]:
    """Add the requests, then step until all finish under the watch: (syncing ops seen outside
    to_host, to_host calls, steps)."""
    for request in requests:
        engine.add(PROMPT, **request)
    watch, calls = SyncWatch(), []

    def watched_to_host(tensors):
        calls.append(1)
        watch.watching = False
        try:
            return to_host(tensors)
        finally:
            watch.watching = True

    monkeypatch.setattr(engine_module, "to_host", watched_to_host)
    steps = 0
    with watch:
        while engine.active:
            engine.step()
            steps += 1
    return watch.seen, len(calls), steps


REQUESTS = [
    dict(max_new_tokens=10, stop_token_ids=[]),  # greedy
    dict(max_new_tokens=10, stop_token_ids=[], temperature=0.9, top_p=0.9),  # sampled
    dict(max_new_tokens=10, stop_token_ids=[], temperature=0.9, seed=7, top_logprobs=4),  # seeded
    dict(max_new_tokens=10, top_logprobs=16, hidden_states=True),  # what a trace keeps
]


@pytest.mark.parametrize("proposer", ["draft", "ngram", "suffix", "none"])
def test_a_step_reads_back_only_in_its_one_transfer(model_dirs, monkeypatch, proposer):
    llama = model_dirs["llama"]
    draft = str(llama["small"]) if proposer == "draft" else None
    engine = SpecEngine.from_pretrained(
        str(llama["target"]), draft, None if proposer == "suffix" else proposer, num_speculative_tokens=3,
        suffix=proposer == "suffix",
    )  # fmt: skip
    seen, transfers, steps = stepped(engine, monkeypatch, REQUESTS)
    assert seen == [] and transfers == steps > 0


def test_heads_chains_and_trees_read_back_only_in_the_transfer(model_dirs, monkeypatch):
    engine = SpecEngine.from_pretrained(str(model_dirs["llama"]["target"]), num_speculative_tokens=3)
    engine.proposer = HeadsProposer(random_heads(engine.target, "hydra"), static_tree((2, 2, 1)))
    seen, transfers, steps = stepped(engine, monkeypatch, REQUESTS)  # greedy ones take the tree
    assert seen == [] and transfers == steps > 0


def test_to_host_keeps_shapes_dtypes_and_gaps():
    parts = [torch.arange(6).view(2, 3), None, torch.ones(2, 2, dtype=torch.bfloat16), torch.tensor([4])]
    back = to_host(parts)
    assert back[1] is None
    for original, copy in zip([parts[0], parts[2], parts[3]], [back[0], back[2], back[3]], strict=True):
        assert copy.device.type == "cpu" and copy.dtype == original.dtype and torch.equal(copy, original)
