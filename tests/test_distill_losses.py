"""Distillation losses and offline acceptance on hand-made distributions."""

import math

import torch

from distill.acceptance import expected_acceptance, greedy_agreement
from distill.losses import forward_kl


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
