"""Suffix speculation in the engine: lossless (greedy, seeded, alone and batched, chains and
trees), learning across requests as they finish, per domain; beside a draft under the per-step
controller."""

from __future__ import annotations

import pytest
import torch
from test_engine_lossless import MAX_NEW, PROMPTS, hf_greedy

from serving.engine.hf import Decoding, SpecEngine
from serving.engine.models import load_causal_lm, tree_support
from serving.engine.proposers import NullProposer, SuffixProposer
from serving.engine.speculation import Costs, StepCosts
from serving.engine.suffix import SuffixConfig
from store.registry import ALL_DOMAINS
from tiny_models import ARCHS

REPEATING = [7, 8, 9, 10, 11, 7, 8, 9, 10, 11, 7, 8]  # its own context predicts its continuation


@pytest.fixture(scope="module")
def references(model_dirs):
    prompts = [*PROMPTS, REPEATING]
    return {arch: [hf_greedy(model_dirs[arch]["target"], p, MAX_NEW) for p in prompts] for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tokens", [3, 8])
def test_greedy_is_lossless_and_a_repeated_request_is_drafted_from_the_first(
    model_dirs, references, arch, tokens
):
    target = load_causal_lm(model_dirs[arch]["target"], torch.device("cpu"), torch.float32)
    index = SuffixProposer(SuffixConfig(max_tokens=tokens), trees=tree_support(target) is None)
    engine = SpecEngine(target, NullProposer(), 0, suffix=index)
    prompts = [*PROMPTS, REPEATING]
    first = [engine.generate(p, MAX_NEW) for p in prompts]
    again = [engine.generate(p, MAX_NEW) for p in prompts]
    for result, expected in zip(first + again, references[arch] * 2, strict=True):
        assert result.token_ids == expected
    for before, after in zip(first, again, strict=True):  # the first answer is in the index now
        assert after.stats.accepted > before.stats.accepted
        assert after.stats.steps < before.stats.steps
    assert engine.suffix.shared.hits > 0 and len(engine.suffix.shared) == 2 * len(prompts)


def test_candidates_that_part_are_a_tree_for_greedy_requests_only():
    proposer = SuffixProposer()
    proposer.shared.add(ALL_DOMAINS, [20, 21, 22, 23, 24, 25, 26, 27])
    proposer.shared.add(ALL_DOMAINS, [20, 21, 22, 23, 24, 25, 40, 41])
    context = [20, 21, 22, 23]

    def propose(greedy: bool):
        found = proposer.candidates(proposer.new_state(), context, 4, greedy)
        return SuffixProposer.proposal(found, torch.device("cpu"))

    tree = propose(greedy=True)
    assert tree.parents is not None and sorted(zip(tree.parents, tree.tokens.tolist(), strict=True)) == [
        (-1, 24), (0, 25), (1, 26), (1, 40), (2, 41), (3, 27)
    ]  # fmt: skip
    chain = propose(greedy=False)
    assert chain.parents is None and chain.tokens.tolist() in ([24, 25, 26, 27], [24, 25, 40, 41])
    proposer.trees = False  # a target that cannot verify trees
    assert propose(greedy=True).parents is None


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_requests_are_lossless_through_trees(model_dirs, references, arch):
    """Two past requests share the prompt and the answer's first tokens, then part: the target keeps
    its own path through the tree."""
    engine = SpecEngine.from_pretrained(model_dirs[arch]["target"], suffix=True, num_speculative_tokens=4)
    prompt, expected = PROMPTS[2], references[arch][2]
    wrong = [(t + 1) % 100 + 3 for t in expected[5:]]
    engine.suffix.shared.add(ALL_DOMAINS, prompt + expected)
    engine.suffix.shared.add(ALL_DOMAINS, prompt + expected[:5] + wrong)
    trees = []
    verify = engine._verify_tree
    engine._verify_tree = lambda *args: trees.append(args[1]) or verify(*args)
    result = engine.generate(prompt, MAX_NEW)
    assert result.token_ids == expected
    assert trees and result.stats.accepted >= len(expected) // 2


def test_domains_keep_their_own_indexes(model_dirs, references):
    engine = SpecEngine.from_pretrained(model_dirs["llama"]["target"], suffix=True, num_speculative_tokens=4)
    prompt, expected = PROMPTS[2], references["llama"][2]
    engine.add(prompt, MAX_NEW, domain="python")
    while engine.active:
        engine.step()
    other = engine.add(prompt, MAX_NEW, domain="prose")
    while engine.active:
        engine.step()
    python = engine.add(prompt, MAX_NEW, domain="python")
    while engine.active:
        engine.step()
    assert other.output == python.output == expected
    assert python.stats.accepted > other.stats.accepted


def test_seeded_and_batched_requests_are_lossless(model_dirs, references):
    """A batch of greedy and seeded sampled requests: each greedy one is the target's greedy text,
    each seeded one the text plain decoding gives its seed, while the index drafts for them."""
    target = SpecEngine.from_pretrained(model_dirs["qwen2"]["target"], proposer="none").target
    suffix = SpecEngine(target, NullProposer(), 5, suffix=SuffixProposer())
    plain = SpecEngine(target, NullProposer(), 5)

    def batch(engine: SpecEngine) -> list[Decoding]:
        requests = [engine.add(p, MAX_NEW) for p in PROMPTS]
        requests += [
            engine.add(p, MAX_NEW, temperature=0.8, seed=s) for s, p in enumerate([REPEATING, *PROMPTS])
        ]
        while engine.active:
            engine.step()
        return requests

    expected = [r.output for r in batch(plain)]
    assert expected[: len(PROMPTS)] == references["qwen2"][: len(PROMPTS)]
    for _ in range(2):  # the second batch is drafted from the first's
        requests = batch(suffix)
        assert [r.output for r in requests] == expected
    assert all(set(r.stats.by_proposer) <= {"suffix", "none"} for r in requests)
    assert all(r.stats.by_proposer["suffix"]["accepted"] > 0 for r in requests if len(r.output) > 1)


def test_calibration_leaves_the_index_empty(model_dirs):
    engine = SpecEngine.from_pretrained(model_dirs["llama"]["target"], suffix=True, num_speculative_tokens=3)
    engine.calibrate(max_batch=2, repeats=1)
    assert len(engine.suffix.shared) == 0 and engine.suffix.shared.tokens == 0


def test_the_controller_drafts_repeats_from_the_index_and_the_rest_with_the_draft(model_dirs, references):
    """A draft and suffix speculation under the controller: with costs where verifying is cheap,
    a request served before is drafted from the index, a new one by the draft; greedy and seeded
    texts stay the target's, with costs measured or given."""
    llama = model_dirs["llama"]
    engine = SpecEngine.from_pretrained(llama["target"], llama["near"], suffix=True, num_speculative_tokens=3)
    plain = SpecEngine(engine.target, NullProposer(), 3)
    seeded = dict(temperature=0.8, seed=5)

    def batch(on: SpecEngine, prompts: list[list[int]]) -> list[Decoding]:
        requests = [on.add(p, MAX_NEW) for p in prompts] + [on.add(p, MAX_NEW, **seeded) for p in prompts]
        while on.active:
            on.step()
        return requests

    expected = [r.output for r in batch(plain, PROMPTS[:2])]
    engine.costs = engine.calibrate(max_batch=4, repeats=1)
    assert engine.costs.verify.max_k == engine.width == 8 and engine.costs.learnt.max_k == 3
    for _ in range(2):
        assert [r.output for r in batch(engine, PROMPTS[:2])] == expected
    engine.costs = Costs(flat(engine.width), flat(3))  # verifying costs nothing, the draft a little
    fresh = batch(engine, [PROMPTS[2]])
    again = batch(engine, PROMPTS[:2])
    assert [r.output for r in again] == expected and fresh[0].output == references["llama"][2]
    assert all(r.stats.by_proposer.get("draft", {}).get("steps") for r in fresh)
    for request in again:  # served three times before: the index knows the text
        used = request.stats.by_proposer
        assert used["suffix"]["steps"] >= used.get("draft", {}).get("steps", 0)


def flat(most: int) -> StepCosts:
    """One second a step, whatever the batch; a hundredth more per draft."""
    return StepCosts((1, 4), tuple(tuple(1 + 0.01 * k for k in range(most + 1)) for _ in range(2)))
