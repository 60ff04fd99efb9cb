"""Seeded requests repeat: the same seed gives the same text whatever k, the proposer, the draft
or the batch around it, because its draws depend only on the seed and the output position
(serving.engine.sampling's race); different seeds give different texts. (That seeded texts have the
target's distribution is in test_engine_sampling.)"""

from __future__ import annotations

import torch

from serving.engine.hf import SpecEngine
from serving.engine.proposers import NgramProposer, NullProposer
from serving.engine.sampling import position_seed, race, seeded_noise
from tiny_models import VOCAB

PROMPT = [3, 17, 17, 9, 41, 3, 17]
OTHERS = [[5], [8, 9, 10, 11], [60, 61, 2, 7, 7]]


def seeded(engine: SpecEngine, seed: int, k: int | None = None, neighbours: bool = False) -> list[int]:
    """The seeded request's tokens, decoded alone or among unseeded sampled neighbours."""
    request = engine.add(PROMPT, 32, temperature=0.9, top_p=0.95, seed=seed, stop_token_ids=[])
    if neighbours:
        for prompt in OTHERS:
            engine.add(prompt, 20, temperature=1.0, stop_token_ids=[])
    while request in engine.active:
        engine.step(k)
    for other in list(engine.active):
        engine.abandon(other)
    return request.output


def test_a_seed_gives_one_text_whatever_k_proposer_draft_or_batch(model_dirs):
    dirs = model_dirs["llama"]
    near = SpecEngine.from_pretrained(dirs["target"], draft=dirs["near"], num_speculative_tokens=5)
    small = SpecEngine.from_pretrained(dirs["target"], draft=dirs["small"], num_speculative_tokens=3)
    reference = seeded(near, 7)
    assert seeded(near, 7) == reference
    for k in (0, 1, 3, 5):
        assert seeded(near, 7, k) == reference
    assert seeded(near, 7, neighbours=True) == reference
    assert seeded(small, 7, neighbours=True) == reference
    for proposer in (NgramProposer(), NullProposer()):
        assert seeded(SpecEngine(near.target, proposer, 3), 7) == reference
    assert (
        near.generate(PROMPT, 32, temperature=0.9, top_p=0.95, seed=7, stop_token_ids=[]).stats.accepted > 0
    )
    assert seeded(near, 8) != reference


def test_seeded_noise_depends_on_seed_and_position_only():
    noise = seeded_noise(7, first=3, count=4, vocab=VOCAB, device=torch.device("cpu"))  # [4, V]
    assert torch.equal(noise[1:], seeded_noise(7, 4, 3, VOCAB, torch.device("cpu")))
    assert not torch.equal(noise[0], seeded_noise(8, 3, 1, VOCAB, torch.device("cpu"))[0])
    assert bool((noise > 0).all())
    assert (
        len({position_seed(7, t) for t in range(1000)} | {position_seed(8, t) for t in range(1000)}) == 2000
    )
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    winners = race(probs, torch.ones(2, 3))
    assert winners.tolist()[0] == 1 and winners.tolist()[1] in (0, 2)  # never a zero-probability token
