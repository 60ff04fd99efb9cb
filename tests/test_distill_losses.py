"""Distillation losses and offline acceptance on hand-made distributions."""

import math

import pytest
import torch

from distill.acceptance import expected_acceptance, greedy_agreement
from distill.losses import forward_kl, token_weights, topk_acceptance, topk_loss, weighted_mean


def test_forward_kl_known_value_and_mask():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()
    q = torch.tensor([[0.25, 0.75], [0.9, 0.1]]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert math.isclose(forward_kl(p, q, torch.tensor([1, 0])).item(), expected, rel_tol=1e-5)
    assert math.isclose(forward_kl(p, q, torch.tensor([1, 1])).item(), expected / 2, rel_tol=1e-5)
    assert forward_kl(p, p, torch.ones(2)).item() < 1e-6


def test_expected_acceptance_is_overlap():
    p = torch.tensor([0.7, 0.2, 0.1]).log()
    q = torch.tensor([0.2, 0.2, 0.6]).log()
    assert math.isclose(expected_acceptance(p, q).item(), 0.2 + 0.2 + 0.1, rel_tol=1e-5)
    assert math.isclose(expected_acceptance(p, p).item(), 1.0, rel_tol=1e-5)
    assert greedy_agreement(p, q).item() == 0.0 and greedy_agreement(p, p).item() == 1.0


# A hand-worked case: q = [0.5, 0.25, 0.125, 0.125]; the target logged its top-2 {0: 0.6, 1: 0.2},
# so p_hat = [0.75, 0.25] on S = {0, 1}; q(S) = 0.75 and q_hat = [2/3, 1/3].
Q = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
TOP_IDS = torch.tensor([0, 1])
TOP_LOGPROBS = torch.tensor([0.6, 0.2]).log()
EMITTED = torch.tensor(1)
HAND = {
    "fkl": 0.75 * math.log(0.75 / 0.5),
    "rkl": (2 / 3) * math.log((2 / 3) / 0.75) + (1 / 3) * math.log((1 / 3) / 0.25) - math.log(0.75),
    "tvd": 0.5 * (abs(0.75 - 0.5) + abs(0.25 - 0.25) + (1 - 0.75)),
    "ce": -math.log(0.25),
    "jsd": 0.5 * (0.75 * math.log(0.75 / (17 / 24)) + 0.25 * math.log(0.25 / (7 / 24)))
    + 0.5 * ((2 / 3) * math.log((2 / 3) / (17 / 24)) + (1 / 3) * math.log((1 / 3) / (7 / 24)))
    - math.log(0.75),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_topk_losses_match_hand_computed_values(name):
    loss = topk_loss(name, Q, TOP_IDS, TOP_LOGPROBS, EMITTED, beta=0.5)
    assert math.isclose(loss.item(), HAND[name], rel_tol=1e-5, abs_tol=1e-6)


def test_topk_acceptance_is_one_minus_tvd():
    assert math.isclose(topk_acceptance(Q, TOP_IDS, TOP_LOGPROBS).item(), 0.75, rel_tol=1e-6)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd"])
def test_topk_losses_vanish_when_the_draft_matches_the_truncated_target(name):
    draft = torch.tensor([0.75, 0.25, 0.0, 0.0]).log()  # q = p_hat exactly, nothing outside S
    assert abs(topk_loss(name, draft, TOP_IDS, TOP_LOGPROBS, EMITTED).item()) < 1e-6


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd", "ce"])
def test_gradients_reach_only_the_draft(name):
    draft = torch.nn.Linear(8, 16)
    hidden = torch.randn(3, 8)
    top_logprobs = torch.randn(3, 4).log_softmax(-1).requires_grad_(True)  # as if it came with a graph
    top_ids = torch.stack([torch.randperm(16)[:4] for _ in range(3)])
    loss = topk_loss(name, draft(hidden), top_ids, top_logprobs, top_ids[:, 0]).mean()
    loss.backward()
    assert draft.weight.grad is not None and draft.weight.grad.abs().sum() > 0
    assert top_logprobs.grad is None


def test_token_weights_select_positions():
    mask = torch.tensor([1, 1, 1, 0])
    draft = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]])  # argmax 0, 1, 2, 0
    emitted = torch.tensor([0, 2, 2, 1])
    top_logprobs = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.7, 0.3], [0.6, 0.4]]).log()
    assert token_weights("all", mask, draft, emitted, top_logprobs).tolist() == [1, 1, 1, 0]
    assert token_weights("wrong", mask, draft, emitted, top_logprobs).tolist() == [0, 1, 0, 0]
    confidence = token_weights("confidence", mask, draft, emitted, top_logprobs)
    assert torch.allclose(confidence, torch.tensor([0.9, 0.5, 0.7, 0.0]))
    assert weighted_mean(torch.tensor([1.0, 2.0, 3.0, 4.0]), confidence).item() == pytest.approx(
        (0.9 + 1.0 + 2.1) / 2.1
    )
    with pytest.raises(ValueError, match="unknown token selection"):
        token_weights("some", mask, draft, emitted, top_logprobs)


def test_unknown_loss_and_bad_beta_are_refused():
    with pytest.raises(ValueError, match="unknown loss"):
        topk_loss("mse", Q, TOP_IDS, TOP_LOGPROBS, EMITTED)
    with pytest.raises(ValueError, match="beta"):
        topk_loss("jsd", Q, TOP_IDS, TOP_LOGPROBS, EMITTED, beta=1.0)
