"""The per-step controller (serving.engine.speculation), pure: which proposer drafts for each
sequence and how much, from the measured costs, the learnt proposer's acceptance and the suffix
candidates' chances."""

from __future__ import annotations

import pytest

from serving.engine.speculation import (
    NONE,
    Choice,
    Costs,
    Options,
    StepCosts,
    expected,
    expected_tokens,
    fixed,
    plan,
    suffix_chances,
)

BATCHES = (1, 4, 16)


def tables(per_token: float, per_draft: float, width: int = 8, k_max: int = 4) -> Costs:
    """Steps of 1 + per_token * (tokens verified in the batch) seconds, + per_draft * k when the
    learnt proposer drafts k."""
    verify = tuple(tuple(1 + per_token * b * (n + 1) for n in range(width + 1)) for b in BATCHES)
    learnt = tuple(
        tuple(1 + per_token * b * (k + 1) + per_draft * k for k in range(k_max + 1)) for b in BATCHES
    )
    return Costs(StepCosts(BATCHES, verify), StepCosts(BATCHES, learnt))


FLAT = tables(0.0, 0.05)  # verification flat in tokens (a GPU at low load)
BUSY = tables(0.2, 0.05)  # compute-bound: every verified token costs


def drafting(alphas: list[float]) -> list[Options]:
    return [Options(room=100, alpha=alpha) for alpha in alphas]


def test_the_learnt_proposer_s_k_follows_the_speedup_model():
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert plan(drafting([0.8] * 4), 4, FLAT) == [Choice("learnt", 4)] * 4
    assert plan(drafting([0.0] * 4), 4, FLAT) == [NONE] * 4  # nothing is ever accepted: plain decoding
    (alone,) = plan(drafting([0.7]), 4, BUSY)
    assert alone.proposer == "learnt" and alone.tokens >= 1
    assert plan(drafting([0.7] * 16), 4, BUSY) == [NONE] * 16  # a full batch decodes plainly
    assert all(c.proposer == "learnt" for c in plan(drafting([0.95] * 16), 4, BUSY))  # unless it pays
    assert plan([], 4, FLAT) == [] and plan(drafting([0.9]), 2, FLAT) == [Choice("learnt", 2)]  # k_max caps
    assert plan([Options(room=1, alpha=0.9)], 4, FLAT) == [Choice("learnt", 1)]  # so does the room left


def test_a_confident_suffix_match_goes_first_and_the_learnt_proposer_serves_the_rest():
    options = [
        Options(room=100, alpha=0.6, chances=(0.99,) * 8),  # the answer repeats what was served
        Options(room=100, alpha=0.6, chances=(0.3,)),  # a weak match
        Options(room=100, alpha=0.6),  # no match
    ]
    first, weak, none = plan(options, 4, FLAT)
    assert first == Choice("suffix", 8)
    assert weak.proposer == none.proposer == "learnt" and weak.tokens == none.tokens >= 1
    assert plan([Options(room=100, chances=(0.99,) * 8)] * 16, 4, BUSY) == [Choice("suffix", 8)] * 16


def test_the_step_is_as_wide_as_its_candidates_pay_for():
    chances = (0.95, 0.9, 0.5, 0.2, 0.1)
    assert plan([Options(room=100, chances=chances)], 4, FLAT) == [Choice("suffix", 5)]  # verifying is free
    alone = plan([Options(room=100, chances=chances)], 4, BUSY)  # one row: each more token costs a little
    assert alone[0].proposer == "suffix" and 2 <= alone[0].tokens <= 5
    crowded = plan([Options(room=100, chances=chances)] * 16, 4, BUSY, margin=0.0)
    assert {c.proposer for c in crowded} == {"suffix"} and crowded[0].tokens < alone[0].tokens
    assert plan([Options(room=100, chances=(0.2,))] * 16, 4, BUSY) == [NONE] * 16  # nothing pays
    # rows are padded to the widest: one long match does not make every row pay for its width
    mixed = [Options(room=100, chances=(0.99,) * 8)] + [Options(room=100)] * 15
    assert plan(mixed, 4, BUSY) == [NONE] * 16
    assert plan(mixed, 4, FLAT)[0] == Choice("suffix", 8)


def test_without_costs_each_sequence_drafts_k_or_its_more_promising_candidates():
    options = [
        Options(room=100, alpha=0.5, chances=(0.9,) * 4),
        Options(room=100, alpha=0.5, chances=(0.1,)),
        Options(room=2, alpha=0.5),
        Options(room=100, chances=(0.1,)),
        Options(room=100),
    ]
    assert fixed(options, 3) == [
        Choice("suffix", 4), Choice("learnt", 3), Choice("learnt", 2), Choice("suffix", 1), NONE
    ]  # fmt: skip
    assert expected(options[0], Choice("suffix", 2)) == pytest.approx(2.8)


def test_step_costs_add_the_learnt_proposer_s_own_cost_per_group():
    costs = tables(0.1, 0.5)
    plain, verified = costs.step_seconds(4, 0), costs.step_seconds(4, 2)
    assert plain == pytest.approx(1.4) and verified == pytest.approx(2.2)
    # two groups of learnt proposers (say, two domains' drafts), each drafting 2: two own costs
    assert costs.step_seconds(4, 2, [2, 2], 2) == pytest.approx(verified + 2 * 1.0)
    slower = costs
    for _ in range(100):
        slower = slower.observe(4, 2, [4], 2, 2 * costs.step_seconds(4, 2, [4], 2))
    assert slower.step_seconds(4, 2, [4], 2) == pytest.approx(2 * costs.step_seconds(4, 2, [4], 2), rel=0.02)
    assert slower.verify == costs.verify  # a step that drafted corrects the learnt proposer's cost
    plainer = costs.observe(4, 2, [], 0, 2 * costs.step_seconds(4, 2))  # one that did not, verification's
    assert plainer.learnt == costs.learnt
    assert plainer.verify.step_seconds(4, 2) > costs.verify.step_seconds(4, 2)


def test_a_candidate_s_chance_is_its_confidence_at_most_the_measured_acceptance_to_its_depth():
    chances = suffix_chances((1.0, 1.0, 1.0, 0.3), (1, 2, 3, 1), alpha=0.5)  # a match seen once
    assert chances == pytest.approx((0.5, 0.25, 0.125, 0.3))
    assert suffix_chances((0.9, 0.6), (1, 2), alpha=1.0) == (0.9, 0.6)  # the counts, when all is accepted
