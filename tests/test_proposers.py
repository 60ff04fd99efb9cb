"""Proposers: n-gram lookup, the draft model's cache bookkeeping, and weight loading."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from serving.engine.models import load_causal_lm
from serving.engine.proposers import DraftModelProposer, DraftRow, NgramProposer, NullProposer, ngram_lookup
from serving.engine.sampling import SamplingParams, process_logits
from serving.errors import IncompatibleDraftError
from tiny_models import build


def ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


@pytest.mark.parametrize(
    "sequence,k,n_min,n_max,expected",
    [
        ((1, 2, 3, 4, 1, 2), 2, 1, 3, (3, 4)),  # suffix [1, 2] matched, its successors copied
        ((1, 2, 3, 4, 1, 2), 5, 1, 3, (3, 4, 1, 2)),  # runs into the end of the sequence
        ((5, 1, 9, 7, 1, 8, 1), 3, 1, 3, (8, 1)),  # the latest match wins
        ((1, 2, 9, 5, 2, 8, 1, 2), 2, 1, 3, (9, 5)),  # longest n first: [2] alone would give (8, 1)
        ((1, 2, 3), 3, 1, 3, ()),  # no earlier occurrence
        ((4, 4, 4), 2, 1, 3, (4,)),  # overlapping match
        ((1, 2, 3, 1), 2, 2, 3, ()),  # n_min 2: a 1-token match does not count
        ((7,), 3, 1, 3, ()),
    ],
)
def test_ngram_lookup(sequence, k, n_min, n_max, expected):
    assert ngram_lookup(sequence, k, n_min, n_max) == list(expected)


def test_ngram_proposer_validates_n():
    with pytest.raises(ValueError):
        NgramProposer(n_min=3, n_max=2)
    with pytest.raises(ValueError):
        NgramProposer(n_min=0)


def test_draft_cache_stays_consistent_for_a_batch():
    """Three sequences drafted together, each with its own history of full acceptance (+ bonus),
    partial and zero acceptance, steps that drafted nothing, and a long jump ahead, told to the
    proposer as the engine does (`observe`): every proposal equals a fresh full forward of the
    draft on the same sequence."""
    draft = build("llama", 2, 32, seed=5)
    proposer = DraftModelProposer(draft)
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    states = [proposer.new_state() for _ in range(3)]
    sequences = [ids(4, 8, 15, 16, 23), ids(42), ids(*range(3, 40))]
    k = 4
    history = [(k, 0, 2), (0, None, k), (2, 1, None), (k, k, 0), (1, 30, 70), (0, 0, 1)]  # None: no drafts
    for accepted in history:
        rows = [i for i, a in enumerate(accepted) if a is not None]
        asked = [DraftRow(states[i], sequences[i], sequences[i].tolist(), k, params, gen) for i in rows]
        for i, proposal in zip(rows, proposer.propose(asked), strict=True):
            context = torch.cat([sequences[i], proposal.tokens[:-1]])
            with torch.no_grad():
                fresh = process_logits(draft(context[None]).logits[0, -k:], params)  # [k, V]
            torch.testing.assert_close(proposal.probs, fresh, atol=1e-5, rtol=1e-4)
            keep = proposal.tokens[: min(accepted[i], k)]
            proposer.observe(states[i], keep.shape[0], None)
            # The target keeps `accepted` drafts and adds tokens of its own (30: caught up in the
            # batched forward; 70: far ahead, prefilled alone).
            extra = torch.randint(0, draft.config.vocab_size, (max(1, accepted[i] - k + 1),), generator=gen)
            sequences[i] = torch.cat([sequences[i], keep, extra])
        for i in set(range(3)) - set(rows):  # not drafted this step: the sequence moves on anyway
            proposer.observe(states[i], 0, None)
            sequences[i] = torch.cat([sequences[i], torch.randint(0, 100, (2,), generator=gen)])
    for state in states:
        proposer.release(state)
    assert proposer.cache.rows == 0


def test_draft_respects_its_context_length():
    draft = build("gpt2", 1, 32, seed=6)  # context 256
    proposer = DraftModelProposer(draft)
    sequence = torch.arange(254) % 100
    (proposal,) = proposer.propose(
        [DraftRow(proposer.new_state(), sequence, sequence.tolist(), 8, SamplingParams(), torch.Generator())]
    )
    assert proposal.tokens.shape[0] == 3  # drafts occupy positions 254..256; 255 is the last fed


def test_draft_load_weights(model_dirs):
    target_dir, other_dir = model_dirs["gpt2"]["target"], model_dirs["gpt2"]["near"]
    proposer = DraftModelProposer(load_causal_lm(target_dir, torch.device("cpu"), torch.float32))
    other = AutoModelForCausalLM.from_pretrained(other_dir)
    weights = {k: v for k, v in other.state_dict().items() if k != "lm_head.weight"}  # tied: given once
    proposer.load_weights(weights)
    for name, tensor in other.state_dict().items():
        assert torch.equal(proposer.model.state_dict()[name], tensor)

    wrong_vocab = build("gpt2", 2, 64, seed=0, vocab=64).state_dict()
    with pytest.raises(IncompatibleDraftError, match="vocabulary"):
        proposer.load_weights(wrong_vocab)
    with pytest.raises(IncompatibleDraftError, match="does not have"):
        proposer.load_weights({**weights, "extra.weight": torch.zeros(1)})
    with pytest.raises(IncompatibleDraftError, match="lack"):
        proposer.load_weights({k: v for k, v in weights.items() if "h.0." not in k})


@pytest.mark.parametrize("proposer", [NullProposer(), NgramProposer()])
def test_weightless_proposers(proposer):
    proposer.load_weights({})
    with pytest.raises(IncompatibleDraftError):
        proposer.load_weights({"w": torch.zeros(1)})
