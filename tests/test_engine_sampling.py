"""End to end: sampled output of the engine has the target's distribution, whatever the draft,
with a generator (unseeded requests) and with the seeded race (serving.engine.sampling), and for a draft
with fewer output rows than the target (a padded vocabulary)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_heads import random_heads

from serving.engine.hf import SpecEngine
from serving.engine.proposers import (
    DraftModelProposer,
    HeadsProposer,
    NgramProposer,
    NullProposer,
    SuffixProposer,
)
from serving.engine.sampling import SamplingParams, process_logits
from tiny_models import build

VOCAB = 8
SAMPLES = 4_000
PROMPT = [3, 1, 4, 1, 5]


def joint_first_two(model, params: SamplingParams) -> torch.Tensor:
    """Exact distribution of the first two generated tokens under `params`: [V, V]."""
    with torch.no_grad():
        first = process_logits(model(torch.tensor([PROMPT])).logits[0, -1], params)  # [V]
        contexts = torch.tensor([PROMPT + [t] for t in range(VOCAB)])  # [V, L+1]
        second = process_logits(model(contexts).logits[:, -1], params)  # [V, V]
    return (first[:, None] * second).double()


def empirical_first_two(engine: SpecEngine, params: SamplingParams, seeded: bool) -> torch.Tensor:
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    for seed in range(SAMPLES):
        out = engine.generate(
            PROMPT,
            2,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=seed if seeded else None,
            stop_token_ids=[],
        ).token_ids
        counts[out[0], out[1]] += 1
    return counts / SAMPLES


@pytest.fixture(scope="module")
def pair():
    # A larger init than usual gives peaked, clearly different distributions (acceptance ~0.4 at T=1).
    return tuple(build("llama", 1, 32, seed=seed, vocab=VOCAB, init_std=0.15) for seed in (1, 2))


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def noise_bound(expected: torch.Tensor) -> float:
    """Three times the expected TV between `expected` and an empirical histogram of SAMPLES draws."""
    return 3 * 0.5 * float((2 * expected * (1 - expected) / (torch.pi * SAMPLES)).sqrt().sum())


@pytest.mark.slow
@pytest.mark.parametrize(
    "proposer,params,seeded",
    [
        ("draft", SamplingParams(1.0), False),
        ("draft", SamplingParams(0.8, top_p=0.9, top_k=5), False),
        ("ngram", SamplingParams(1.2, top_p=0.95), False),
        ("suffix", SamplingParams(1.0), False),  # drafts what earlier samples drew after the prompt
        ("hydra heads", SamplingParams(0.9, top_k=6), True),
        ("padded draft", SamplingParams(1.0), False),
        ("padded draft", SamplingParams(0.9, top_k=6), True),
    ],
    ids=str,
)
def test_first_two_tokens_follow_target(pair, proposer, params, seeded):
    target, draft = pair
    chosen = {
        "draft": lambda: DraftModelProposer(draft),
        "ngram": NgramProposer,
        "suffix": NullProposer,  # suffix speculation alone
        "hydra heads": lambda: HeadsProposer(random_heads(target, "hydra")),
        "padded draft": lambda: DraftModelProposer(padded(draft, VOCAB - 2), target_rows=VOCAB),
    }[proposer]()
    suffix = SuffixProposer() if proposer == "suffix" else None
    engine = SpecEngine(target, chosen, num_speculative_tokens=3, suffix=suffix)
    expected = joint_first_two(target, params)
    observed = empirical_first_two(engine, params, seeded)
    assert tv(observed, expected) < noise_bound(expected)
    if proposer == "draft":  # the test can fail: the draft's own distribution is far from the target's
        assert tv(joint_first_two(draft, params), expected) > 5 * noise_bound(expected)


def padded(draft, rows: int):
    """A copy of `draft` with only its first `rows` output rows: the target's last ids are then ones
    it cannot propose, as a draft of a padded vocabulary cannot propose the target's padding."""
    smaller = copy.deepcopy(draft)
    smaller.resize_token_embeddings(rows)
    return smaller
