"""Stats arithmetic on hand-built cases, in DESIGN.md's terms."""

import pytest

from serving.engine.stats import SpecStats


def test_hand_built_steps():
    stats = SpecStats()
    stats.record(drafted=4, accepted=4)  # all accepted: 5 tokens emitted
    stats.record(drafted=4, accepted=1)  # 2 tokens emitted
    stats.record(drafted=2, accepted=0)  # 1 token emitted
    stats.record(drafted=0, accepted=0)  # a plain decoding step
    assert (stats.steps, stats.drafted, stats.accepted) == (4, 10, 5)
    assert stats.acceptance_rate == 0.5
    assert stats.mean_accepted_length == (5 + 4) / 4
    assert stats.drafted_per_position == [3, 3, 2, 2]
    assert stats.accepted_per_position == [2, 1, 1, 1]
    assert stats.acceptance_per_position == [2 / 3, 1 / 3, 0.5, 0.5]


def test_empty_stats():
    stats = SpecStats()
    assert stats.acceptance_rate == 0.0 and stats.mean_accepted_length == 0.0
    assert stats.acceptance_per_position == []


def test_rejects_impossible_counts():
    with pytest.raises(ValueError):
        SpecStats().record(drafted=2, accepted=3)
