"""Suffix speculation in the engine: lossless (greedy, seeded, alone and batched, chains and
trees), learning across requests as they finish, per domain, with no weights to load."""

from __future__ import annotations

import pytest
import torch
from test_engine_lossless import MAX_NEW, PROMPTS, hf_greedy

from serving.engine.hf import SpecEngine
from serving.engine.proposers import DraftRow, NullProposer, SuffixProposer
from serving.engine.sampling import SamplingParams
from serving.errors import IncompatibleDraftError
from store.registry import ALL_DOMAINS
from tiny_models import ARCHS

REPEATING = [7, 8, 9, 10, 11, 7, 8, 9, 10, 11, 7, 8]  # its own context predicts its continuation


@pytest.fixture(scope="module")
def references(model_dirs):
    prompts = [*PROMPTS, REPEATING]
    return {arch: [hf_greedy(model_dirs[arch]["target"], p, MAX_NEW) for p in prompts] for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", [3, 8])
def test_greedy_is_lossless_and_a_repeated_request_is_drafted_from_the_first(model_dirs, references, arch, k):
    engine = SpecEngine.from_pretrained(
        model_dirs[arch]["target"], proposer="suffix", num_speculative_tokens=k
    )
    prompts = [*PROMPTS, REPEATING]
    first = [engine.generate(p, MAX_NEW) for p in prompts]
    again = [engine.generate(p, MAX_NEW) for p in prompts]
    for result, expected in zip(first + again, references[arch] * 2, strict=True):
        assert result.token_ids == expected
    for before, after in zip(first, again, strict=True):  # the first answer is in the index now
        assert after.stats.accepted > before.stats.accepted
        assert after.stats.steps < before.stats.steps
    assert engine.proposer.shared.hits > 0 and len(engine.proposer.shared) == 2 * len(prompts)


def test_candidates_that_part_are_proposed_as_a_tree_to_greedy_requests_only():
    proposer = SuffixProposer()
    proposer.shared.add(ALL_DOMAINS, [20, 21, 22, 23, 24, 25, 26, 27])
    proposer.shared.add(ALL_DOMAINS, [20, 21, 22, 23, 24, 25, 40, 41])
    context = [20, 21, 22, 23]

    def propose(params: SamplingParams):
        row = DraftRow(proposer.new_state(), torch.tensor(context), context, 4, params, torch.Generator())
        return proposer.propose([row])[0]

    tree = propose(SamplingParams())
    assert tree.parents is not None and sorted(zip(tree.parents, tree.tokens.tolist(), strict=True)) == [
        (-1, 24), (0, 25), (1, 26), (1, 40)
    ]  # fmt: skip
    chain = propose(SamplingParams(temperature=1.0))
    assert chain.parents is None and chain.tokens.tolist() in ([24, 25, 26, 27], [24, 25, 40, 41])
    proposer.trees = False  # a target that cannot verify trees
    assert propose(SamplingParams()).parents is None


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_requests_are_lossless_through_trees(model_dirs, references, arch):
    """Two past requests share the prompt and the answer's first tokens, then part: the target keeps
    its own path through the tree."""
    engine = SpecEngine.from_pretrained(
        model_dirs[arch]["target"], proposer="suffix", num_speculative_tokens=4
    )
    prompt, expected = PROMPTS[2], references[arch][2]
    wrong = [(t + 1) % 100 + 3 for t in expected[5:]]
    engine.proposer.shared.add(ALL_DOMAINS, prompt + expected)
    engine.proposer.shared.add(ALL_DOMAINS, prompt + expected[:5] + wrong)
    trees = []
    verify = engine._verify_tree
    engine._verify_tree = lambda *args: trees.append(args[1]) or verify(*args)
    result = engine.generate(prompt, MAX_NEW)
    assert result.token_ids == expected
    assert trees and result.stats.accepted >= len(expected) // 2


def test_domains_keep_their_own_indexes(model_dirs, references):
    engine = SpecEngine.from_pretrained(
        model_dirs["llama"]["target"], proposer="suffix", num_speculative_tokens=4
    )
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
    suffix, plain = SpecEngine(target, SuffixProposer(), 5), SpecEngine(target, NullProposer(), 5)

    def batch(engine: SpecEngine) -> list[list[int]]:
        requests = [engine.add(p, MAX_NEW) for p in PROMPTS]
        requests += [
            engine.add(p, MAX_NEW, temperature=0.8, seed=s) for s, p in enumerate([REPEATING, *PROMPTS])
        ]
        while engine.active:
            engine.step()
        return [r.output for r in requests]

    expected = batch(plain)
    assert expected[: len(PROMPTS)] == references["qwen2"][: len(PROMPTS)]
    for _ in range(2):  # the second batch is drafted from the first's
        assert batch(suffix) == expected
    assert suffix.acceptance.alpha > plain.acceptance.alpha  # plain decoding never updates its estimate


def test_the_suffix_proposer_has_no_weights():
    with pytest.raises(IncompatibleDraftError, match="no weights"):
        SuffixProposer().load_weights({"w": torch.zeros(1)})
    SuffixProposer().load_weights({})


def test_calibration_leaves_the_index_empty(model_dirs):
    engine = SpecEngine.from_pretrained(
        model_dirs["llama"]["target"], proposer="suffix", num_speculative_tokens=3
    )
    engine.calibrate(max_batch=2, repeats=1)
    assert len(engine.proposer.shared) == 0 and engine.proposer.shared.tokens == 0
