"""The rejection sampler and logit processing: exact distributions, determinism, greedy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from serving.engine.sampling import SamplingParams, process_logits, rejection_sample, sample
from serving.errors import InvalidRequestError

DRAWS = 100_000
TV_BOUND = 0.01


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def histogram(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


params_strategy = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.5, 1.0, 1.7]),
    top_p=st.sampled_from([1.0, 0.9, 0.6]),
    top_k=st.sampled_from([0, 2, 3]),
)


@st.composite
def distributions(draw):
    """Random target and draft logits [k+1 / k, V] over a small vocabulary and processing params."""
    vocab = draw(st.integers(2, 6))
    k = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.5, 2.0, 4.0]))
    target_logits = torch.randn(k + 1, vocab, generator=gen) * scale
    draft_logits = torch.randn(k, vocab, generator=gen) * scale
    return target_logits, draft_logits, draw(params_strategy), seed


# Distribution tests: derandomized, so the same cases (and seeds) are drawn on every run.
@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(distributions())
def test_emitted_tokens_follow_target(case):
    """First emitted token ~ p_1; the second, given the first draft was accepted, ~ p_2."""
    target_logits, draft_logits, params, seed = case
    p, q = process_logits(target_logits, params), process_logits(draft_logits, params)  # [k+1, V], [k, V]
    k, vocab = q.shape
    gen = torch.Generator().manual_seed(seed)
    drafts = sample(q.expand(DRAWS, k, vocab), gen)  # [B, k]
    out = rejection_sample(p.expand(DRAWS, k + 1, vocab), drafts, q.expand(DRAWS, k, vocab), gen)
    assert tv(histogram(out.tokens[:, 0], vocab), p[0].double()) < TV_BOUND
    second = out.tokens[out.num_accepted >= 1, 1]
    if second.numel() > DRAWS // 4:
        assert tv(histogram(second, vocab), p[1].double()) < 2 * TV_BOUND
    emitted = (out.tokens >= 0).sum(-1)
    assert torch.equal(emitted, out.num_accepted + 1)


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(distributions(), st.integers(0, 5))
def test_deterministic_proposer(case, drafted_token):
    """With q one-hot (n-gram lookup), the emitted token still follows p exactly."""
    target_logits, _, params, seed = case
    p = process_logits(target_logits[:2], params)  # [2, V]
    vocab = p.shape[-1]
    drafts = torch.full((DRAWS, 1), drafted_token % vocab)
    out = rejection_sample(p.expand(DRAWS, 2, vocab), drafts, None, torch.Generator().manual_seed(seed))
    assert tv(histogram(out.tokens[:, 0], vocab), p[0].double()) < TV_BOUND


def test_seeded_determinism():
    gen_p = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(64, 4, 50, generator=gen_p), -1)
    q = torch.softmax(torch.randn(64, 3, 50, generator=gen_p), -1)
    drafts = sample(q, gen_p)

    def run(seed: int):
        return rejection_sample(p, drafts, q, torch.Generator().manual_seed(seed))

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.num_accepted, b.num_accepted)
    assert not torch.equal(a.tokens, c.tokens)


def test_greedy_is_the_argmax_case():
    logits = torch.tensor([[0.1, 3.0, -1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])  # [k+1=3, V=3]
    p = process_logits(logits, SamplingParams(temperature=0.0))
    assert torch.equal(p, torch.eye(3)[[1, 0, 2]])
    gen = torch.Generator().manual_seed(0)
    # Drafts [1, 2]: the first matches the argmax, the second does not -> correction is argmax 0.
    out = rejection_sample(p[None], torch.tensor([[1, 2]]), None, gen, one_hot=True)
    assert out.num_accepted.tolist() == [1] and out.tokens.tolist() == [[1, 0, -1]]
    # Both match -> bonus token is the argmax of the last position.
    out = rejection_sample(p[None], torch.tensor([[1, 0]]), None, gen, one_hot=True)
    assert out.num_accepted.tolist() == [2] and out.tokens.tolist() == [[1, 0, 2]]


def test_empty_proposal_samples_from_p():
    p = torch.tensor([[[0.2, 0.8]]]).expand(DRAWS, 1, 2)
    out = rejection_sample(p, torch.empty(DRAWS, 0, dtype=torch.long), None, torch.Generator().manual_seed(1))
    assert out.num_accepted.eq(0).all()
    assert tv(histogram(out.tokens[:, 0], 2), p[0, 0].double()) < TV_BOUND


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 10, 0.5)]
)
def test_processing_matches_hf_warpers(temperature, top_k, top_p):
    logits = torch.randn(8, 40, generator=torch.Generator().manual_seed(3)) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    expected = torch.softmax(warpers(torch.zeros(8, 1, dtype=torch.long), logits.clone()), -1)
    ours = process_logits(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"top_k": 2.5},
    ],
)
def test_bad_sampling_params(kwargs):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)
